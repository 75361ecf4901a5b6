"""rustadam.numpy: the functional step and the Adam class against a float64 oracle written here,
against rustadam's torch optimizer (and torch.optim where they coincide), and every bad input."""

from __future__ import annotations

import doctest
import math
import subprocess
import sys

import numpy as np
import pytest

import rustadam.numpy as rnp
from rustadam import _core
from rustadam.numpy import Adam, _config, adam_step

DECAYS = {
    "none": dict(weight_decay=0.0, weight_decouple=True, absolute=False),
    "l2": dict(weight_decay=0.1, weight_decouple=False, absolute=False),
    "decoupled": dict(weight_decay=0.1, weight_decouple=True, absolute=False),
    "absolute": dict(weight_decay=0.01, weight_decouple=True, absolute=True),
}
# eps large enough that where it enters (ε̂ vs ε) changes the result well beyond the tolerances.
HYPER = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-3)
TOL = {np.float64: dict(rtol=1e-12, atol=1e-14), np.float32: dict(rtol=1e-5, atol=1e-6)}


def oracle_step(p, g, m, v, t, *, lr, betas, eps, weight_decay, weight_decouple, absolute,
                optimized_update):  # fmt: skip
    """The update rule (docs/NUMERICS.md) in float64, returning new (p, m, v)."""
    p, g, m, v = (np.array(x, dtype=np.float64) for x in (p, g, m, v))
    b1, b2 = betas
    if weight_decouple:
        p = p * (1.0 - weight_decay if absolute else 1.0 - lr * weight_decay)
    elif weight_decay != 0.0:
        g = g + weight_decay * p
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
    if optimized_update:
        p = p - lr * math.sqrt(bc2) / bc1 * m / (np.sqrt(v) + eps)
    else:
        p = p - lr / bc1 * m / (np.sqrt(v) / math.sqrt(bc2) + eps)
    return p, m, v


def arrays(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(shape).astype(dtype)
    grads = [rng.standard_normal(shape).astype(dtype) for _ in range(20)]
    return p, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("optimized_update", [True, False])
@pytest.mark.parametrize("decay", list(DECAYS))
def test_adam_step_matches_oracle(dtype, optimized_update, decay):
    kw = dict(HYPER, optimized_update=optimized_update, **DECAYS[decay])
    p, grads = arrays((3, 4, 5), dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    ref = (p.astype(np.float64), np.zeros(p.shape), np.zeros(p.shape))
    for t, g in enumerate(grads, start=1):
        adam_step(p, g, m, v, t, **kw)
        ref = oracle_step(*ref[:1], g, *ref[1:], t, **kw)
    assert p.dtype == m.dtype == v.dtype == dtype
    for got, want in zip((p, m, v), ref):
        np.testing.assert_allclose(got, want, **TOL[dtype])


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (2, 3), (2, 0, 3), (2, 3, 4, 5)])
def test_any_c_contiguous_shape(shape):
    p, grads = arrays(shape, np.float64, seed=1)
    m, v = np.zeros_like(p), np.zeros_like(p)
    ref = (p.copy(), np.zeros(shape), np.zeros(shape))
    for t, g in enumerate(grads[:3], start=1):
        adam_step(p, g, m, v, t, lr=0.1)
        ref = oracle_step(ref[0], g, ref[1], ref[2], t, lr=0.1, betas=(0.9, 0.999), eps=1e-16,
                          weight_decay=0.0, weight_decouple=True, absolute=False,
                          optimized_update=True)  # fmt: skip
    for got, want in zip((p, m, v), ref):
        assert got.shape == shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_defaults_are_the_specs():
    p, g = np.array([1.0, -2.0]), np.array([0.25, -3.0])
    m, v = np.zeros(2), np.zeros(2)
    adam_step(p, g, m, v, 1)
    want = oracle_step([1.0, -2.0], g, np.zeros(2), np.zeros(2), 1, lr=1e-3, betas=(0.9, 0.999),
                       eps=1e-16, weight_decay=0.0, weight_decouple=True, absolute=False,
                       optimized_update=True)  # fmt: skip
    np.testing.assert_allclose(p, want[0], rtol=1e-15)
    np.testing.assert_allclose(m, want[1], rtol=1e-15)


