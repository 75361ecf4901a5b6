"""Every dtype and layout a model has, on the Rust path, against the float64 oracle.

Each step is checked on its own: from the optimizer's own state before the step, the oracle
computes the step in float64 (float32 and float64 tensors) or in float32 rounded once to the
stored dtype (bfloat16 and float16, as docs/NUMERICS.md says they are computed).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rustadam import Adam, WeightDecay, _core

HALF = (torch.bfloat16, torch.float16)
DTYPES = [
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    torch.complex64,
    torch.complex128,
]
LAYOUTS = ["contiguous", "channels_last", "permuted", "sliced", "grad_transposed", "size1"]


def make_param(shape: tuple[int, ...], dtype: torch.dtype, layout: str, gen: torch.Generator):
    """A parameter of `shape` in `layout`; also returns how to lay out its gradients."""

    def rand(*s):
        real = torch.randn(s, generator=gen, dtype=torch.float64)
        if dtype.is_complex:
            real = torch.complex(real, torch.randn(s, generator=gen, dtype=torch.float64))
        return real.to(dtype)

    if layout == "channels_last":
        return rand(*shape).contiguous(memory_format=torch.channels_last)
    if layout == "permuted":
        # Dense, but not contiguous: the reversed dimension order.
        return rand(*reversed(shape)).permute(tuple(reversed(range(len(shape)))))
    if layout == "sliced":
        # Every other column of a bigger tensor: not dense, must be stepped in place.
        return rand(*shape[:-1], 2 * shape[-1])[..., ::2] if shape else rand(*shape)
    if layout == "size1":
        return odd_size1_strides(rand(*shape))
    return rand(*shape)


def odd_size1_strides(t: torch.Tensor) -> torch.Tensor:
    """The same tensor with arbitrary strides on its size-1 dimensions (they place nothing)."""
    strides = [97 if n == 1 else s for n, s in zip(t.shape, t.stride())]
    return t.as_strided(t.shape, strides)


def make_grad(param: torch.Tensor, layout: str, gen: torch.Generator, zero_frac: float):
    g = torch.randn(param.shape, generator=gen, dtype=torch.float64)
    if param.dtype.is_complex:
        g = torch.complex(g, torch.randn(param.shape, generator=gen, dtype=torch.float64))
    mask = torch.rand(param.shape, generator=gen) < zero_frac
    g = torch.where(mask, torch.zeros_like(g), g).to(param.dtype)
    if layout == "grad_transposed" and param.dim() >= 2:
        # Same values, other strides than the param (as DDP bucket views can have).
        g = g.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "size1":
        g = odd_size1_strides(g.clone())
    return g


def as_real64(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.to(torch.float64).numpy().copy()


def oracle_step(p, g, m, v, t, lr, betas, eps, wd, mode, optimized, compute, store=None):
    """The per-parameter step of docs/NUMERICS.md on numpy arrays in `compute` precision.

    `store` rounds the weight decay's result to the stored dtype (docs/NUMERICS.md: the decay is
    its own step in the tensor's dtype); None for float32/float64. Also returns the magnitudes the
    rounding errors scale with: of the terms summed into m and
    v, and of the step computed from them.
    """
    b1, b2 = betas
    p, g, m, v = (np.asarray(x, dtype=compute) for x in (p, g, m, v))
    c = compute.type
    g_mag = np.abs(g)
    store = store or (lambda x: x)
    if mode == "l2" and wd != 0:
        g = store(g + c(wd) * p)
        g_mag = g_mag + np.abs(c(wd) * p)
    elif mode == "decoupled":
        p = store(p * c(1.0 - lr * wd))
    elif mode == "absolute":
        p = store(p * c(1.0 - wd))
    m_mag = np.abs(c(b1) * m) + c(1.0 - b1) * g_mag
    v_mag = np.abs(c(b2) * v) + c(1.0 - b2) * g_mag * g_mag
    m = c(b1) * m + c(1.0 - b1) * g
    v = c(b2) * v + c(1.0 - b2) * g * g
    bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if optimized:
            size, denom = c(lr * math.sqrt(bc2) / bc1), np.sqrt(v) + c(eps)
        else:
            size, denom = c(lr / bc1), np.sqrt(v) / c(math.sqrt(bc2)) + c(eps)
        p_new = p - size * m / denom
        step_mag = np.abs(size * m_mag / denom)
    return p_new, m, v, (m_mag, v_mag, step_mag)


def ulp(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """One unit in the last place of `x` in the stored dtype (real part type)."""
    bits = {
        torch.float32: 23,
        torch.complex64: 23,
        torch.float64: 52,
        torch.complex128: 52,
        torch.bfloat16: 7,
        torch.float16: 10,
    }[dtype]
    tiny = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}.get(dtype, 0.0)
    ax = np.abs(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.floor(np.log2(np.where((ax > 0) & np.isfinite(ax), ax, 1.0)))
    return np.maximum(2.0 ** (e - bits), tiny)


def within(got: np.ndarray, want: np.ndarray, tol: np.ndarray) -> bool:
    """Equal (infinities included) or within `tol`; NaN only where the oracle has NaN."""
    with np.errstate(invalid="ignore"):
        ok = (got == want) | (np.abs(got - want) <= tol) | (np.isnan(got) & np.isnan(want))
    return bool(np.all(ok))


def check_step(before, after, dtype, hp, backend):
    """`after` (either path) against the oracle run on `before`, with per-dtype tolerances."""
    p0, g, m0, v0, t = before
    p1, m1, v1 = after
    if dtype in HALF:
        # float32 computation, one rounding to the stored dtype: within one unit in its last place.
        # The decay is its own step, rounded to the stored dtype, on every path (docs/NUMERICS.md).
        def store(x):
            t16 = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(dtype)
            return as_real64(t16).astype(np.float32)

        extra = 0.0
        op, om, ov, _ = oracle_step(
            p0, g, m0, v0, t, **hp, compute=np.dtype(np.float32), store=store
        )
        for name, got, want, more in (
            ("param", p1, op, extra),
            ("exp_avg", m1, om, 0.0),
            ("exp_avg_sq", v1, ov, 0.0),
        ):
            rounded = as_real64(torch.from_numpy(np.asarray(want, dtype=np.float32)).to(dtype))
            assert within(got, rounded, ulp(rounded, dtype) + more), (name, got, rounded)
        return
    op, om, ov, (m_mag, v_mag, step_mag) = oracle_step(
        p0, g, m0, v0, t, **hp, compute=np.dtype(np.float64)
    )
    single = dtype in (torch.float32, torch.complex64)
    u = 2.0**-24 if single else 2.0**-53
    # Results below the smallest subnormal flush to zero.
    floor = 4 * (2.0**-149 if single else 5e-324)
    # A handful of roundings, each at most u relative to the magnitudes summed; θ also rounds
    # twice itself (decay, update).
    assert within(m1, om, 8 * u * m_mag + floor), "exp_avg"
    assert within(v1, ov, 8 * u * v_mag + floor), "exp_avg_sq"
    assert within(p1, op, 2 * ulp(op, dtype) + 32 * u * step_mag + floor), "param"


def run_and_check(shape, dtype, layout, hp, steps, seed, backend="rust"):
    gen = torch.Generator().manual_seed(seed)
    mode = hp["mode"]
    wd = WeightDecay(hp["wd"], weight_decouple=mode != "l2", absolute=mode == "absolute")
    param = make_param(shape, dtype, layout, gen)
    strides_before = param.stride()
    opt = Adam(
        [param],
        lr=hp["lr"],
        betas=hp["betas"],
        eps=hp["eps"],
        weight_decay=wd,
        optimized_update=hp["optimized"],
        backend=backend,
    )
    for t in range(1, steps + 1):
        param.grad = make_grad(param, layout, gen, zero_frac=0.3)
        state = opt.state[param]
        m0 = as_real64(state["exp_avg"]) if state else np.zeros_like(as_real64(param))
        v0 = as_real64(state["exp_avg_sq"]) if state else np.zeros_like(as_real64(param))
        before = (as_real64(param), as_real64(param.grad), m0, v0, t)
        opt.step()
        assert state["step"] == t
        after = (as_real64(param), as_real64(state["exp_avg"]), as_real64(state["exp_avg_sq"]))
        args = {k: hp[k] for k in ("lr", "betas", "eps", "wd", "mode", "optimized")}
        check_step(before, after, dtype, args, backend)
    # Stepping in place: the user's tensor keeps its layout and what it aliases.
    assert param.stride() == strides_before
    return param, opt


hyper = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-4, 1e-1),
        "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.9999)),
        "eps": st.sampled_from([1e-16, 1e-8, 1e-3]),
        "wd": st.sampled_from([0.0, 1e-2, 0.1]),
        "mode": st.sampled_from(["decoupled", "l2", "absolute"]),
        "optimized": st.booleans(),
    }
)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


# Derandomized so CI is reproducible; RUSTADAM_PROPERTY_EXAMPLES=5000 searches wider by hand.
@settings(
    max_examples=int(os.environ.get("RUSTADAM_PROPERTY_EXAMPLES", "300")),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    hp=hyper,
    steps=st.integers(1, 3),
    seed=st.integers(0, 2**31),
    backend=st.sampled_from(["rust", "torch"]),
)
def test_property_both_paths_match_oracle(shape, dtype, layout, hp, steps, seed, backend):
    if layout == "channels_last" and len(shape) != 4:
        layout = "contiguous"
    run_and_check(shape, dtype, layout, hp, steps, seed, backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_dtype_and_layout_takes_the_rust_path(dtype, layout, monkeypatch):
    """backend="rust" raises for anything the core cannot take: passing means the core took it."""
    shape = {"channels_last": (2, 3, 4, 5), "size1": (3, 1, 4)}.get(layout, (3, 4))
    calls = []
    real = _core.plan
    monkeypatch.setattr(_core, "plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    hp = {
        "lr": 1e-2,
        "betas": (0.9, 0.999),
        "eps": 1e-16,
        "wd": 0.01,
        "mode": "decoupled",
        "optimized": True,
    }
    run_and_check(shape, dtype, layout, hp, steps=2, seed=1)
    assert calls, "the Rust core was never called"


@pytest.mark.parametrize("shape", [(), (1,), (0,), (0, 3), (1, 1, 1)])
def test_empty_zero_dim_and_one_element(shape):
    hp = {
        "lr": 1e-2,
        "betas": (0.9, 0.999),
        "eps": 1e-16,
        "wd": 0.1,
        "mode": "l2",
        "optimized": False,
    }
    for dtype in DTYPES:
        run_and_check(shape, dtype, "contiguous", hp, steps=2, seed=3)


def test_float16_zero_gradient_is_a_zero_update_on_both_paths():
    for backend in ("rust", "torch"):
        p = torch.full((64,), 0.5, dtype=torch.float16)
        opt = Adam([p], backend=backend)  # eps=1e-16 rounds to 0 in float16
        p.grad = torch.zeros_like(p)
        opt.step()
        assert torch.equal(p, torch.full((64,), 0.5, dtype=torch.float16)), backend
        assert not torch.isnan(opt.state[p]["exp_avg"]).any()


def test_mixed_dtype_group_is_one_call(monkeypatch):
    params = [
        torch.randn(5, dtype=d)
        for d in (torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.complex64)
    ]
    opt = Adam(params, backend="rust")
    calls = []
    real = _core.plan

    def plan(*a, **k):
        result = real(*a, **k)
        calls.append(len(result))
        return result

    monkeypatch.setattr(_core, "plan", plan)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert calls == [len(params)]


@pytest.mark.parametrize("backend", ["auto", "rust", "torch"])
def test_gradient_of_another_dtype_is_an_error_naming_the_parameter(backend):
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    p.grad.data = p.grad.data.double()  # torch's own assignment check is bypassed this way
    opt = Adam([p], backend=backend)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\].*dtype"):
        opt.step()
    assert not opt.state[p] or opt.state[p]["step"] == 0


def paths_agree(model_fn, inputs_fn, steps=5, **kw):
    """Trains two copies of a model, one per backend, on the same data; returns both."""
    torch.manual_seed(0)
    a = model_fn()
    b = model_fn()
    b.load_state_dict(a.state_dict())
    opts = [Adam(a.parameters(), backend="rust", **kw), Adam(b.parameters(), backend="torch", **kw)]
    for _ in range(steps):
        x, y = inputs_fn()
        for model, opt in zip((a, b), opts):
            opt.zero_grad()
            loss = (model(x) - y).abs().pow(2).mean()
            loss.backward()
            opt.step()
    return a, b


def test_channels_last_conv_model_trains_like_the_torch_path():
    def model():
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        return m.to(memory_format=torch.channels_last)

    def data():
        x = torch.randn(4, 3, 10, 10).to(memory_format=torch.channels_last)
        return x, torch.randn(4, 4, 6, 6)

    a, b = paths_agree(model, data, lr=1e-2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert pa.is_contiguous(memory_format=torch.channels_last) or pa.dim() != 4
        # float32: the paths differ only where torch's float32 sqrt is 1 ulp off; 5 steps.
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_complex_model_trains_like_the_torch_path():
    def model():
        return torch.nn.Linear(6, 3, dtype=torch.complex64)

    def data():
        return torch.randn(8, 6, dtype=torch.complex64), torch.randn(8, 3, dtype=torch.complex64)

    a, b = paths_agree(model, data, lr=1e-2, weight_decay=WeightDecay(0.01))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_paths_agree_bit_for_bit_where_the_operations_are_the_same(dtype):
    """The moments are the same operations on both paths; the parameter too, except that
    torch's CPU sqrt is not always correctly rounded (see the README). 16-bit types compute in
    float32 and round once, which hides that difference."""
    torch.manual_seed(0)
    p = torch.randn(10_000).to(dtype)
    q = p.clone()
    o1, o2 = Adam([p], lr=1e-2, backend="rust"), Adam([q], lr=1e-2, backend="torch")
    for _ in range(3):
        g = torch.randn(10_000).to(dtype)
        p.grad, q.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(o1.state[p][key], o2.state[q][key]), key
    if dtype in (torch.float32, torch.float64):
        # torch's CPU sqrt (float32 and float64) can be one ulp off; per step that moves θ by
        # at most one ulp of θ plus a few ulps of the step (≈ lr).
        eps = torch.finfo(dtype).eps
        tol = 3 * (eps * q.abs() + 4 * eps * 1e-2)
        assert ((p - q).abs() <= tol).all()
    else:
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", ["auto", "rust", "torch"])
def test_conjugate_view_param_is_an_error_naming_it(backend):
    p = torch.randn(3, dtype=torch.complex64).conj()
    p.grad = torch.randn(3, dtype=torch.complex64)
    before = p.resolve_conj().clone()
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\].*conjugate view"):
        Adam([p], backend=backend).step()
    assert torch.equal(p.resolve_conj(), before)


def test_conjugate_view_gradient_is_read_as_its_values():
    p, q = torch.randn(4, dtype=torch.complex64), None
    q = p.clone()
    g = torch.randn(4, dtype=torch.complex64)
    p.grad, q.grad = g.conj(), g.conj().resolve_conj()
    for backend in ("auto", "torch"):
        a, b = p.clone(), q.clone()
        a.grad, b.grad = p.grad, q.grad
        Adam([a], backend=backend).step()
        Adam([b], backend=backend).step()
        assert torch.equal(a, b), backend


def test_a_bare_number_as_weight_decay_is_decoupled_decay():
    """A number means WeightDecay(number): decoupled, as AdamW (timm's factories pass one)."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt_a = Adam([a], lr=0.1, weight_decay=0.01)
    opt_b = Adam([b], lr=0.1, weight_decay=WeightDecay(0.01))
    assert opt_a.weight_decay == WeightDecay(0.01)
    for p, opt in ((a, opt_a), (b, opt_b)):
        p.grad = torch.full((3,), 0.5)
        opt.step()
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"^Invalid weight_decay value: -1$"):
        Adam([torch.zeros(2)], weight_decay=-1)


