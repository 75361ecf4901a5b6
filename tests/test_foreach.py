"""The foreach path (``rustadam._foreach.foreach_adam``) and the rounding helpers.

Oracles: the float64 oracle of tests/oracle.py (explicit tolerances), exact rational arithmetic
for fma/sqrt, and the Rust core through ``rustadam.Adam(backend="rust")`` bit for bit.
"""

from __future__ import annotations

import types
from fractions import Fraction

import numpy as np
import pytest
import torch

from oracle import AdamOracle
from rustadam import Adam, WeightDecay, _rounding
from rustadam._foreach import foreach_adam
from rustadam.optimizer import _param_seed

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]
DECAYS = {
    "none": dict(weight_decay=0.0),
    "L2": dict(weight_decay=0.1, weight_decouple=False),
    "decoupled": dict(weight_decay=0.1),
    "absolute": dict(weight_decay=0.01, absolute=True),
}
SHAPES = [(9, 7), (5,), (), (0,), (130,)]


def cfg(**kw):
    d = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, weight_decouple=True,
             absolute=False, optimized_update=True, maximize=False, amsgrad=False,
             rounding="nearest")  # fmt: skip
    d.update(kw)
    return types.SimpleNamespace(**d)


def rand(shape, dtype, gen):
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def real(t):
    return torch.view_as_real(t) if t.is_complex() else t


class State:
    """Parameters and states for foreach_adam, steps counted per tensor."""

    def __init__(self, params, c, seed=0):
        self.p = params
        # Adam's convention: parameter i of group 0 of an Adam(seed=seed) rounds with this seed.
        self.seeds = [_param_seed(seed, 0, i) for i in range(len(params))]
        self.m = [torch.zeros_like(x) for x in params]
        self.v = [torch.zeros_like(x) for x in params]
        self.vmax = [torch.zeros_like(x) for x in params] if c.amsgrad else None
        self.comp = [torch.zeros_like(x) for x in params] if c.rounding == "kahan" else None
        self.t = [0] * len(params)
        self.c = c

    def step(self, grads, **kw):
        self.t = [t + 1 for t in self.t]
        foreach_adam(self.p, grads, self.m, self.v, self.vmax, self.comp, self.t, self.seeds,
                     self.c, **kw)  # fmt: skip


# ---- against the float64 oracle -----------------------------------------------------------------