def test_grad_is_not_written_and_may_be_read_only():
    p, g = np.ones(4), np.arange(4.0)
    g.flags.writeable = False
    adam_step(p, g, np.zeros(4), np.zeros(4), 1, weight_decay=0.5, weight_decouple=False)
    np.testing.assert_array_equal(g, np.arange(4.0))
    # One gradient array shared by two parameters is fine: it is only read.
    opt = Adam([np.ones(4), np.ones(4)])
    opt.step([g, g])


def test_num_threads_does_not_change_results():
    p1, grads = arrays((70_000,), np.float32, seed=2)
    p2 = p1.copy()
    s1 = [np.zeros_like(p1), np.zeros_like(p1)]
    s2 = [np.zeros_like(p1), np.zeros_like(p1)]
    for t, g in enumerate(grads[:2], start=1):
        adam_step(p1, g, *s1, t, num_threads=1)
        adam_step(p2, g, *s2, t, num_threads=2)
    np.testing.assert_array_equal(p1, p2)


# ---- the Adam class ----------------------------------------------------------------------------


def test_class_matches_oracle_with_skipped_parameters():
    """Mixed dtypes and shapes; None skips a parameter, whose step count then lags behind."""
    rng = np.random.default_rng(3)
    params = [
        rng.standard_normal((4, 3)),
        rng.standard_normal(5).astype(np.float32),
        rng.standard_normal(()),
    ]
    kw = dict(HYPER, optimized_update=False, **DECAYS["decoupled"])
    opt = Adam(params, **kw)
    ref = [(p.astype(np.float64), np.zeros(p.shape), np.zeros(p.shape), 0) for p in params]
    for k in range(6):
        grads = [rng.standard_normal(p.shape).astype(p.dtype) for p in params]
        grads[1] = None if k % 2 else grads[1]
        opt.step(grads)
        for i, g in enumerate(grads):
            if g is not None:
                p, m, v, t = ref[i]
                ref[i] = (*oracle_step(p, g, m, v, t + 1, **kw), t + 1)
    assert [opt.state[i]["step"] for i in range(3)] == [6, 3, 6]
    for i, p in enumerate(params):
        tol = TOL[p.dtype.type]
        np.testing.assert_allclose(p, ref[i][0], **tol)
        np.testing.assert_allclose(opt.state[i]["exp_avg"], ref[i][1], **tol)
        np.testing.assert_allclose(opt.state[i]["exp_avg_sq"], ref[i][2], **tol)
        assert opt.state[i]["exp_avg"].dtype == p.dtype


def test_class_reads_hyperparameters_at_every_step():
    p1, p2 = np.ones(3), np.ones(3)
    m, v = np.zeros(3), np.zeros(3)
    opt = Adam([p1])
    for t, lr in enumerate([0.1, 0.05, 0.01], start=1):
        opt.lr = lr
        g = np.array([0.5, -1.0, 2.0]) * t
        opt.step([g])
        adam_step(p2, g, m, v, t, lr=lr)
    np.testing.assert_array_equal(p1, p2)
    opt.lr = -1.0
    with pytest.raises(ValueError, match=r"^Invalid learning rate: -1.0$"):
        opt.step([np.ones(3)])
    np.testing.assert_array_equal(p1, p2)


def test_state_dict_round_trip_resumes_exactly():
    rng = np.random.default_rng(4)
    params = [rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(4)]
    grads = [[rng.standard_normal(p.shape).astype(p.dtype) for p in params] for _ in range(6)]
    opt = Adam(params, lr=0.02, weight_decay=0.01)
    for g in grads[:3]:
        opt.step(g)
    sd = opt.state_dict()
    # The state dict holds copies: stepping on does not change it.
    saved = sd["state"][0]["exp_avg"].copy()
    resumed = [p.copy() for p in params]
    opt2 = Adam(resumed, lr=1.0)
    opt2.load_state_dict(sd)
    assert opt2.lr == 0.02 and opt2.weight_decay == 0.01
    for g in grads[3:]:
        opt.step(g)
        opt2.step(g)
    np.testing.assert_array_equal(sd["state"][0]["exp_avg"], saved)
    for a, b in zip(params, resumed):
        np.testing.assert_array_equal(a, b)
    for i in range(2):
        assert opt.state[i]["step"] == opt2.state[i]["step"] == 6
        np.testing.assert_array_equal(opt.state[i]["exp_avg_sq"], opt2.state[i]["exp_avg_sq"])


