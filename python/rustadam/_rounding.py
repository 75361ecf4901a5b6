"""Bit-exact rounding helpers shared by the torch paths (docs/NUMERICS.md).

- the counter-based hash of stochastic rounding (:func:`mix`, :func:`key`, :func:`hash_index`)
  and :func:`stochastic_round`, on int64 tensors holding uint32 values;
- :func:`element_index`, the index ``i`` each element hashes (its memory offset in a dense
  tensor, else its row-major flat index);
- :func:`kahan_update`, the compensated parameter update of ``rounding="kahan"``;
- exact arithmetic that torch does not promise on every device: :func:`fma` (one rounding of
  ``a·b + c``), :func:`sqrt_rn` (the correctly rounded square root) and the probes that tell
  whether torch's own fused ops already give them.

Everything here is plain torch, runs on any device and makes no host synchronisation.
"""

from __future__ import annotations

import functools

import torch

M1 = 0x7FEB352D
M2 = 0x2C1B3C6D
_MASK32 = 0xFFFFFFFF
_HALF = (torch.float16, torch.bfloat16)
#: Parameter dtypes stored in 16-bit reals (complex32 as pairs of float16): the ones whose
#: rounding modes apply, and which rounding="kahan" gives a compensation buffer.
SIXTEEN_BIT = (torch.float16, torch.bfloat16, torch.complex32)

__all__ = [
    "M1",
    "M2",
    "SIXTEEN_BIT",
    "compute_dtype",
    "element_index",
    "fma",
    "fma_fused_by_torch",
    "hash_index",
    "kahan_update",
    "key",
    "mix",
    "mix_int",
    "sqrt_rn",
    "stochastic_round",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """C of docs/NUMERICS.md: float64 for float64, float32 for every other real dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- the hash ----------------------------------------------------------------------------------


def mix_int(x: int) -> int:
    """:func:`mix` on a Python int (the host side: per-tensor keys)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * M1) & _MASK32
    x ^= x >> 15
    x = (x * M2) & _MASK32
    x ^= x >> 16
    return x


def mix(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finaliser of docs/NUMERICS.md on an int64 tensor of values in [0, 2**32).

    ``x ^= x >> 16; x *= M1; x ^= x >> 15; x *= M2; x ^= x >> 16`` with uint32 wrapping. The
    multipliers are below 2**31, so ``x * M`` stays below 2**63 and int64 holds it exactly
    before the mask.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * M2) & _MASK32
    return x ^ (x >> 16)


def key(seed: int, t: int) -> int:
    """``mix(mix(mix(seed mod 2**32) ^ (seed >> 32 mod 2**32)) ^ (t mod 2**32))`` (host side)."""
    seed &= (1 << 64) - 1
    return mix_int(mix_int(mix_int(seed & _MASK32) ^ ((seed >> 32) & _MASK32)) ^ (t & _MASK32))


def hash_index(k: int, index: torch.Tensor) -> torch.Tensor:
    """``r(i) = mix(key ^ mix(i mod 2**32))`` for every element of the int64 tensor ``index``."""
    return mix(mix(index & _MASK32) ^ (k & _MASK32))


