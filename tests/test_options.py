"""maximize, amsgrad, group options, a number as weight_decay and validation.

Oracles:

- ``torch.optim.Adam`` / ``AdamW``, which are rustadam with ``optimized_update=False`` and the
  same eps: ``WeightDecay(λ, weight_decouple=False)`` is Adam's ``weight_decay=λ`` (L2) and
  ``WeightDecay(λ)`` is AdamW's. torch's CPU sqrt is not correctly rounded and rustadam's is, so
  float32 agrees to a few ulps per step (of max(|θ|, α), the scale of one update) and float64 to
  ~1e-12 relative, over 60 steps;
- the float64 oracle of tests/oracle.py, extended here with AMSGrad's running maximum and
  maximize (−g before the weight decay), for the optimized form (and the textbook one);
- rustadam itself: a group's options must give bit for bit what a separate optimizer with those
  options gives.

Every optimizer case runs on the three CPU paths: ``backend="auto"`` (the Rust core), ``"torch"``
and ``"foreach"``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from oracle import AdamOracle
from rustadam import Adam, WeightDecay

BACKENDS = ["auto", "torch", "foreach"]
OPTIONS = {
    "maximize": dict(maximize=True),
    "amsgrad": dict(amsgrad=True),
    "maximize+amsgrad": dict(maximize=True, amsgrad=True),
}
LR, EPS, WD = 1e-2, 1e-8, 0.1


def _torch_twin(kind, params, **opts):
    """torch's optimizer and the rustadam WeightDecay that equals it."""
    if kind == "none":
        return torch.optim.Adam(params, lr=LR, eps=EPS, **opts), WeightDecay(0.0)
    if kind == "L2":
        twin = torch.optim.Adam(params, lr=LR, eps=EPS, weight_decay=WD, **opts)
        return twin, WeightDecay(WD, weight_decouple=False)
    return torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=WD, **opts), WeightDecay(WD)


def _grads(n, steps, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    gs = [
        (
            torch.randn(n, generator=gen, dtype=torch.float64) * (1 + torch.rand(n, generator=gen))
        ).to(dtype)
        for _ in range(steps)
    ]
    return p0, gs


def _unit(dtype):
    return 2.0**-23 if dtype == torch.float32 else 2.0**-52


def _assert_near(a, b, dtype, t, name, scale=LR):
    # float32: 4 ulps per step; float64: 1e-12 relative (about 4500 ulps) at any step.
    units = 4 * t if dtype == torch.float32 else 1e-12 / _unit(dtype)
    ref = torch.maximum(a.abs(), torch.full_like(a, scale))
    err = ((a - b).abs() / (_unit(dtype) * ref)).max().item()
    assert err <= units, f"{name} after step {t}: {err:.1f} ulps of max(|x|, {scale}) > {units}"


# ---- maximize and amsgrad against torch.optim.Adam / AdamW -------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["none", "L2", "AdamW"])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_maximize_and_amsgrad_match_torch(dtype, options, kind, backend):
    opts = OPTIONS[options]
    steps = 60
    p0, gs = _grads(512, steps, dtype)
    a, b = p0.clone(), p0.clone()
    twin, decay = _torch_twin(kind, [a], **opts)
    opt = Adam([b], lr=LR, eps=EPS, weight_decay=decay, optimized_update=False,
               backend=backend, **opts)  # fmt: skip
    for t, g in enumerate(gs, 1):
        a.grad, b.grad = g.clone(), g.clone()
        twin.step()
        opt.step()
        _assert_near(a, b, dtype, t, "param")
    st, so = twin.state[a], opt.state[b]
    assert so["step"] == steps == int(st["step"])
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if opts.get("amsgrad") else [])
    assert sorted(k for k in so if k != "step") == sorted(keys)
    for k in keys:
        _assert_near(st[k], so[k], dtype, steps, k, scale=float(st[k].abs().max()))


# ---- the optimized form against the float64 oracle ---------------------------------------------