def test_load_state_dict_casts_to_the_parameter_dtype_and_accepts_string_keys():
    p = np.ones(3, dtype=np.float32)
    opt = Adam([p])
    opt.load_state_dict(
        {
            "state": {"0": {"step": 2, "exp_avg": [0.1, 0.2, 0.3], "exp_avg_sq": np.ones(3)}},
            "hyperparams": Adam([np.ones(1)]).state_dict()["hyperparams"],
        }
    )
    assert opt.state[0]["exp_avg"].dtype == np.float32
    assert opt.state[0]["exp_avg"].flags.c_contiguous
    opt.step([np.ones(3, dtype=np.float32)])
    assert opt.state[0]["step"] == 3


# ---- against rustadam's torch optimizer and torch.optim ------------------------------------------


def run_torch(opt_factory, p0, grads, torch):
    w = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = opt_factory([w])
    for g in grads:
        w.grad = torch.from_numpy(g.copy())
        opt.step()
    st = opt.state[w]
    return w.detach().numpy(), st["exp_avg"].numpy(), st["exp_avg_sq"].numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("optimized_update", [True, False])
@pytest.mark.parametrize("decay", list(DECAYS))
def test_matches_rustadam_torch_optimizer(dtype, optimized_update, decay):
    import torch

    import rustadam

    p0, grads = arrays((6, 5), dtype, seed=5)
    d = DECAYS[decay]
    kw = dict(HYPER, optimized_update=optimized_update)
    wd = rustadam.WeightDecay(d["weight_decay"], d["weight_decouple"], d["absolute"])

    p = p0.copy()
    opt = Adam([p], **kw, **d)
    for g in grads:
        opt.step([g])
    got = (p, opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"])

    # The same Rust kernel behind the torch API: identical bits.
    same_core = run_torch(lambda ps: rustadam.Adam(ps, weight_decay=wd, **kw), p0, grads, torch)
    for a, b in zip(got, same_core):
        np.testing.assert_array_equal(a, b)
    # torch's own ops: equal within the float tolerance (torch's float32 sqrt is not always
    # correctly rounded).
    torch_ops = run_torch(
        lambda ps: rustadam.Adam(ps, weight_decay=wd, backend="torch", **kw), p0, grads, torch
    )
    for a, b in zip(got, torch_ops):
        np.testing.assert_allclose(a, b, **TOL[dtype])


@pytest.mark.parametrize("decay", ["none", "l2", "decoupled"])
def test_matches_torch_optim_where_they_coincide(decay):
    """The textbook form is torch.optim.Adam (with L2 decay) and AdamW (decoupled decay)."""
    import torch

    p0, grads = arrays((8,), np.float64, seed=6)
    d = DECAYS[decay]
    p = p0.copy()
    opt = Adam([p], **HYPER, optimized_update=False, **d)
    for g in grads:
        opt.step([g])
    cls = torch.optim.AdamW if decay == "decoupled" else torch.optim.Adam
    want = run_torch(
        lambda ps: cls(ps, **HYPER, weight_decay=d["weight_decay"], foreach=False),
        p0,
        grads,
        torch,
    )
    np.testing.assert_allclose(p, want[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(opt.state[0]["exp_avg_sq"], want[2], rtol=1e-12, atol=1e-14)


# ---- bad input ---------------------------------------------------------------------------------


def fresh(n=4, dtype=np.float64):
    return np.ones(n, dtype), np.full(n, 0.5, dtype), np.zeros(n, dtype), np.zeros(n, dtype)


def test_same_array_passed_twice():
    p, g, m, v = fresh()
    with pytest.raises(ValueError, match=r"^grad shares memory with param.*passed twice"):
        adam_step(p, p, m, v, 1)
    with pytest.raises(ValueError, match=r"^exp_avg shares memory with param"):
        adam_step(p, g, p, v, 1)
    with pytest.raises(ValueError, match=r"^exp_avg_sq shares memory with exp_avg"):
        adam_step(p, g, m, m, 1)
    with pytest.raises(ValueError, match=r"^exp_avg shares memory with grad"):
        adam_step(p, g, g, v, 1)
    base = np.zeros(8)
    with pytest.raises(ValueError, match=r"^exp_avg_sq shares memory with exp_avg"):
        adam_step(p, g, base[:4], base[2:6], 1)
    np.testing.assert_array_equal(p, np.ones(4))
    np.testing.assert_array_equal(m, np.zeros(4))
    # Disjoint views of one buffer are separate arrays; the failed calls left no borrow behind.
    adam_step(p, g, base[:4], base[4:], 1)
    assert p[0] < 1.0

    q = np.ones(4)
    opt = Adam([q, q])
    with pytest.raises(ValueError, match=r"^params\[1\] shares memory with params\[0\]"):
        opt.step([np.ones(4), np.ones(4)])
    opt = Adam([q, np.ones(4)])
    with pytest.raises(ValueError, match=r"^grads\[1\] shares memory with params\[0\]"):
        opt.step([np.ones(4), q])
    np.testing.assert_array_equal(q, np.ones(4))
    assert opt.state == {}


def test_read_only_arrays():
    p, g, m, v = fresh()
    p.flags.writeable = False
    with pytest.raises(ValueError, match=r"^param is read-only"):
        adam_step(p, g, m, v, 1)
    p, g, m, v = fresh()
    v.flags.writeable = False
    with pytest.raises(ValueError, match=r"^exp_avg_sq is read-only"):
        adam_step(p, g, m, v, 1)
    np.testing.assert_array_equal(p, np.ones(4))
    ro = np.ones(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"^params\[0\] is read-only"):
        Adam([ro])


def test_non_contiguous_arrays():
    p, g, m, v = fresh()
    with pytest.raises(ValueError, match=r"^param is not C-contiguous.*updated in place"):
        adam_step(np.ones(8)[::2], g, m, v, 1)
    with pytest.raises(ValueError, match=r"^grad is not C-contiguous.*ascontiguousarray"):
        adam_step(p, np.ones(8)[::2], m, v, 1)
    with pytest.raises(ValueError, match=r"^exp_avg is not C-contiguous"):
        adam_step(np.ones((2, 3)), np.ones((2, 3)), np.zeros((3, 2)).T, np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match=r"^exp_avg_sq is not C-contiguous"):
        f = np.asfortranarray(np.zeros((2, 3)))
        adam_step(np.ones((2, 3)), np.ones((2, 3)), np.zeros((2, 3)), f, 1)
    with pytest.raises(ValueError, match=r"^params\[0\] is not C-contiguous"):
        Adam([np.ones((3, 2)).T])


def test_shape_mismatch():
    p, g, m, v = fresh()
    with pytest.raises(ValueError, match=r"^grad has shape \(5,\) but param has shape \(4,\)$"):
        adam_step(p, np.ones(5), m, v, 1)
    with pytest.raises(ValueError, match=r"^exp_avg_sq has shape \(2, 2\) but param has"):
        adam_step(p, g, m, np.zeros((2, 2)), 1)
    opt = Adam([np.ones(3), np.ones(2)])
    with pytest.raises(ValueError, match=r"^grads\[1\] has shape \(3,\) but params\[1\] has"):
        opt.step([np.ones(3), np.ones(3)])


def test_dtype_errors():
    p, g, m, v = fresh()
    with pytest.raises(TypeError, match=r"^grad has dtype float32 but param has dtype float64$"):
        adam_step(p, g.astype(np.float32), m, v, 1)
    with pytest.raises(TypeError, match=r"^param has dtype int64; rustadam.numpy takes float32"):
        adam_step(np.ones(4, dtype=np.int64), g, m, v, 1)
    with pytest.raises(TypeError, match=r"^grad has dtype int32; "):
        adam_step(p, np.ones(4, dtype=np.int32), m, v, 1)
    with pytest.raises(TypeError, match=r"^exp_avg has dtype float16; "):
        adam_step(p, g, np.zeros(4, dtype=np.float16), v, 1)
    with pytest.raises(TypeError, match=r"^param has dtype >f8 \(not in the machine's byte order"):
        adam_step(np.ones(4, dtype=">f8"), g, m, v, 1)
    with pytest.raises(TypeError, match=r"^grad must be a numpy.ndarray, not list$"):
        adam_step(p, [0.5] * 4, m, v, 1)
    with pytest.raises(TypeError, match=r"^params\[1\] has dtype int64"):
        Adam([np.ones(2), np.ones(2, dtype=np.int64)])
    with pytest.raises(TypeError, match=r"^params\[0\] must be a numpy.ndarray, not float"):
        Adam([1.0])
    np.testing.assert_array_equal(p, np.ones(4))


def test_step_count_errors():
    p, g, m, v = fresh()
    with pytest.raises(ValueError, match=r"^step must be an int from 1 to 2\*\*63 - 1 .*got 0$"):
        adam_step(p, g, m, v, 0)
    with pytest.raises(ValueError, match=r"^step must be an int from 1 to 2\*\*63 - 1 .*got -3$"):
        adam_step(p, g, m, v, -3)
    with pytest.raises(TypeError, match="step"):
        adam_step(p, g, m, v, 1.5)
    with pytest.raises(TypeError, match=r"^step must be an int, not bool"):
        adam_step(p, g, m, v, True)
    for huge in (2**63, 2**64):
        with pytest.raises(ValueError, match=r"^step must be an int from 1 to 2\*\*63 - 1"):
            adam_step(p, g, m, v, huge)
    np.testing.assert_array_equal(p, fresh()[0])  # nothing was written
    adam_step(p, g, m, v, np.int64(1))  # numpy's integers are ints
    assert not np.array_equal(p, fresh()[0])


def test_flags_are_bools():
    for flag in ("weight_decouple", "absolute", "optimized_update"):
        with pytest.raises(ValueError, match=f"^{flag} must be a bool, got 'False'"):
            Adam([np.ones(2)], **{flag: "False"})
        with pytest.raises(ValueError, match=f"^{flag} must be a bool, got 2"):
            adam_step(*fresh(), 1, **{flag: 2})
    Adam([np.ones(2)], weight_decouple=np.bool_(False), absolute=0, optimized_update=1)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(lr=-1e-3), "Invalid learning rate: -0.001"),
        (dict(lr=float("nan")), "Invalid learning rate: nan"),
        (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
        (dict(weight_decay=-0.5), "Invalid weight_decay value: -0.5"),
    ],
)
def test_hyperparameter_validation(kw, message):
    p, g, m, v = fresh()
    with pytest.raises(ValueError, match=f"^{message}$"):
        adam_step(p, g, m, v, 1, **kw)
    with pytest.raises(ValueError, match=f"^{message}$"):
        Adam([p], **kw)
    np.testing.assert_array_equal(p, np.ones(4))


def test_class_errors_leave_everything_unchanged():
    with pytest.raises(ValueError, match="empty parameter list"):
        Adam([])
    a, b = np.ones(3), np.ones(2, dtype=np.float32)
    opt = Adam([a, b])
    opt.step([np.ones(3), np.ones(2, dtype=np.float32)])
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"^step\(\) got 1 gradients for 2 parameters$"):
        opt.step([np.ones(3)])
    # The second gradient is bad: the first parameter must not move either.
    with pytest.raises(TypeError, match=r"^grads\[1\] has dtype float64 but params\[1\]"):
        opt.step([np.ones(3), np.ones(2)])
    after = opt.state_dict()
    assert [after["state"][i]["step"] for i in (0, 1)] == [1, 1]
    np.testing.assert_array_equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])
    np.testing.assert_allclose(a, 1.0 - 1e-3)


