"""Every CPU path of ``rustadam.Adam`` computes docs/NUMERICS.md bit for bit.

``backend="auto"`` (the Rust core), ``backend="torch"`` (per-parameter torch ops, what CUDA
tensors and subclasses that override a per-parameter method use) and ``backend="foreach"``
(``rustadam._foreach``) step identical copies of the same parameters with the same gradients;
after every step the parameters, ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) of the
three must be the same bits. Each path rounds a 16-bit weight decay to the storage dtype as
its own step, computes the moments and the update in float32 with fma where docs/NUMERICS.md has
one, and takes a correctly rounded square root, so parameters agree too, not only moments.

The 16-bit cases: a million elements, bfloat16 and float16, every decay mode
with λ = 0.1, lr = 0.5, both bias-correction forms, several steps. Gradients mix ordinary
values, exact zeros, float16 subnormals and large values, and change every step.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from rustadam import Adam, WeightDecay

BACKENDS = ("auto", "torch", "foreach")
DECAYS = {
    "none": lambda: WeightDecay(0.0),
    "L2": lambda: WeightDecay(0.1, weight_decouple=False),
    "decoupled": lambda: WeightDecay(0.1),
    "absolute": lambda: WeightDecay(0.1, absolute=True),
}
_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def _values(n, dtype, gen):
    """Random values of mixed magnitude: ordinary, zeros, tiny (float16 subnormal), large."""
    real = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
    shape = (n // 2, 2) if dtype.is_complex else (n,)
    x = torch.randn(shape, generator=gen, dtype=real)
    k = x.shape[0] // 8
    x[:k] = 0.0
    x[k : 2 * k] *= 1e-6
    x[2 * k : 3 * k] *= 30.0
    x[3 * k : 4 * k] *= 1e-3
    perm = torch.randperm(x.shape[0], generator=gen)
    x = x[perm]
    if dtype.is_complex:
        return torch.view_as_complex(x.contiguous()).to(dtype)
    return x.to(dtype)


def _bits(t):
    """The tensor's bit pattern (complex as pairs of reals), so -0.0 and NaNs compare exactly."""
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous().view(_BITS[t.dtype])


def _describe(name, ref, other, backend):
    a, b = _bits(ref).flatten(), _bits(other).flatten()
    diff = (a != b).nonzero().flatten()
    i = int(diff[0])
    ra = torch.view_as_real(ref) if ref.is_complex() else ref
    rb = torch.view_as_real(other) if other.is_complex() else other
    return (
        f"{name}: backend={backend!r} differs from the Rust core at {diff.numel()} of "
        f"{a.numel()} elements; first at {i}: {ra.flatten()[i].item()!r} (core) vs "
        f"{rb.flatten()[i].item()!r}"
    )


def _check_paths_agree(dtype, n, decay, optimized, steps=4, lr=0.5, **opts):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype} {decay} {optimized}".encode()))
    p0 = _values(n, dtype, gen)
    runs = {}
    for backend in BACKENDS:
        p = p0.clone()
        opt = Adam([p], lr=lr, weight_decay=DECAYS[decay](), optimized_update=optimized,
                   backend=backend, **opts)  # fmt: skip
        runs[backend] = (p, opt)
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if opts.get("amsgrad") else [])
    for step in range(1, steps + 1):
        g = _values(n, dtype, gen)
        for p, opt in runs.values():
            p.grad = g.clone()
            opt.step()
        ref_p, ref_opt = runs["auto"]
        ref = {"param": ref_p, **{k: ref_opt.state[ref_p][k] for k in keys}}
        bad = []
        for backend in BACKENDS[1:]:
            p, opt = runs[backend]
            assert opt.state[p]["step"] == step
            got = {"param": p, **{k: opt.state[p][k] for k in keys}}
            for name in ref:
                if not torch.equal(_bits(ref[name]), _bits(got[name])):
                    bad.append(_describe(name, ref[name], got[name], backend))
        assert not bad, f"step {step}:\n" + "\n".join(bad)


@pytest.mark.parametrize("optimized", [True, False])
@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_paths_agree_on_a_million_elements(dtype, decay, optimized):
    _check_paths_agree(dtype, 1_000_000, decay, optimized)


@pytest.mark.parametrize("optimized", [True, False])
@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_wide_paths_agree(dtype, decay, optimized):
    _check_paths_agree(dtype, 200_000, decay, optimized)


@pytest.mark.parametrize(
    "opts",
    [
        dict(maximize=True),
        dict(amsgrad=True),
        dict(maximize=True, amsgrad=True),
    ],
    ids=["maximize", "amsgrad", "maximize+amsgrad"],
)
@pytest.mark.parametrize("optimized", [True, False])
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.complex64]
)
def test_paths_agree_with_maximize_and_amsgrad(dtype, optimized, opts):
    n = 1_000_000 if dtype in (torch.bfloat16, torch.float16) else 100_000
    decay = "L2" if opts.get("maximize") else "decoupled"
    _check_paths_agree(dtype, n, decay, optimized, **opts)