@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("optimized", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_oracle(decay, optimized, dtype):
    gen = torch.Generator().manual_seed(0)
    d = DECAYS[decay]
    c = cfg(optimized_update=optimized, **d)
    p0 = [rand(s, dtype, gen) for s in SHAPES]
    grads = [[rand(s, dtype, gen) for s in SHAPES] for _ in range(5)]
    st = State([x.clone() for x in p0], c)
    oracle = AdamOracle(
        [{"params": [x.double().numpy() for x in p0], "lr": c.lr, "betas": (c.beta1, c.beta2),
          "eps": c.eps, "weight_decay": c.weight_decay}],
        optimized_update=optimized, weight_decouple=c.weight_decouple, absolute=c.absolute,
    )  # fmt: skip
    for gs in grads:
        st.step(gs)
        oracle.step([[g.double().numpy() for g in gs]])
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for x, ref in zip(st.p, oracle.params[0]):
        np.testing.assert_allclose(x.double().numpy(), ref, **tol)


# ---- bit for bit with the Rust core -------------------------------------------------------------


def _core_vs_foreach(dtype, c, steps=4, seed=0):
    gen = torch.Generator().manual_seed(1)
    p0 = [rand(s, dtype, gen) for s in SHAPES]
    grads = [[rand(s, dtype, gen) for s in SHAPES] for _ in range(steps)]
    pr = [x.clone() for x in p0]
    extra = {}
    if c.maximize:
        extra["maximize"] = True
    if c.amsgrad:
        extra["amsgrad"] = True
    if c.rounding != "nearest":
        extra["rounding"] = c.rounding
    opt = Adam(pr, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps,
               weight_decay=WeightDecay(c.weight_decay, c.weight_decouple, c.absolute),
               optimized_update=c.optimized_update, backend="rust", seed=seed,
               **extra)  # fmt: skip
    st = State([x.clone() for x in p0], c, seed=seed)
    for gs in grads:
        for x, g in zip(pr, gs):
            x.grad = g.clone()
        opt.step()
        st.step([g.clone() for g in gs])
    for i, x in enumerate(pr):
        s = opt.state[x]
        assert torch.equal(real(x), real(st.p[i])), ("param", i)
        assert torch.equal(real(s["exp_avg"]), real(st.m[i])), ("exp_avg", i)
        assert torch.equal(real(s["exp_avg_sq"]), real(st.v[i])), ("exp_avg_sq", i)
        if c.amsgrad:
            assert torch.equal(real(s["max_exp_avg_sq"]), real(st.vmax[i]))
        if "compensation" in s:
            assert torch.equal(s["compensation"], st.comp[i]), ("compensation", i)


@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("optimized", [True, False])
@pytest.mark.parametrize("eps", [1e-8, 0.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_for_bit_with_rust_core(dtype, decay, optimized, eps):
    _core_vs_foreach(dtype, cfg(optimized_update=optimized, eps=eps, **DECAYS[decay]))


@pytest.mark.parametrize(
    "extra",
    [
        dict(maximize=True),
        dict(amsgrad=True),
        dict(amsgrad=True, optimized_update=False),
        dict(rounding="stochastic"),
        dict(rounding="kahan"),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_for_bit_with_rust_core_extended_modes(dtype, extra):
    """maximize, AMSGrad (both forms), stochastic (Adam's per-parameter seeds) and Kahan."""
    _core_vs_foreach(dtype, cfg(**extra))


@pytest.mark.parametrize("seed", [1, 2**40 + 7, 2**64 - 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_uses_adams_seed_convention(dtype, seed):
    _core_vs_foreach(dtype, cfg(rounding="stochastic", weight_decay=0.1), seed=seed)


# ---- properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_different_step_counts_in_one_call_equal_separate_calls(dtype):
    gen = torch.Generator().manual_seed(2)
    c = cfg(weight_decay=0.1, optimized_update=False, amsgrad=True)
    ps = [rand(s, dtype, gen) for s in SHAPES]
    gs = [rand(s, dtype, gen) for s in SHAPES]
    ms = [rand(s, dtype, gen) for s in SHAPES]
    vs = [real(rand(s, dtype, gen)).abs() for s in SHAPES]
    vs = [torch.view_as_complex(v) if dtype.is_complex else v for v in vs]
    steps = [1, 7, 3, 2, 1000]
    a = [[x.clone() for x in lst] for lst in (ps, ms, vs, vs)]
    foreach_adam(a[0], gs, a[1], a[2], a[3], None, steps, [0] * 5, c)
    for i in range(len(ps)):
        b = [lst[i].clone() for lst in (ps, ms, vs, vs)]
        foreach_adam([b[0]], [gs[i]], [b[1]], [b[2]], [b[3]], None, [steps[i]], [0], c)
        for x, y in zip((lst[i] for lst in a), b):
            assert torch.equal(real(x), real(y))


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_scale_and_found_inf(dtype):
    gen = torch.Generator().manual_seed(3)
    c = cfg(weight_decay=0.1, amsgrad=True)
    ps = [rand(s, dtype, gen) for s in SHAPES]
    gs = [rand(s, dtype, gen) for s in SHAPES]
    scale = torch.tensor([8.0])
    a = State([x.clone() for x in ps], c)
    b = State([x.clone() for x in ps], c)
    a.step([g * 8 for g in gs], grad_scale=scale, found_inf=torch.tensor([0.0]))
    b.step(gs)
    for x, y in zip(a.p, b.p):
        assert torch.equal(real(x), real(y))
    # a found_inf step changes nothing at all
    before = [[x.clone() for x in lst] for lst in (a.p, a.m, a.v, a.vmax)]
    inf_grads = [g.clone().fill_(float("inf")) for g in gs]
    a.step(inf_grads, grad_scale=scale, found_inf=torch.tensor([1.0]))
    for old, new in zip(before, (a.p, a.m, a.v, a.vmax)):
        for x, y in zip(old, new):
            assert torch.equal(real(x), real(y))


def test_maximize_is_minimizing_the_negated_gradient():
    gen = torch.Generator().manual_seed(4)
    ps = [rand(s, torch.float32, gen) for s in SHAPES]
    gs = [rand(s, torch.float32, gen) for s in SHAPES]
    a = State([x.clone() for x in ps], cfg(maximize=True))
    b = State([x.clone() for x in ps], cfg())
    a.step(gs)
    b.step([-g for g in gs])
    assert all(torch.equal(x, y) for x, y in zip(a.p, b.p))


def test_kahan_and_stochastic_leave_32_and_64_bit_as_nearest():
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64, torch.complex64):
        ps = [rand(s, dtype, gen) for s in SHAPES]
        gs = [rand(s, dtype, gen) for s in SHAPES]
        ref = State([x.clone() for x in ps], cfg())
        ref.step(gs)
        for mode in ("stochastic", "kahan"):
            st = State([x.clone() for x in ps], cfg(rounding=mode))
            if st.comp is not None:
                st.comp = [None] * len(ps)
            st.step(gs)
            assert all(torch.equal(real(x), real(y)) for x, y in zip(st.p, ref.p))


def test_kahan_accumulates_updates_below_half_an_ulp():
    # lr far below bf16's resolution at 1.0: nearest never moves, Kahan does on average.
    c = dict(lr=1e-4, eps=0.0)
    near = State([torch.ones(256, dtype=torch.bfloat16)], cfg(**c))
    kahan = State([torch.ones(256, dtype=torch.bfloat16)], cfg(rounding="kahan", **c))
    g = [torch.ones(256, dtype=torch.bfloat16)]
    for _ in range(50):
        near.step(g)
        kahan.step(g)
    assert torch.equal(near.p[0], torch.ones(256, dtype=torch.bfloat16))
    assert (kahan.p[0].float() + kahan.comp[0].float()).mean().item() == pytest.approx(
        1 - 50 * 1e-4, rel=1e-3
    )


# ---- stochastic rounding ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_is_a_neighbour_unbiased_and_deterministic(dtype):
    gen = torch.Generator().manual_seed(6)
    # normal values and, for float16, subnormal ones
    x = torch.randn(4000, generator=gen) * torch.tensor([1.0, 3e-6]).repeat(2000)
    idx = torch.arange(x.numel())
    r = _rounding.stochastic_round(x, dtype, seed=11, step=3, index=idx)
    assert torch.equal(r, _rounding.stochastic_round(x, dtype, seed=11, step=3, index=idx))
    assert not torch.equal(r, _rounding.stochastic_round(x, dtype, seed=12, step=3, index=idx))
    # the two neighbours of x in dtype: nearest and the adjacent bit pattern on x's other side
    near = x.to(dtype)
    bits = near.view(torch.int16)
    cands = torch.stack([near, (bits - 1).view(dtype), (bits + 1).view(dtype)]).float()
    below = torch.where(cands <= x, cands, -torch.inf).max(0).values
    above = torch.where(cands >= x, cands, torch.inf).min(0).values
    ok = (r.float() == below) | (r.float() == above)
    assert ok.all()
    # unbiased: averaging many roundings of one value recovers it
    v = torch.full((200_000,), 1.0 + 2.0**-9, dtype=torch.float32)  # 1/4 of a bf16 ulp above 1
    rr = _rounding.stochastic_round(v, dtype, 1, 1, torch.arange(v.numel())).float()
    assert rr.mean().item() == pytest.approx(
        v[0].item(), rel=2e-5 if dtype == torch.bfloat16 else 1e-6
    )
    # non-finite values round to nearest
    z = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0])
    out = _rounding.stochastic_round(z, dtype, 1, 1, torch.arange(4))
    assert out[:2].tolist() == [float("inf"), -float("inf")] and out[2].isnan()
    assert torch.signbit(out[3])


def test_hash_matches_the_integer_reference():
    xs = [0, 1, 2, 0xFFFFFFFF, 0x12345678, 1 << 31]
    assert _rounding.mix(torch.tensor(xs)).tolist() == [_rounding.mix_int(x) for x in xs]
    assert _rounding.mix_int(0) == 0
    k = _rounding.key(2**40 + 5, 7)
    expect = _rounding.mix_int(_rounding.mix_int(_rounding.mix_int(5) ^ 256) ^ 7)
    assert k == expect
    idx = torch.tensor([0, 1, 2**33 + 3])
    assert _rounding.hash_index(k, idx).tolist() == [
        _rounding.mix_int(k ^ _rounding.mix_int(i & 0xFFFFFFFF)) for i in idx.tolist()
    ]


def test_element_index_is_memory_offset_for_dense_and_row_major_otherwise():
    x = torch.empty(3, 4).t()  # dense, transposed
    assert torch.equal(_rounding.element_index(x), torch.arange(12).view(3, 4).t())
    y = torch.empty(4, 6)[:, ::2]  # not dense
    assert torch.equal(_rounding.element_index(y), torch.arange(12).view(4, 3))
    assert _rounding.element_index(torch.empty(())).item() == 0
    assert _rounding.element_index(torch.empty(0, 3)).shape == (0, 3)
    cl = torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last)
    i = _rounding.element_index(cl)
    assert sorted(i.flatten().tolist()) == list(range(cl.numel()))
    assert i[0, 1, 0, 0].item() == 1  # channels are adjacent in memory


# ---- exact arithmetic helpers -------------------------------------------------------------------


def _correctly_rounded(exact: Fraction, got: float, dtype) -> bool:
    np_t = np.float32 if dtype == torch.float32 else np.float64
    g = np_t(got)
    lo, hi = np.nextafter(g, np_t(-np.inf)), np.nextafter(g, np_t(np.inf))
    return (
        (Fraction(float(lo)) + Fraction(float(g))) / 2
        <= exact
        <= (Fraction(float(hi)) + Fraction(float(g))) / 2
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fma_emulation_and_sqrt_rn_are_correctly_rounded(dtype):
    gen = torch.Generator().manual_seed(7)
    n = 600
    a = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    c = (torch.randn(n, generator=gen, dtype=torch.float64) * 1e-3).to(dtype)
    f = _rounding.fma(a, b, c)
    for x, y, z, r in zip(a.tolist(), b.tolist(), c.tolist(), f.tolist()):
        assert _correctly_rounded(Fraction(x) * Fraction(y) + Fraction(z), r, dtype)
    v = (torch.rand(n, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
    s = _rounding.sqrt_rn(v)
    for x, r in zip(v.tolist(), s.tolist()):
        np_t = np.float32 if dtype == torch.float32 else np.float64
        g = np_t(r)
        lo, hi = np.nextafter(g, np_t(-np.inf)), np.nextafter(g, np_t(np.inf))
        ml = (Fraction(float(lo)) + Fraction(float(g))) / 2
        mh = (Fraction(float(hi)) + Fraction(float(g))) / 2
        assert ml * ml <= Fraction(x) <= mh * mh


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_cpu_add_alpha_and_addcmul_are_fused(dtype):
    """Documents what the foreach path relies on, with a fallback where it is False."""
    assert _rounding.fma_fused_by_torch("cpu", dtype)


@pytest.mark.parametrize("backend", ["torch", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_without_torchs_fused_ops_the_emulated_fma_gives_the_same_bits(monkeypatch, backend, dtype):
    """Where torch's add(alpha=)/addcmul do not round once (some devices), the paths use the
    emulated fma: the numbers must not change."""

    def run() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(3)
        p = torch.nn.Parameter(torch.randn(3000, generator=gen, dtype=torch.float64).to(dtype))
        opt = Adam([p], lr=0.5, eps=1e-8, backend=backend,
                   weight_decay=WeightDecay(0.1, weight_decouple=False))  # fmt: skip
        for _ in range(3):
            p.grad = torch.randn(3000, generator=gen, dtype=torch.float64).to(dtype)
            opt.step()
        s = opt.state[p]
        return [p.detach().clone(), s["exp_avg"].clone(), s["exp_avg_sq"].clone()]

    fused = run()
    monkeypatch.setattr(_rounding, "fma_fused_by_torch", lambda device, dtype: False)
    emulated = run()
    for a, b in zip(fused, emulated):
        assert torch.equal(a, b)