@pytest.mark.parametrize("kw", [dict(lr="0.1"), dict(eps="1e-8"), dict(betas=(0.9, "0.99")),
                                dict(lr=True)])  # fmt: skip
def test_hyperparameters_must_be_numbers(kw):
    """A string or a bool is not converted (torch's Adam refuses them too), whether given to the
    constructor or set as an attribute before a step."""
    p, g, m, v = fresh()
    with pytest.raises(TypeError, match="must be a real number"):
        adam_step(p, g, m, v, 1, **kw)
    with pytest.raises(TypeError, match="must be a real number"):
        Adam([p], **kw)
    opt = Adam([p])
    for name, value in kw.items():
        setattr(opt, name, value)
    with pytest.raises(TypeError, match="must be a real number"):
        opt.step([g])
    np.testing.assert_array_equal(p, np.ones(4))
    assert opt.state == {}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.__setitem__("step", -1), "step must be an int from 0 to .* got -1"),
        (lambda s: s.__setitem__("step", True), "step must be an int from 0 to .* got True"),
        (lambda s: s.__setitem__("step", "1"), "step must be an int from 0 to .* got '1'"),
        (lambda s: s.pop("exp_avg"), "with the keys 'step', 'exp_avg' and 'exp_avg_sq'"),
    ],
)
def test_a_bad_state_set_between_steps_changes_nothing(edit, message):
    params = [np.ones(3, np.float32) for _ in range(3)]
    opt = Adam(params, lr=0.1)
    opt.step([np.ones(3, np.float32)] * 3)
    edit(opt.state[2])
    before = [p.copy() for p in params]
    steps = [opt.state[i].get("step") for i in (0, 1)]
    with pytest.raises(ValueError, match=f"^state of parameter 2.*{message}"):
        opt.step([np.ones(3, np.float32)] * 3)
    assert all(np.array_equal(p, b) for p, b in zip(params, before))
    assert [opt.state[i]["step"] for i in (0, 1)] == steps