# ---- each buffer laid out on its own ------------------------------------------------------------

BUFFER_LAYOUTS = ("contiguous", "transposed", "every_other")


def _laid_out(values: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` in a tensor of layout ``how``, and the memory that tensor lives in."""
    if how == "contiguous":
        t = values.clone()
        return t, t
    if how == "transposed":
        t = values.t().contiguous().t()
        return t, t
    big = torch.zeros(values.shape[0], 2 * values.shape[1], dtype=values.dtype)
    t = big[:, ::2]
    t.copy_(values)
    return t, big


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = torch.view_as_real(t) if t.is_complex() else t
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize(
    "dtype, rounding",
    [
        (torch.float32, "nearest"),
        (torch.bfloat16, "nearest"),
        (torch.bfloat16, "stochastic"),
        (torch.complex64, "nearest"),
    ],
)
def test_each_buffer_in_its_own_layout_steps_like_the_torch_path(dtype, rounding):
    """Parameter, gradient, exp_avg and exp_avg_sq each contiguous, transposed or a non-dense
    view: the core steps in place what lies in the parameter's order and copies the rest; every
    combination gives the torch path's bits and leaves the memory around a view untouched."""
    gen = torch.Generator().manual_seed(0)

    def rnd(positive=False):
        x = torch.randn(6, 5, 2, generator=gen, dtype=torch.float64)
        x = x.abs() if positive else x
        if dtype.is_complex:
            return torch.view_as_complex(x.float().contiguous()).to(dtype)
        return x[..., 0].to(dtype)

    values = {"p": rnd(), "g": rnd(), "m": rnd(), "v": rnd(positive=True)}
    combos = [(a, b, c, d) for a in BUFFER_LAYOUTS for b in BUFFER_LAYOUTS
              for c in BUFFER_LAYOUTS for d in BUFFER_LAYOUTS]  # fmt: skip
    for combo in combos:
        results = {}
        for backend in ("rust", "torch"):
            made = {k: _laid_out(values[k], how) for k, how in zip("pgmv", combo)}
            p = torch.nn.Parameter(made["p"][0], requires_grad=True)
            p.grad = made["g"][0]
            opt = Adam([p], lr=0.1, eps=1e-8, weight_decay=0.1, backend=backend,
                       rounding=rounding, seed=5)  # fmt: skip
            opt.state[p] = {"step": 2, "exp_avg": made["m"][0], "exp_avg_sq": made["v"][0]}
            for _ in range(2):
                opt.step()
            results[backend] = made
        for k in "pmv":
            rust, torch_ = results["rust"][k][1], results["torch"][k][1]
            assert torch.equal(_bits(rust), _bits(torch_)), f"{dtype} {rounding} {combo}: {k}"