class OptionsOracle(AdamOracle):
    """tests/oracle.py with maximize (−g, before the weight decay) and AMSGrad (the
    denominator from v_max = max(v_max, v))."""

    def __init__(self, groups, *, maximize=False, amsgrad=False, **kw):
        super().__init__(groups, **kw)
        self.maximize, self.amsgrad = maximize, amsgrad

    def get_mv(self, state, group, grad):
        m, v = super().get_mv(state, group, grad)
        if not self.amsgrad:
            return m, v
        state["max_exp_avg_sq"] = np.maximum(state.get("max_exp_avg_sq", 0.0), v)
        return m, state["max_exp_avg_sq"]

    def step_param(self, state, group, grad, param):
        return super().step_param(state, group, -grad if self.maximize else grad, param)


DECAYS = {
    "none": dict(weight_decay=0.0),
    "L2": dict(weight_decay=WD, weight_decouple=False),
    "decoupled": dict(weight_decay=WD),
    "absolute": dict(weight_decay=0.01, absolute=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimized", [True, False])
@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_options_match_float64_oracle(dtype, options, decay, optimized, backend):
    opts, d = OPTIONS[options], DECAYS[decay]
    steps = 50
    p0, gs = _grads(256, steps, dtype, seed=1)
    p = p0.clone()
    wd = WeightDecay(d["weight_decay"], d.get("weight_decouple", True), d.get("absolute", False))
    opt = Adam([p], lr=LR, eps=EPS, weight_decay=wd, optimized_update=optimized,
               backend=backend, **opts)  # fmt: skip
    oracle = OptionsOracle(
        [{"params": [p0.double().numpy()], "lr": LR, "betas": (0.9, 0.999), "eps": EPS,
          "weight_decay": d["weight_decay"]}],
        optimized_update=optimized, weight_decouple=d.get("weight_decouple", True),
        absolute=d.get("absolute", False), **opts,
    )  # fmt: skip
    for g in gs:
        p.grad = g.clone()
        opt.step()
        oracle.step([[g.double().numpy()]])
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(p.double().numpy(), oracle.params[0][0], **tol)
    if opts.get("amsgrad"):
        np.testing.assert_allclose(
            opt.state[p]["max_exp_avg_sq"].double().numpy(),
            oracle.state[0][0]["max_exp_avg_sq"],
            rtol=1e-12 if dtype == torch.float64 else 2e-5,
        )


# ---- state dicts both ways ---------------------------------------------------------------------


def _steps(opt, p, gs):
    for g in gs:
        p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("construct", ["matching", "defaults"])
@pytest.mark.parametrize("kind", ["none", "L2", "AdamW"])
def test_torch_state_dict_continues_in_rustadam(kind, construct, backend):
    k = 12
    opts = dict(amsgrad=True, maximize=True)
    p0, gs = _grads(300, 2 * k, torch.float64, seed=2)
    a = p0.clone()
    twin, decay = _torch_twin(kind, [a], **opts)
    _steps(twin, a, gs[:k])
    sd = copy.deepcopy(twin.state_dict())  # as saved: state_dict() shares the live tensors
    b = a.detach().clone()
    if construct == "matching":
        opt = Adam([b], lr=LR, eps=EPS, weight_decay=decay, optimized_update=False,
                   backend=backend, **opts)  # fmt: skip
    else:
        # Only what torch's groups do not hold: the loaded groups bring lr, eps, amsgrad and
        # maximize, as in torch.
        opt = Adam([b], optimized_update=False, backend=backend)
        if kind == "L2":
            # its decay is decoupled: torch's L2 state dict says which kind it needs
            with pytest.raises(ValueError, match=r"param_groups\[0\].*L2"):
                opt.load_state_dict(sd)
            return
    opt.load_state_dict(sd)
    group = opt.param_groups[0]
    assert group["amsgrad"] is True and group["maximize"] is True and group["eps"] == EPS
    assert opt.state[b]["step"] == k
    _steps(twin, a, gs[k:])
    _steps(opt, b, gs[k:])
    _assert_near(a, b, torch.float64, 2 * k, "param")
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        ref = twin.state[a][key]
        _assert_near(ref, opt.state[b][key], torch.float64, 2 * k, key, float(ref.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("construct", ["matching", "defaults"])
@pytest.mark.parametrize("kind", ["none", "L2", "AdamW"])
def test_rustadam_state_dict_continues_in_torch(kind, construct, backend):
    k = 12
    opts = dict(amsgrad=True, maximize=True)
    p0, gs = _grads(300, 2 * k, torch.float64, seed=3)
    a = p0.clone()
    _, decay = _torch_twin(kind, [torch.zeros(1)], **opts)
    opt = Adam([a], lr=LR, eps=EPS, weight_decay=decay, optimized_update=False,
               backend=backend, **opts)  # fmt: skip
    _steps(opt, a, gs[:k])
    sd = copy.deepcopy(opt.state_dict())
    b = a.detach().clone()
    cls = torch.optim.AdamW if kind == "AdamW" else torch.optim.Adam
    if construct == "matching":
        twin, _ = _torch_twin(kind, [b], **opts)
    else:
        twin = cls([b])  # the loaded group brings every hyper-parameter
    twin.load_state_dict(sd)
    assert twin.param_groups[0]["amsgrad"] and twin.param_groups[0]["maximize"]
    _steps(opt, a, gs[k:])
    _steps(twin, b, gs[k:])
    _assert_near(a, b, torch.float64, 2 * k, "param")
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        ref = opt.state[a][key]
        _assert_near(ref, twin.state[b][key], torch.float64, 2 * k, key, float(ref.abs().max()))


# ---- group options: bit for bit what separate optimizers give ----------------------------------


def _bits_equal(x, y):
    return torch.equal(x.view(torch.int32), y.view(torch.int32))


GROUP_CASES = {
    # (the group's own entries, the separate optimizer's keywords)
    "L2 WeightDecay in a decoupled optimizer": (
        dict(weight_decay=WeightDecay(0.1, weight_decouple=False)),
        dict(weight_decay=WeightDecay(0.1, weight_decouple=False)),
    ),
    "absolute WeightDecay": (
        dict(weight_decay=WeightDecay(0.02, absolute=True)),
        dict(weight_decay=WeightDecay(0.02, absolute=True)),
    ),
    "a number: the optimizer's kind": (
        dict(weight_decay=0.3),
        dict(weight_decay=WeightDecay(0.3)),
    ),
    "optimized_update=False": (
        dict(optimized_update=False),
        dict(optimized_update=False, weight_decay=WeightDecay(0.05)),
    ),
    "maximize": (dict(maximize=True), dict(maximize=True, weight_decay=WeightDecay(0.05))),
    "amsgrad": (dict(amsgrad=True), dict(amsgrad=True, weight_decay=WeightDecay(0.05))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_group_option_equals_a_separate_optimizer(case, backend):
    entries, separate = GROUP_CASES[case]
    p0, gs = _grads(257, 6, torch.float32, seed=4)
    q0, hs = _grads(131, 6, torch.float32, seed=5)
    p, q, p2, q2 = p0.clone(), q0.clone(), p0.clone(), q0.clone()
    opt = Adam([{"params": [p]}, {"params": [q], **entries}], lr=0.05,
               weight_decay=WeightDecay(0.05), backend=backend)  # fmt: skip
    ref_p = Adam([p2], lr=0.05, weight_decay=WeightDecay(0.05), backend=backend)
    ref_q = Adam([q2], lr=0.05, backend=backend, **separate)
    for g, h in zip(gs, hs):
        p.grad, p2.grad, q.grad, q2.grad = g.clone(), g.clone(), h.clone(), h.clone()
        opt.step()
        ref_p.step()
        ref_q.step()
        assert _bits_equal(p, p2), "the other group changed"
        assert _bits_equal(q, q2)
    assert ("max_exp_avg_sq" in opt.state[q]) == ("amsgrad" in entries)
    assert "max_exp_avg_sq" not in opt.state[p]
    for key in opt.state[q2]:
        if key != "step":
            assert _bits_equal(opt.state[q][key], ref_q.state[q2][key]), key


def _snapshot(opt):
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            s = opt.state.get(p, {})
            out.append((p.clone(), {k: v.clone() if isinstance(v, torch.Tensor) else v
                                    for k, v in s.items()}))  # fmt: skip
    return out


def _assert_unchanged(opt, snap):
    now = _snapshot(opt)
    assert len(now) == len(snap)
    for (p, s), (p0, s0) in zip(now, snap):
        assert torch.equal(p, p0)
        assert s.keys() == s0.keys()
        for k in s:
            assert torch.equal(s[k], s0[k]) if isinstance(s[k], torch.Tensor) else s[k] == s0[k]


def _two_groups(backend, **second):
    p0, g = _grads(64, 1, torch.float32, seed=6)
    q0, h = _grads(32, 1, torch.float32, seed=7)
    p, q = p0.clone(), q0.clone()
    p.grad, q.grad = g[0], h[0]
    return Adam([{"params": [p]}, {"params": [q], **second}], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", ["nesterov", "differentiable"])
def test_refused_group_keys_name_the_group_and_change_nothing(key, backend):
    # given at construction
    try:
        opt = _two_groups(backend, **{key: True})
    except ValueError as e:
        assert "param_groups[1]" in str(e) and key in str(e)
    else:
        snap = _snapshot(opt)
        with pytest.raises(ValueError, match=rf"param_groups\[1\].*{key}"):
            opt.step()
        _assert_unchanged(opt, snap)
        assert not opt.state
    # set on a group of an optimizer that has stepped
    opt = _two_groups(backend)
    opt.step()
    opt.param_groups[1][key] = True
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=rf"param_groups\[1\].*{key}"):
        opt.step()
    _assert_unchanged(opt, snap)


# ---- a number as weight_decay ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_number_as_weight_decay_is_decoupled_weight_decay(backend):
    p0, gs = _grads(200, 5, torch.float32, seed=8)
    a, b = p0.clone(), p0.clone()
    oa = Adam([a], lr=0.1, weight_decay=0.2, backend=backend)
    ob = Adam([b], lr=0.1, weight_decay=WeightDecay(0.2), backend=backend)
    assert oa.weight_decay == WeightDecay(0.2)
    assert oa.param_groups[0]["weight_decay"] == 0.2
    for g in gs:
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert _bits_equal(a, b)


def test_a_negative_number_as_weight_decay_raises_torchs_error():
    p = torch.zeros(3)
    with pytest.raises(ValueError) as e:
        Adam([p], weight_decay=-1)
    assert type(e.value) is ValueError
    assert str(e.value) == "Invalid weight_decay value: -1"
    with pytest.raises(ValueError, match="Invalid weight_decay value: -1"):
        WeightDecay(-1)


# ---- invalid group values set after construction -----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", -1, "learning rate"),
        ("betas", (1.0, 0.9), "beta parameter at index 0"),
        ("betas", (0.9, -0.1), "beta parameter at index 1"),
        ("eps", math.nan, "epsilon"),
    ],
)
def test_invalid_group_values_are_found_before_anything_steps(key, value, message, backend):
    opt = _two_groups(backend, amsgrad=True)
    opt.step()
    opt.param_groups[1][key] = value
    snap = _snapshot(opt)
    with pytest.raises(ValueError, match=rf"param_groups\[1\].*{message}"):
        opt.step()
    _assert_unchanged(opt, snap)
    # an optimizer that has not stepped yet creates no state either
    opt = _two_groups(backend)
    opt.param_groups[1][key] = value
    with pytest.raises(ValueError, match=r"param_groups\[1\]"):
        opt.step()
    assert not opt.state


# ---- a step count that cannot count on -----------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "torch", "foreach"])
def test_a_step_of_2_to_the_64_names_the_parameter(backend):
    opt = _two_groups(backend)
    opt.step()
    sd = opt.state_dict()
    sd["state"][1]["step"] = 2**64
    label = r"param_groups\[1\]\['params'\]\[0\]"
    try:
        opt.load_state_dict(sd)
    except Exception as e:  # refused on load: it must say which parameter
        assert type(e) is not OverflowError
        assert "param_groups[1]" in str(e) or "params'][0]" in str(e), e
        return
    snap = _snapshot(opt)
    with pytest.raises(Exception, match=label) as e:
        opt.step()
    assert type(e.value) is not OverflowError
    _assert_unchanged(opt, snap)