def test_load_state_dict_errors():
    opt = Adam([np.ones(3)])
    good = opt.state_dict()
    with pytest.raises(ValueError, match="'state' and 'hyperparams'"):
        opt.load_state_dict({"state": {}})
    bad_shape = {"state": {0: {"step": 1, "exp_avg": np.zeros(4), "exp_avg_sq": np.zeros(3)}}}
    with pytest.raises(ValueError, match=r"exp_avg has shape \(4,\) but the parameter has"):
        opt.load_state_dict({**good, **bad_shape})
    bad_index = {"state": {1: {"step": 1, "exp_avg": np.zeros(3), "exp_avg_sq": np.zeros(3)}}}
    with pytest.raises(ValueError, match="state for parameter 1 but the optimizer has 1"):
        opt.load_state_dict({**good, **bad_index})
    bad_step = {"state": {0: {"step": -1, "exp_avg": np.zeros(3), "exp_avg_sq": np.zeros(3)}}}
    with pytest.raises(ValueError, match="step must be an int from 0 to"):
        opt.load_state_dict({**good, **bad_step})
    # The count after the next update must fit in 63 bits, as the core takes it.
    for step in (2**63 - 1, np.uint64(2**64 - 1), True, 1.0):
        huge = {"state": {0: {"step": step, "exp_avg": np.zeros(3), "exp_avg_sq": np.zeros(3)}}}
        with pytest.raises(ValueError, match="step must be an int from 0 to"):
            opt.load_state_dict({**good, **huge})
    for flag in ("weight_decouple", "absolute", "optimized_update"):
        with pytest.raises(ValueError, match=f"{flag} must be a bool, got 'False'"):
            opt.load_state_dict({**good, "hyperparams": {**good["hyperparams"], flag: "False"}})
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        opt.load_state_dict({**good, "hyperparams": {**good["hyperparams"], "lr": -1}})
    assert opt.state == {} and opt.lr == 1e-3