# ---- element indices ----------------------------------------------------------------------------


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``t.numel()`` consecutive slots, each once, strides >= 0.

    Size-1 dimensions may have any stride (they never move the offset).
    """
    dims = [(st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1]
    if any(st < 0 for st, _ in dims):
        return False
    if t.numel() == 0:
        return True
    expected = 1
    for st, sz in sorted(dims):
        if st != expected:
            return False
        expected *= sz
    return True


def element_index(t: torch.Tensor) -> torch.Tensor:
    """Each element's hashing index ``i`` as an int64 tensor of ``t``'s shape on ``t``'s device.

    For a dense tensor (:func:`is_dense`) ``i`` is the element's offset in memory from the
    tensor's first element, so a kernel walking memory and torch ops see the same ``i``; for
    contiguous tensors that is the row-major flat index. For other layouts it is the row-major
    flat index. Complex tensors: pass ``torch.view_as_real(t)`` (the index is in real elements).
    """
    n = t.numel()
    flat = torch.arange(n, dtype=torch.int64, device=t.device)
    if is_dense(t):
        return flat.as_strided(t.shape, t.stride())
    return flat.view(t.shape)


# ---- stochastic rounding ------------------------------------------------------------------------


def stochastic_round(
    x32: torch.Tensor, dtype: torch.dtype, seed: int, step: int, index: torch.Tensor
) -> torch.Tensor:
    """Rounds the float32 tensor ``x32`` to ``dtype`` stochastically, as docs/NUMERICS.md says.

    With r = :func:`hash_index` (key(seed, step), index) and a = |x| (the sign is put back):

    - bfloat16: ``bits = (bits(a) + (r & 0xFFFF)) & 0xFFFF0000``; the upper half is the result;
    - float16, a >= 2**-14 (normal): ``bits = (bits(a) + (r & 0x1FFF)) & ~0x1FFF`` is exactly a
      float16 value (or >= 65536, which converts to inf);
    - float16, a < 2**-14 (subnormal): s = a·2**24 (exact), n = floor(s), f = s − n; rounds up
      when ``float(r & 0xFFFF) < f·65536``; the result is (n + up)·2**-24.

    Non-finite values round to nearest. float32 and float64 are returned as ``x32.to(dtype)``
    (round to nearest). Returns a new tensor of ``dtype``.
    """
    if dtype not in _HALF:
        return x32.to(dtype)
    if x32.dtype != torch.float32:
        raise TypeError(f"stochastic_round takes float32 values, got {x32.dtype}")
    r = hash_index(key(seed, step), index)
    a = x32.abs()
    bits = a.view(torch.int32).to(torch.int64)
    if dtype == torch.bfloat16:
        b2 = (bits + (r & 0xFFFF)) & 0xFFFF0000
        # b2 <= 0x7F800000 for finite a: it fits int32 and is exactly a bfloat16 value.
        y = b2.to(torch.int32).view(torch.float32)
    else:
        b2 = (bits + (r & 0x1FFF)) & ~0x1FFF
        normal = b2.to(torch.int32).view(torch.float32)
        s = a * 16777216.0  # 2**24, exact for a < 2**-14
        n = torch.floor(s)
        up = (r & 0xFFFF).to(torch.float32) < (s - n) * 65536.0
        sub = (n + up.to(torch.float32)) * 5.9604644775390625e-08  # 2**-24
        y = torch.where(a >= 6.103515625e-05, normal, sub)  # 2**-14
    y = torch.where(torch.signbit(x32), -y, y)
    # y is exactly representable (or inf for float16), so this conversion does not round.
    return torch.where(torch.isfinite(x32), y, x32).to(dtype)


# ---- Kahan-compensated update -------------------------------------------------------------------


def kahan_update(
    theta: torch.Tensor, u: torch.Tensor, comp: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compensated update θ ← θ − u of ``rounding="kahan"`` for a 16-bit parameter.

    ``theta``, ``u`` in the compute type C (float32); ``comp`` is the compensation buffer c in
    ``dtype``. In C::

        y = load(c) − u;  s = θ + y;  θ' = round_E(s);  c' = round_E(y − (load(θ') − θ))

    Returns ``(θ', c')``, both of ``dtype`` (new tensors).
    """
    c32 = theta.dtype
    y = comp.to(c32) - u
    s = theta + y
    new = s.to(dtype)
    new_c = (y - (new.to(c32) - theta)).to(dtype)
    return new, new_c


# ---- exact arithmetic ---------------------------------------------------------------------------


