//! float16 rounded to nearest with the CPU's own conversions (AVX-512F, or AVX2 with F16C).
//!
//! The portable kernel widens and narrows binary16 with integer and float operations that
//! vectorise, about twenty instructions per vector each way; `VCVTPH2PS` and `VCVTPS2PH`
//! convert a whole vector in one instruction each way, both exact IEEE conversions rounding to
//! nearest, ties to even. The update here is `body`'s, operation for operation, so the results
//! are the same bits; the one difference of the instructions, the payload they keep in a NaN,
//! is undone on store: a NaN is stored as the quiet NaN of its sign, as `f32_to_f16` stores it.
//! Elements past the last whole vector run through `body` itself.

use half::f16;

use super::{
    body, roofline_body, Bufs, Coeffs, Mode, Work, DECOUPLED_DECAY, L2_DECAY, NEAREST, NO_DECAY,
};

/// The f32 quiet NaN whose narrowing is binary16's 0x7e00 (no payload below the quiet bit).
const QUIET_NAN: i32 = 0x7fc0_0000;

/// The update and the roofline over one vector type: `$feature` the target features, `$lanes`
/// the lanes, then the vector's arithmetic. The module invoking it defines `load`, `round`,
/// `store` and `nan_max` for its vector type.
macro_rules! kernels {
    ($feature:literal, $lanes:literal, $set1:ident, $add:ident, $sub:ident, $mul:ident,
     $div:ident, $fmadd:ident, $sqrt:ident) => {
        /// `body` for float16 rounded to nearest, a vector at a time.
        #[target_feature(enable = $feature)]
        fn adam<const DECAY: u8, const OPTIMIZED: bool, const AMSGRAD: bool>(
            k: &Coeffs<f32>,
            b: &mut Bufs<'_, f16>,
        ) {
            let n = b.p.len();
            let whole = n - n % $lanes;
            // Re-slicing to one length checks every buffer's length once (as `body` does).
            let (p, g, m, v) = (&mut *b.p, &b.g[..n], &mut b.m[..n], &mut b.v[..n]);
            let vmax: &mut [f16] = if AMSGRAD { &mut b.vmax[..n] } else { &mut [] };
            let s = $set1;
            for i in (0..whole).step_by($lanes) {
                // SAFETY: `i + lanes <= whole <= n`, the length of every buffer used (vmax's
                // with AMSGRAD).
                unsafe {
                    let mut theta = load(p.as_ptr().add(i));
                    let mut grad = $mul(load(g.as_ptr().add(i)), s(k.grad_sign));
                    if DECAY == DECOUPLED_DECAY {
                        theta = round($mul(theta, s(k.decay)));
                    }
                    if DECAY == L2_DECAY {
                        grad = round($fmadd(theta, s(k.l2), grad));
                    }
                    let mi = $fmadd(grad, s(k.omb1), $mul(load(m.as_ptr().add(i)), s(k.b1)));
                    let vi = $fmadd(
                        $mul(s(k.omb2), grad),
                        grad,
                        $mul(load(v.as_ptr().add(i)), s(k.b2)),
                    );
                    let vd = if AMSGRAD {
                        let x = nan_max(load(vmax.as_ptr().add(i)), vi);
                        store(vmax.as_mut_ptr().add(i), x);
                        x
                    } else {
                        vi
                    };
                    let root = $sqrt(vd);
                    let denom = if OPTIMIZED {
                        $add(root, s(k.eps))
                    } else {
                        $add($div(root, s(k.sqrt_bc2)), s(k.eps))
                    };
                    let u = $div($mul(s(k.step_size), mi), denom);
                    store(p.as_mut_ptr().add(i), $sub(theta, u));
                    store(m.as_mut_ptr().add(i), mi);
                    store(v.as_mut_ptr().add(i), vi);
                }
            }
            let mut tail = Bufs {
                p: &mut p[whole..],
                g: &g[whole..],
                m: &mut m[whole..],
                v: &mut v[whole..],
                vmax: if AMSGRAD { &mut vmax[whole..] } else { &mut [] },
                comp: &mut [],
                offset: b.offset + whole,
            };
            body::<f16, DECAY, OPTIMIZED, AMSGRAD, NEAREST>(k, &mut tail);
        }

        /// `roofline_body` with the same conversions.
        #[target_feature(enable = $feature)]
        fn roofline(b: &mut Bufs<'_, f16>) {
            let n = b.p.len();
            let whole = n - n % $lanes;
            let (p, g, m, v) = (&mut *b.p, &b.g[..n], &mut b.m[..n], &mut b.v[..n]);
            for i in (0..whole).step_by($lanes) {
                // SAFETY: `i + lanes <= whole <= n`, the length of every buffer used.
                unsafe {
                    let gi = load(g.as_ptr().add(i));
                    store(p.as_mut_ptr().add(i), $add(load(p.as_ptr().add(i)), gi));
                    store(m.as_mut_ptr().add(i), $add(load(m.as_ptr().add(i)), gi));
                    store(v.as_mut_ptr().add(i), $add(load(v.as_ptr().add(i)), gi));
                }
            }
            let mut tail = Bufs {
                p: &mut p[whole..],
                g: &g[whole..],
                m: &mut m[whole..],
                v: &mut v[whole..],
                vmax: &mut [],
                comp: &mut [],
                offset: b.offset + whole,
            };
            roofline_body(&mut tail);
        }

        /// Runs a float16 chunk rounded to nearest (the caller checked the rounding).
        ///
        /// # Safety
        /// The CPU has the module's target features.
        pub(in crate::kernel) unsafe fn run(work: Work, k: &Coeffs<f32>, b: &mut Bufs<'_, f16>) {
            let Work::Adam(mode) = work else {
                // SAFETY: the function's contract.
                return unsafe { roofline(b) };
            };
            // SAFETY: the function's contract, for each arm.
            unsafe {
                match mode.decay {
                    L2_DECAY => flags::<L2_DECAY>(mode, k, b),
                    DECOUPLED_DECAY => flags::<DECOUPLED_DECAY>(mode, k, b),
                    _ => flags::<NO_DECAY>(mode, k, b),
                }
            }
        }

        /// # Safety
        /// The CPU has the module's target features.
        unsafe fn flags<const DECAY: u8>(mode: Mode, k: &Coeffs<f32>, b: &mut Bufs<'_, f16>) {
            // SAFETY: the function's contract, for each arm.
            unsafe {
                match (mode.optimized, mode.amsgrad) {
                    (false, false) => adam::<DECAY, false, false>(k, b),
                    (false, true) => adam::<DECAY, false, true>(k, b),
                    (true, false) => adam::<DECAY, true, false>(k, b),
                    (true, true) => adam::<DECAY, true, true>(k, b),
                }
            }
        }
    };
}