# ---- packaging -------------------------------------------------------------------------------


def test_import_does_not_import_torch():
    code = "import sys, rustadam.numpy; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docstring_examples():
    result = doctest.testmod(rnp)
    assert result.attempted >= 3
    assert result.failed == 0


def test_python_code_run_by_a_step_count_cannot_change_checked_arrays():
    # Reading a step count may run Python (``__index__``); here it reinterprets the arrays of
    # the first parameter as float32 (twice the elements over the same bytes). The step must
    # use what it writes with, not what it checked before: the bytes between the arrays stay.
    big = np.zeros(100)
    p, m, v, g = big[0:10], big[20:30], big[40:50], big[60:70]
    g[:] = 1.0
    gaps = [slice(10, 20), slice(30, 40), slice(50, 60), slice(70, 80)]
    for sl in gaps:
        big[sl] = 7.0

    class Step:
        def __index__(self):
            for a in (p, m, v, g):
                a.dtype = np.float32
            return 1

    q = [np.zeros(3) for _ in range(4)]
    cfg = _config(1e-3, (0.9, 0.999), 1e-16, 0.0)
    _core.numpy_adam_step_many(
        [p, q[0]], [g, q[1]], [m, q[2]], [v, q[3]], [1, Step()], cfg, num_threads=1
    )
    for sl in gaps:
        assert (big[sl] == 7.0).all(), sl


