//! Conversions between `f32` and the 16-bit float types, written with integer and float
//! operations that vectorise (no table, no branch per element), rounding to nearest, ties to even.

use half::{bf16, f16};

/// bfloat16 is the top half of an `f32`: widening is exact.
#[inline(always)]
pub(crate) fn bf16_to_f32(x: bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}

/// Rounds to the nearest bfloat16, ties to even; NaN stays NaN (quiet).
#[inline(always)]
pub(crate) fn f32_to_bf16(x: f32) -> bf16 {
    // Selected in 32-bit lanes and narrowed once: selecting narrowed values made the compiler
    // narrow the select's mask as well (three times the instructions on AVX-512).
    bf16::from_bits(f32_to_bf16_bits(x) as u16)
}

/// `f32_to_bf16`'s bits in the low half of a `u32`.
#[inline(always)]
fn f32_to_bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let quiet_nan = (b >> 16) | 0x0040;
    if x.is_nan() {
        quiet_nan
    } else {
        rounded
    }
}

/// Widens an IEEE binary16 value exactly (subnormals, infinities and NaN included).
#[inline(always)]
pub(crate) fn f16_to_f32(x: f16) -> f32 {
    let h = x.to_bits() as u32;
    let sign = (h & 0x8000) << 16;
    let bits = (h & 0x7fff) << 13;
    let exp = bits & 0x0f80_0000;
    // Rebias the exponent from 15 to 127.
    let normal = bits + ((127 - 15) << 23);
    let inf_nan = normal + ((128 - 16) << 23);
    // A subnormal's bits, rebiased as if normal, are off by 2^-14; subtracting it renormalises.
    let sub = (f32::from_bits(normal + (1 << 23)) - f32::from_bits(113 << 23)).to_bits();
    let out = if exp == 0x0f80_0000 {
        inf_nan
    } else if exp == 0 {
        sub
    } else {
        normal
    };
    f32::from_bits(out | sign)
}

/// Rounds to the nearest binary16, ties to even; overflow gives ±inf, NaN stays NaN.
#[inline(always)]
pub(crate) fn f32_to_f16(x: f32) -> f16 {
    f16::from_bits(f32_to_f16_bits(x) as u16)
}

/// `f32_to_f16`'s bits in the low half of a `u32` (selected in 32-bit lanes, see `f32_to_bf16`).
#[inline(always)]
fn f32_to_f16_bits(x: f32) -> u32 {
    const F32_INF: u32 = 255 << 23;
    const F16_OVERFLOW: u32 = (127 + 16) << 23;
    // Adding this float aligns a subnormal result's 10 bits at the bottom, rounded by the FPU.
    const DENORM_MAGIC: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    let b = x.to_bits();
    let sign = (b >> 16) & 0x8000;
    let u = b & 0x7fff_ffff;
    let inf_nan: u32 = if u > F32_INF { 0x7e00 } else { 0x7c00 };
    let sub = (f32::from_bits(u) + f32::from_bits(DENORM_MAGIC))
        .to_bits()
        .wrapping_sub(DENORM_MAGIC)
        & 0xffff;
    let mant_odd = (u >> 13) & 1;
    let normal = u
        .wrapping_add(((15u32.wrapping_sub(127)) << 23).wrapping_add(0xfff))
        .wrapping_add(mant_odd)
        >> 13;
    let out = if u >= F16_OVERFLOW {
        inf_nan
    } else if u < (113 << 23) {
        sub
    } else {
        normal
    };
    out | sign
}

/// Stochastic rounding to bfloat16 with random bits `r` (docs/NUMERICS.md): adding 16 random low
/// bits before truncating rounds up with probability equal to the distance from the lower
/// neighbour. Infinities and NaN round to nearest.
#[inline(always)]
pub(crate) fn f32_to_bf16_stochastic(x: f32, r: u32) -> bf16 {
    let b = x.to_bits();
    // Finite magnitudes are at most 0x7f7f_ffff, so the sum cannot carry into the sign bit.
    let up = ((b & 0x7fff_ffff).wrapping_add(r & 0xffff) & 0xffff_0000) | (b & 0x8000_0000);
    let bits = if x.is_finite() {
        up >> 16
    } else {
        f32_to_bf16_bits(x)
    };
    bf16::from_bits(bits as u16)
}

/// Stochastic rounding to binary16 with random bits `r` (docs/NUMERICS.md). Normal results drop
/// 13 mantissa bits after adding 13 random ones; subnormal results (spacing 2^-24) round up
/// when 16 random bits fall below the fraction. Infinities and NaN round to nearest.
#[inline(always)]
pub(crate) fn f32_to_f16_stochastic(x: f32, r: u32) -> f16 {
    const TWO_POW_24: f32 = 16_777_216.0;
    let b = x.to_bits();
    let sign = (b >> 16) & 0x8000;
    let a = f32::from_bits(b & 0x7fff_ffff);
    // The sum has 10 mantissa bits left, so the narrowing is exact (or overflows to inf).
    let y = f32::from_bits(((b & 0x7fff_ffff).wrapping_add(r & 0x1fff)) & !0x1fff);
    let normal = f32_to_f16_bits(y);
    let s = a * TWO_POW_24;
    // Truncation is floor for s >= 0; out-of-range lanes saturate and are not selected.
    let n = (s as i32) as f32;
    let up = ((r & 0xffff) as f32) < (s - n) * 65536.0;
    let q = (n + if up { 1.0 } else { 0.0 }) * (1.0 / TWO_POW_24);
    let sub = f32_to_f16_bits(q);
    let magnitude = if a >= 1.0 / 16384.0 { normal } else { sub };
    let bits = if x.is_finite() {
        magnitude | sign
    } else {
        f32_to_f16_bits(x)
    };
    f16::from_bits(bits as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every binary16 value widens exactly as the `half` crate does it.
    #[test]
    fn f16_widening_is_exact_for_all_values() {
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            let (a, b) = (f16_to_f32(h), h.to_f32());
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{bits:#x}"
            );
        }
    }

    #[test]
    fn bf16_widening_is_exact_for_all_values() {
        for bits in 0..=u16::MAX {
            let h = bf16::from_bits(bits);
            let (a, b) = (bf16_to_f32(h), h.to_f32());
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{bits:#x}"
            );
        }
    }

    /// Rounding agrees with the `half` crate's (round to nearest, ties to even) on every f32
    /// whose bits step through the whole range, including all ties around each 16-bit value.
    #[test]
    fn narrowing_rounds_to_nearest_even() {
        let mut checked = 0u64;
        let mut bits: u32 = 0;
        loop {
            for b in [
                bits,
                bits | 0x1000,
                bits | 0x0fff,
                bits | 0x2000,
                bits | 0x8000,
                bits | 0x7fff,
            ] {
                let x = f32::from_bits(b);
                let (a, r) = (f32_to_f16(x), f16::from_f32(x));
                assert!(
                    a.to_bits() == r.to_bits() || (a.is_nan() && r.is_nan()),
                    "f16 {x:e} ({b:#x}): {:#x} vs {:#x}",
                    a.to_bits(),
                    r.to_bits()
                );
                let (a, r) = (f32_to_bf16(x), bf16::from_f32(x));
                assert!(
                    a.to_bits() == r.to_bits() || (a.is_nan() && r.is_nan()),
                    "bf16 {x:e} ({b:#x}): {:#x} vs {:#x}",
                    a.to_bits(),
                    r.to_bits()
                );
                checked += 1;
            }
            match bits.checked_add(0x0001_2345) {
                Some(n) => bits = n,
                None => break,
            }
        }
        assert!(checked > 100_000);
    }
}