/// Sixteen lanes, AVX-512F.
pub(super) mod avx512 {
    use std::arch::x86_64::{
        __m256i, __m512, _mm256_loadu_si256, _mm256_storeu_si256, _mm512_add_ps, _mm512_and_si512,
        _mm512_castps_si512, _mm512_castsi512_ps, _mm512_cmp_ps_mask, _mm512_cvtph_ps,
        _mm512_cvtps_ph, _mm512_div_ps, _mm512_fmadd_ps, _mm512_mask_blend_ps, _mm512_mul_ps,
        _mm512_or_si512, _mm512_set1_epi32, _mm512_set1_ps, _mm512_sqrt_ps, _mm512_sub_ps,
        _CMP_GE_OQ, _CMP_GT_OQ, _CMP_UNORD_Q, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT,
    };

    use super::*;

    /// Round to nearest, ties to even, whatever MXCSR says; no exception flags.
    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

    /// Sixteen values from `ptr`, widened (exactly).
    ///
    /// # Safety
    /// `ptr` is valid for reading 16 values.
    #[target_feature(enable = "avx512f")]
    unsafe fn load(ptr: *const f16) -> __m512 {
        // SAFETY: the function's contract; an unaligned load.
        _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(ptr.cast::<__m256i>()) })
    }

    /// `x` rounded to binary16 and widened back: the rounding `body` makes inside the update.
    #[target_feature(enable = "avx512f")]
    fn round(x: __m512) -> __m512 {
        _mm512_cvtph_ps(_mm512_cvtps_ph::<RNE>(x))
    }

    /// Stores `x` rounded to binary16 at `ptr`; a NaN as the quiet NaN of its sign.
    ///
    /// # Safety
    /// `ptr` is valid for writing 16 values.
    #[target_feature(enable = "avx512f")]
    unsafe fn store(ptr: *mut f16, x: __m512) {
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        let sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN));
        let quiet = _mm512_or_si512(sign, _mm512_set1_epi32(QUIET_NAN));
        let x = _mm512_mask_blend_ps(nan, x, _mm512_castsi512_ps(quiet));
        // SAFETY: the function's contract; an unaligned store.
        unsafe { _mm256_storeu_si256(ptr.cast::<__m256i>(), _mm512_cvtps_ph::<RNE>(x)) };
    }

    /// `Real::nan_max`: the larger, NaN if either is NaN (`a + b` then).
    #[target_feature(enable = "avx512f")]
    fn nan_max(a: __m512, b: __m512) -> __m512 {
        let a_gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, b);
        let b_ge = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(b, a);
        let r = _mm512_mask_blend_ps(b_ge, _mm512_add_ps(a, b), b);
        _mm512_mask_blend_ps(a_gt, r, a)
    }

    kernels!(
        "avx512f",
        16,
        _mm512_set1_ps,
        _mm512_add_ps,
        _mm512_sub_ps,
        _mm512_mul_ps,
        _mm512_div_ps,
        _mm512_fmadd_ps,
        _mm512_sqrt_ps
    );
}