def test_adam_names_parameters_by_their_index_when_some_have_no_gradient():
    a, b, c = np.zeros(3), np.zeros(4), np.zeros(5)
    opt = Adam([a, b, c])
    with pytest.raises(ValueError, match=r"^grads\[2\] has shape \(4,\) but params\[2\]"):
        opt.step([None, None, np.zeros(4)])
    c.flags.writeable = False
    with pytest.raises(ValueError, match=r"^params\[2\] is read-only"):
        opt.step([np.zeros(3), None, np.zeros(5)])
    assert opt.state == {}


def test_two_threads_stepping_one_optimizer_never_lose_a_count():
    """Each call either raises RuntimeError (another step runs) or counts once: the step
    counts are read before the arrays are claimed, so two steps at once could both count from
    the same t (a wrong bias correction, silently)."""
    import threading

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(4):
            params = [np.ones(20_000, np.float32) for _ in range(4)]
            opt = Adam(params, lr=1e-3)
            grads = [np.ones(20_000, np.float32) for _ in range(4)]
            done = [0, 0]

            def work(k, opt=opt, grads=grads, done=done):
                for _ in range(50):
                    try:
                        opt.step(grads)
                        done[k] += 1
                    except RuntimeError as e:
                        assert "already running" in str(e)

            threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert [opt.state[i]["step"] for i in range(4)] == [sum(done)] * 4
    finally:
        sys.setswitchinterval(old)


def test_state_and_state_dict_entries_are_refused_by_name():
    from types import MappingProxyType

    opt = Adam([np.ones(3)])
    opt.step([np.ones(3)])
    good = opt.state[0]
    opt.state[0] = MappingProxyType(dict(good))
    with pytest.raises(ValueError, match="state of parameter 0 must be a dict"):
        opt.step([np.ones(3)])
    opt.state[0] = dict(good, step=np.int8(127))  # counted past int8's range, not wrapped
    opt.step([np.ones(3)])
    assert opt.state[0]["step"] == 128
    sd = opt.state_dict()
    entry = sd["state"][0]
    for bad, message in [
        ({True: entry}, "key True is not a parameter index"),
        ({0: entry, "0": entry}, "two states for parameter 0"),
        ({0: dict(entry, exp_avg=entry["exp_avg"] + 1j)}, "exp_avg has dtype complex128"),
    ]:
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict({**sd, "state": bad})
    assert opt.state[0]["step"] == 128
    with pytest.raises(ValueError, match=r"lr is 1000.*beyond the range of a float"):
        adam_step(*fresh(), 1, lr=10**400)


def test_a_stepped_optimizer_copies_and_pickles():
    """The step lock is not state: a deep copy or an unpickled optimizer steps on its own."""
    import copy
    import pickle

    opt = Adam([np.ones(3)], lr=0.1)
    opt.step([np.ones(3)])
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        twin.step([np.ones(3)])
        assert twin.state[0]["step"] == 2 and opt.state[0]["step"] == 1
        assert not np.array_equal(twin.params[0], opt.params[0])


def test_a_long_double_beyond_a_floats_range_is_named():
    """numpy converts it to inf without an error; an inf given as such is taken (as torch does)."""
    huge = np.longdouble("1e400")
    if np.isinf(huge):
        pytest.skip("this numpy's long double is a double")
    with pytest.raises(ValueError, match=r"lr is .*beyond the range of a float"):
        Adam([np.ones(2)], lr=huge)
    Adam([np.ones(2)], lr=float("inf"))