def _nudge_odd(s: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """Round to odd: where ``err`` != 0 and ``s`` has an even last bit, its neighbour toward err.

    ``s = RN(x)`` and ``err = x − s`` exactly; the result is x rounded to odd, which rounds
    correctly to any precision at least two bits shorter (here float64 -> float32).
    """
    int_t = torch.int64 if s.dtype == torch.float64 else torch.int32
    even = (s.view(int_t) & 1) == 0
    toward = torch.where(err > 0, torch.inf, -torch.inf).to(s.dtype)
    return torch.where((err != 0) & even, torch.nextafter(s, toward), s)


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Knuth's TwoSum: s = RN(a + b) and the exact error a + b − s."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _two_prod(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dekker's TwoProduct without fma (Veltkamp splitting): p = RN(a·b), e = a·b − p exactly.

    Exact unless a or b is above ~2**996 or the product's tail underflows.
    """
    split = 134217729.0  # 2**27 + 1 for float64
    p = a * b

    def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x * split
        hi = c - (c - x)
        return hi, x - hi

    ah, al = halves(a)
    bh, bl = halves(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``RN(a·b + c)`` with one rounding, from ops that round each result correctly.

    float32 (and 16-bit values in float32): a·b is exact in float64; the float64 sum is rounded
    to odd (TwoSum error and a one-ulp nudge), then to float32: correctly rounded.
    float64: Boldo–Melquiond's emulation: (uh, ul) = TwoProduct(a, b), (th, tl) = TwoSum(c, uh),
    result = RN(th + RO(tl + ul)) (exact barring overflow and underflow of the tails).
    Returns a tensor of the inputs' (broadcast) dtype.
    """
    if a.dtype == torch.float64:
        uh, ul = _two_prod(a, b)
        th, tl = _two_sum(c, uh)
        s, err = _two_sum(tl, ul)
        return th + _nudge_odd(s, err)
    out = a.dtype
    p = a.double() * b.double()  # exact: 24 + 24 bits
    s, err = _two_sum(p, c.double())
    return _nudge_odd(s, err).to(out)


def fma_scalar(x: torch.Tensor, a: float, y: torch.Tensor) -> torch.Tensor:
    """``RN(x·a + y)`` for a scalar ``a`` held in x's dtype: torch's ``y.add(x, alpha=a)`` where
    it rounds once on this device (measured by :func:`fma_fused_by_torch`), else :func:`fma`."""
    if fma_fused_by_torch(str(x.device), x.dtype):
        return y.add(x, alpha=a)
    return fma(x, torch.full_like(x, a), y)


def fma_square(x: torch.Tensor, w: float, y: torch.Tensor) -> torch.Tensor:
    """``RN(RN(w·x)·x + y)``: torch's ``y.addcmul(x, x, value=w)`` where it rounds so (measured
    by :func:`fma_fused_by_torch`), else :func:`fma`."""
    if fma_fused_by_torch(str(x.device), x.dtype):
        return y.addcmul(x, x, value=w)
    return fma(x * w, x, y)


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root of a float32 or float64 tensor (NaN for x < 0).

    torch's CPU ``sqrt`` is not correctly rounded (measured: about 0.7% of random float32 and
    0.9% of float64 inputs are one ulp off, torch 2.15 on AVX-512). float32 goes through float64:
    a float64 result within one ulp of √x rounds correctly to float32, since √x of a float32 x
    lies at least 2**-50 (relative) from every float32 midpoint. float64 picks, among s = sqrt(x)
    and its two neighbours, the one with the smallest exact residual |x − s²|.
    """
    if x.dtype != torch.float64:
        return x.double().sqrt_().to(x.dtype)
    s = x.sqrt()
    up = torch.nextafter(s, torch.full_like(s, torch.inf))
    down = torch.nextafter(s, torch.zeros_like(s))

    def residual(c: torch.Tensor) -> torch.Tensor:
        p, e = _two_prod(c, c)
        return ((x - p) - e).abs()

    r, ru, rd = residual(s), residual(up), residual(down)
    best = torch.where(ru < r, up, s)
    best = torch.where((rd < r) & (rd < ru), down, best)
    # 0, inf and NaN (and the subnormal range where the residual underflows) keep torch's value.
    ok = torch.isfinite(s) & (s > 2.0**-480) & (s < 2.0**480)
    return torch.where(ok, best, s)


@functools.cache
def fma_fused_by_torch(device: str, dtype: torch.dtype) -> bool:
    """Whether torch's ``add(x, alpha=a)`` and ``addcmul(value=...)`` round once on this device.

    Measured on inputs where one rounding and two roundings differ, long enough to cover the
    vectorised body and the scalar tail. When True, ``c.add(b, alpha=a)`` == fma(b, a, c) and
    ``c.addcmul(x, y, value=w)`` == fma(RN(w·x), y, c). (On the CPU of the development machine,
    torch 2.15: both fuse for float32 and float64.)
    """
    if torch.device(device).type == "meta":
        return True  # meta tensors hold no values: either answer computes the same nothing
    gen = torch.Generator().manual_seed(1234)
    n = 4099
    cd = dtype
    a = torch.randn(n, generator=gen, dtype=torch.float64).to(cd).to(device)
    b = torch.randn(n, generator=gen, dtype=torch.float64).to(cd).to(device)
    c = (torch.randn(n, generator=gen, dtype=torch.float64) * 1e-3).to(cd).to(device)
    w = 0.1
    ok_add = torch.equal(c.add(a, alpha=w), fma(a, torch.full_like(a, w), c))
    ok_cmul = torch.equal(c.addcmul(a, b, value=w), fma(a * w, b, c))
    return bool(ok_add and ok_cmul)