/// Eight lanes, AVX2 with FMA and F16C.
pub(super) mod avx2 {
    use std::arch::x86_64::{
        __m128i, __m256, _mm256_add_ps, _mm256_and_si256, _mm256_blendv_ps, _mm256_castps_si256,
        _mm256_castsi256_ps, _mm256_cmp_ps, _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_div_ps,
        _mm256_fmadd_ps, _mm256_mul_ps, _mm256_or_si256, _mm256_set1_epi32, _mm256_set1_ps,
        _mm256_sqrt_ps, _mm256_sub_ps, _mm_loadu_si128, _mm_storeu_si128, _CMP_GE_OQ, _CMP_GT_OQ,
        _CMP_UNORD_Q, _MM_FROUND_TO_NEAREST_INT,
    };

    use super::*;

    /// Round to nearest, ties to even, whatever MXCSR says (F16C's immediate has no
    /// exception-suppression bit; exceptions stay masked).
    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT;

    /// Eight values from `ptr`, widened (exactly).
    ///
    /// # Safety
    /// `ptr` is valid for reading 8 values.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(ptr: *const f16) -> __m256 {
        // SAFETY: the function's contract; an unaligned load.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(ptr.cast::<__m128i>()) })
    }

    /// `x` rounded to binary16 and widened back: the rounding `body` makes inside the update.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn round(x: __m256) -> __m256 {
        _mm256_cvtph_ps(_mm256_cvtps_ph::<RNE>(x))
    }

    /// Stores `x` rounded to binary16 at `ptr`; a NaN as the quiet NaN of its sign.
    ///
    /// # Safety
    /// `ptr` is valid for writing 8 values.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn store(ptr: *mut f16, x: __m256) {
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let sign = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(i32::MIN));
        let quiet = _mm256_or_si256(sign, _mm256_set1_epi32(QUIET_NAN));
        let x = _mm256_blendv_ps(x, _mm256_castsi256_ps(quiet), nan);
        // SAFETY: the function's contract; an unaligned store.
        unsafe { _mm_storeu_si128(ptr.cast::<__m128i>(), _mm256_cvtps_ph::<RNE>(x)) };
    }

    /// `Real::nan_max`: the larger, NaN if either is NaN (`a + b` then).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn nan_max(a: __m256, b: __m256) -> __m256 {
        let a_gt = _mm256_cmp_ps::<_CMP_GT_OQ>(a, b);
        let b_ge = _mm256_cmp_ps::<_CMP_GE_OQ>(b, a);
        let r = _mm256_blendv_ps(_mm256_add_ps(a, b), b, b_ge);
        _mm256_blendv_ps(r, a, a_gt)
    }

    kernels!(
        "avx2,fma,f16c",
        8,
        _mm256_set1_ps,
        _mm256_add_ps,
        _mm256_sub_ps,
        _mm256_mul_ps,
        _mm256_div_ps,
        _mm256_fmadd_ps,
        _mm256_sqrt_ps
    );
}