def test_masked_arrays_are_refused_not_stepped_past_their_mask():
    # The kernel sees only the data: a masked entry would be updated and a masked (hidden)
    # gradient would enter the moments.
    p = np.ma.array([1.0, 1.0, 1.0], mask=[False, True, False])
    g = np.ma.masked_invalid(np.array([0.5, np.nan, 0.5]))
    with pytest.raises(TypeError, match=r"^params\[0\] is a numpy\.ma\.MaskedArray"):
        Adam([p])
    q, m, v = np.ones(3), np.zeros(3), np.zeros(3)
    with pytest.raises(TypeError, match=r"^grad is a numpy\.ma\.MaskedArray"):
        adam_step(q, g, m, v, 1)
    opt = Adam([q])
    with pytest.raises(TypeError, match=r"^grads\[0\] is a numpy\.ma\.MaskedArray"):
        opt.step([g])
    np.testing.assert_array_equal(q, np.ones(3))
    assert opt.state == {} or all(s.get("step", 0) == 0 for s in opt.state.values())

    # Other subclasses (a memmap, say) are plain memory and step as ndarrays do.
    class Sub(np.ndarray):
        pass

    r = np.ones(3).view(Sub)
    adam_step(r, np.full(3, 0.5), np.zeros(3), np.zeros(3), 1, lr=0.1)
    np.testing.assert_allclose(np.asarray(r), 0.9)


def test_a_subclass_running_code_while_checked_cannot_retype_checked_arrays():
    # The masked-array check asked isinstance(), which reads a subclass's __class__ (a
    # property: any Python code), after other arrays had been checked: making them float32
    # views there (twice the elements) had the core write 2n float64 values into n-element
    # arrays. The arrays are read once, with no Python code in between.
    n = 1000
    buf = np.zeros(6 * n)
    p, outside, g, m = buf[:n], buf[n : 2 * n], buf[2 * n : 3 * n], buf[4 * n : 5 * n]
    g[:] = 1.0
    buf[3 * n : 4 * n] = 1.0  # what a view twice as long as g would read as its gradient
    ran = []

    class Retypes(np.ndarray):
        @property
        def __class__(self):
            if not ran:
                ran.append(1)
                for a in (p, g, m):
                    a.dtype = np.float32
            return Retypes

    v = np.zeros(2 * n).view(Retypes)  # as many elements as the others will have
    try:
        adam_step(p, g, m, v, 1, lr=0.5)
    except (TypeError, ValueError):
        pass  # refused: fine, as long as nothing outside the arguments changed
    assert not outside.any(), f"{np.count_nonzero(outside)} elements outside the arrays written"


def test_a_state_key_that_is_not_exactly_a_str_is_refused_before_anything_is_written():
    # The count is set after the arrays are written; a str subclass's own __eq__ ran there
    # (raising, it left the arrays stepped and the count where it was).
    class Key(str):
        def __hash__(self):
            return str.__hash__(self)

        def __eq__(self, other):
            raise RuntimeError("a key's own __eq__")

    w = np.zeros(4)
    opt = Adam([w], lr=0.1)
    opt.step([np.ones(4)])
    s = opt.state[0]
    opt.state[0] = {Key("step"): s["step"], "exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
    before = (w.copy(), s["exp_avg"].copy())
    with pytest.raises(ValueError, match=r"state of parameter 0 must be a dict with the keys"):
        opt.step([np.ones(4)])
    np.testing.assert_array_equal(w, before[0])
    np.testing.assert_array_equal(s["exp_avg"], before[1])


def test_empty_arrays_anywhere_in_memory_step():
    # numpy calls an empty array aligned wherever its pointer is: it must not become a slice
    # from a misaligned pointer (undefined behaviour), only an empty one.
    buf = bytearray(9)
    p = np.frombuffer(buf, dtype=np.float64, offset=1, count=0)
    assert p.ctypes.data % 8 != 0
    g, m, v = (np.frombuffer(bytearray(9), dtype=np.float64, offset=1, count=0) for _ in "gmv")
    m, v = m.copy(), v.copy()
    adam_step(p, g, m, v, 1)
    opt = Adam([np.zeros(0), np.ones(2)], lr=0.5)
    opt.step([g, np.ones(2)])
    assert [s["step"] for s in opt.state.values()] == [1, 1]


def test_an_error_of_a_step_counts_own_index_propagates():
    class Boom(Exception):
        pass

    class Step:
        def __index__(self):
            raise Boom("from __index__")

    p, g, m, v = fresh()
    with pytest.raises(Boom):
        adam_step(p, g, m, v, Step())
    np.testing.assert_array_equal(p, fresh()[0])
