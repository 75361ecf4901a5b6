"""The one-call step (``_core.step_plain``): where every parameter is plain it gives exactly the
general path's numbers; anywhere else it changes nothing and the general path takes over, with
the same results and the same errors."""

from __future__ import annotations

import collections

import pytest
import torch

from _attacks import assert_unchanged, snapshot
from rustadam import Adam, WeightDecay, _core


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(40, generator=gen).to(dtype)
    ps = [
        torch.nn.Parameter(torch.randn(8, 5, generator=gen).to(dtype)),
        torch.nn.Parameter(torch.randn(7, generator=gen).to(dtype)),
        torch.randn(5, 8, generator=gen).to(dtype).t(),  # dense, not contiguous
        base[::3],  # non-dense: stepped through a copy
        torch.nn.Parameter(torch.randn(3, generator=gen).to(dtype)),  # never has a gradient
    ]
    for p in ps:
        p.requires_grad_(True)
    return ps


def _grads(ps, k):
    gen = torch.Generator().manual_seed(100 + k)
    return [
        None if i == 4 else torch.randn(p.shape, generator=gen).to(p.dtype)
        for i, p in enumerate(ps)
    ]


def _spy(general: bool, calls: list):
    """``_core.step_plain`` that records whether it took each step; with ``general`` it takes
    none, so every step goes the general path."""
    real = _core.step_plain

    def spy(*a, **k):
        out = None if general else real(*a, **k)
        calls.append(out is not None)
        return out

    return spy


def _run(general: bool, monkeypatch, steps=4, dtype=torch.float32, **kw):
    ps = _params(dtype)
    groups = [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02, "betas": (0.8, 0.99)}]
    opt = Adam(groups, lr=0.05, weight_decay=WeightDecay(0.1), **kw)
    calls = []
    with monkeypatch.context() as m:
        m.setattr(_core, "step_plain", _spy(general, calls))
        for k in range(steps):
            for p, g in zip(ps, _grads(ps, k)):
                p.grad = g
            opt.step()
    return ps, opt, calls


@pytest.mark.parametrize(
    "dtype,kw",
    [
        (torch.float32, {}),
        (torch.float64, {"amsgrad": True, "maximize": True}),
        (torch.float32, {"optimized_update": False}),
        (torch.bfloat16, {"rounding": "stochastic", "seed": 2**64 - 7}),
        (torch.float16, {"rounding": "kahan"}),
        (torch.bfloat16, {}),
        (torch.complex64, {}),
    ],
)
def test_one_call_step_is_bit_identical_to_the_general_path(monkeypatch, dtype, kw):
    a, opt_a, calls_a = _run(False, monkeypatch, dtype=dtype, **kw)
    b, opt_b, calls_b = _run(True, monkeypatch, dtype=dtype, **kw)
    # The first step creates the states (general path); every later one takes the one call.
    assert calls_a == [False, True, True, True]
    assert calls_b == [False] * 4
    for pa, pb in zip(a, b):
        assert torch.equal(pa.detach(), pb.detach())
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert set(sa) == set(sb)
        for key in sa:
            va, vb = sa[key], sb[key]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), key
            else:
                assert va == vb and type(va) is type(vb), key


def _stepped_opt():
    ps = _params()
    opt = Adam([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.05)
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    opt.step()
    for p, g in zip(ps, _grads(ps, 1)):
        p.grad = g
    return ps, opt


def _plain(opt):
    return _core.step_plain(
        [(opt._config(gi, g), g["params"]) for gi, g in enumerate(opt.param_groups)],
        opt.state,
        seed=opt.seed,
        num_threads=1,
    )


class _Sub(torch.Tensor):
    pass


class _Dict(dict):
    def __getitem__(self, key):  # a lookup of the user's own
        return super().__getitem__(key)


def _make_unplain(case, ps, opt):
    """One unusual thing in the last group's parameter: the general path must see it."""
    p = ps[3]
    s = opt.state[p]
    if case == "bool step":
        s["step"] = True
    elif case == "float step":
        s["step"] = 1.0
    elif case == "tensor step":
        s["step"] = torch.tensor(1.0)
    elif case == "huge step":
        s["step"] = 2**63 - 1
    elif case == "negative step":
        s["step"] = -1
    elif case == "missing exp_avg":
        del s["exp_avg"]
    elif case == "state not a dict":
        opt.state[p] = collections.OrderedDict(s)
    elif case == "empty state":
        opt.state[p] = {}
    elif case == "state mapping of the user's":
        opt.state = _Dict(opt.state)
    elif case == "moment of another shape":
        s["exp_avg"] = torch.zeros(2)
    elif case == "moment is a subclass":
        s["exp_avg"] = s["exp_avg"].clone().as_subclass(_Sub)
    elif case == "gradient is a subclass":
        p.grad = p.grad.clone().as_subclass(_Sub)
    elif case == "gradient of another dtype":
        p.grad_dtype = None  # torch refuses it otherwise
        p.grad = p.grad.double()
    elif case == "sparse gradient":
        p.grad = p.grad.to_sparse()
    elif case == "negative view":
        s["exp_avg_sq"] = (-s["exp_avg_sq"])._neg_view()  # reads as v
    elif case == "moments share memory":
        s["exp_avg_sq"] = s["exp_avg"]
    elif case == "params not a list":
        opt.param_groups[1]["params"] = tuple(opt.param_groups[1]["params"])
    else:
        raise AssertionError(case)


CASES = [
    "bool step",
    "float step",
    "tensor step",
    "huge step",
    "negative step",
    "missing exp_avg",
    "state not a dict",
    "empty state",
    "state mapping of the user's",
    "moment of another shape",
    "moment is a subclass",
    "gradient is a subclass",
    "gradient of another dtype",
    "sparse gradient",
    "negative view",
    "moments share memory",
    "params not a list",
]


def _outcome(opt, ps):
    """What a step did: the parameters' values, or the error's type and message."""
    try:
        opt.step()
        return ("stepped", [p.detach().clone() for p in ps])
    except Exception as e:
        return (type(e).__name__, str(e))


def _assert_same_outcome(outcomes):
    (ka, va), (kb, vb) = outcomes
    assert ka == kb, outcomes
    if ka == "stepped":
        assert all(torch.equal(x, y) for x, y in zip(va, vb))
    else:
        assert va == vb


@pytest.mark.parametrize("case", CASES)
def test_anything_unusual_leaves_the_one_call_with_nothing_changed(case):
    ps, opt = _stepped_opt()
    _make_unplain(case, ps, opt)
    snap = snapshot(opt)
    assert _plain(opt) is None
    assert_unchanged(opt, snap, case)


@pytest.mark.parametrize("case", CASES)
def test_the_general_path_then_does_what_it_always_did(monkeypatch, case):
    """Same outcome (values or error message) with the one call as with the general path
    alone."""
    outcomes = []
    for general in (False, True):
        ps, opt = _stepped_opt()
        _make_unplain(case, ps, opt)
        if general:
            monkeypatch.setattr(_core, "step_plain", lambda *a, **k: None)
        outcomes.append(_outcome(opt, ps))
        monkeypatch.undo()
    _assert_same_outcome(outcomes)


def test_one_call_is_all_or_nothing_across_groups():
    """A refusal in the last group, found after the first group was read, changes nothing."""
    ps, opt = _stepped_opt()
    opt.state[ps[4]]  # a parameter without a gradient may have an empty state: not read
    opt.state[ps[3]]["exp_avg"] = torch.zeros(99)
    snap = snapshot(opt)
    assert _plain(opt) is None
    assert_unchanged(opt, snap)
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[1\].*exp_avg"):
        opt.step()
    assert_unchanged(opt, snap)


def test_one_call_bumps_versions_and_steps_counts():
    ps, opt = _stepped_opt()
    before = [p._version for p in ps]
    moments = [opt.state[p]["exp_avg"]._version for p in ps[:4]]
    written = _plain(opt)
    assert written is not None
    # Parameters and moments are in the list; gradients (only read) are not.
    ids = {id(t) for t in written}
    assert all(id(p) in ids for p in ps[:4]) and id(ps[4]) not in ids
    assert all(id(p.grad) not in ids for p in ps[:4])
    assert [opt.state[p]["step"] for p in ps[:4]] == [2, 2, 2, 2]
    assert "step" not in opt.state.get(ps[4], {})
    opt.zero_grad()
    for p, g in zip(ps, _grads(ps, 2)):
        p.grad = g
    opt.step()  # through the optimizer: the versions move
    assert all(p._version > v for p, v in zip(ps[:4], before))
    assert all(opt.state[p]["exp_avg"]._version > v for p, v in zip(ps[:4], moments))


def test_parameter_seed_is_the_documented_formula():
    """docs/NUMERICS.md: parameter i of group g gets ``s ^ (mix(g) << 32) ^ mix(i)``, each
    position mod 2**32 (the host-side ``mix_int`` is tested against the kernel's hash)."""
    from rustadam import _rounding

    for s in (0, 1, 2**63 + 12345, 2**64 - 1):
        for g, i in ((0, 0), (0, 1), (3, 7), (1, 2**32 + 5), (2**32 + 1, 9)):
            expected = (s ^ (_rounding.mix_int(g) << 32) ^ _rounding.mix_int(i)) % 2**64
            assert _core.param_seed(s, g, i) == expected, (s, g, i)


def test_a_parameter_on_another_device_leaves_before_any_state_lookup(monkeypatch):
    """A GPU (here: meta) model must not pay the gathering on every step only to be refused."""
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    p.grad = torch.zeros(3, device="meta")
    opt = Adam([p])
    opt.state[p] = {"step": 1, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    hashed = []
    real = torch.Tensor.__hash__
    monkeypatch.setattr(torch.Tensor, "__hash__", lambda t: hashed.append(1) or real(t))
    assert _plain(opt) is None
    assert hashed == []
    assert opt.state[p]["step"] == 1


def test_a_later_parameter_on_another_device_is_refused_by_the_plan(monkeypatch):
    """The one call asks only a group's first parameter for its device; one further on is
    refused by the plan, having changed nothing, and the general path gives its usual outcome."""
    outcomes = []
    for general in (False, True):
        ps, opt = _stepped_opt()
        q = torch.nn.Parameter(torch.zeros(ps[3].shape, device="meta"))
        q.grad = torch.zeros(q.shape, device="meta")
        opt.param_groups[1]["params"][1] = q  # group 1 is [ps[2], q, ps[4]]
        opt.state[q] = opt.state.pop(ps[3])
        cpu = [t for p in ps[:3] for t in (p, *opt.state[p].values()) if torch.is_tensor(t)]
        before = [t.clone() for t in cpu]
        steps = [opt.state[p]["step"] for p in ps[:3]]
        if not general:
            assert _plain(opt) is None
            assert all(torch.equal(a, b) for a, b in zip(cpu, before))
            assert [opt.state[p]["step"] for p in ps[:3]] == steps
        else:
            monkeypatch.setattr(_core, "step_plain", lambda *a, **k: None)
        outcomes.append(_outcome(opt, ps[:3]))
        monkeypatch.undo()
    _assert_same_outcome(outcomes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_many_dimensions_step_as_the_general_path(monkeypatch, dtype):
    """Five and six dimensions (a complex one is a real one with a trailing (re, im)): sizes and
    strides kept past the inline capacity of the glue give the general path's numbers, dense
    and through a copy."""
    outs = []
    for general in (False, True):
        gen = torch.Generator().manual_seed(3)
        dense = torch.nn.Parameter(torch.randn(2, 1, 3, 2, 2, generator=gen).to(dtype))
        wide = torch.randn(3, 2, 2, 3, 2, 4, generator=gen).to(dtype)
        strided = wide[:, :, :, :, :, ::2].requires_grad_(True)  # not dense: a copy
        opt = Adam([dense, strided], lr=0.05)
        taken = []
        monkeypatch.setattr(_core, "step_plain", _spy(general, taken))
        for k in range(3):
            g = torch.Generator().manual_seed(10 + k)
            dense.grad = torch.randn(dense.shape, generator=g).to(dtype)
            strided.grad = torch.randn(strided.shape, generator=g).to(dtype)
            opt.step()
        monkeypatch.undo()
        assert taken == [False, not general, not general]
        outs.append([dense.detach().clone(), strided.detach().clone()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def _many():
    """Forty parameters of mixed layouts (dense, transposed, strided through a copy, tiny), as
    tensors and as Parameters: lists long enough that the one call's cache hints run ahead of
    every parameter it gathers and reads."""
    gen = torch.Generator().manual_seed(5)
    ps = []
    for i in range(40):
        t = [
            lambda: torch.randn(6, 5, generator=gen),
            lambda: torch.randn(5, 6, generator=gen).t(),
            lambda: torch.randn(20, generator=gen)[::2],
            lambda: torch.randn(3, generator=gen),
        ][i % 4]()
        ps.append(torch.nn.Parameter(t) if i % 3 else t.requires_grad_(True))
    return ps


def _alter(case, m, ps, opt, hashed):
    if case in ("Tensor.__hash__ replaced", "Parameter.__hash__ replaced"):
        real = torch.Tensor.__hash__
        cls = torch.Tensor if case.startswith("Tensor") else torch.nn.Parameter
        m.setattr(cls, "__hash__", lambda t: hashed.append(1) or real(t))
    elif case == "a key that is not a tensor":
        opt.state["note"] = {"step": 7}
    elif case == "the state of a parameter no longer optimized":
        opt.param_groups[1]["params"].pop(3)
    else:
        assert case == "plain", case


@pytest.mark.parametrize(
    "case",
    [
        "plain",
        "Tensor.__hash__ replaced",
        "Parameter.__hash__ replaced",
        "a key that is not a tensor",
        "the state of a parameter no longer optimized",
    ],
)
def test_many_parameters_and_the_state_lookup_match_the_general_path(monkeypatch, case):
    """The one call finds each parameter's state by its identity where a dict lookup finds the
    same entries (every key exactly a tensor, torch's identity hash in place), and through the
    dict otherwise: with either, it is taken and gives the general path's numbers."""
    outs = []
    for general in (False, True):
        ps = _many()
        opt = Adam([{"params": ps[:25]}, {"params": ps[25:], "lr": 0.02}], lr=0.05)
        calls, hashed, hashed_inside = [], [], []
        spy = _spy(general, calls)

        def counting(*a, spy=spy, hashed=hashed, inside=hashed_inside, **k):
            n = len(hashed)
            out = spy(*a, **k)
            inside.append(len(hashed) - n)
            return out

        with monkeypatch.context() as m:
            m.setattr(_core, "step_plain", counting)
            for k in range(3):
                gen = torch.Generator().manual_seed(50 + k)
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
                if k == 0:
                    _alter(case, m, ps, opt, hashed)
        assert calls == [False, not general, not general]
        if "replaced" in case and not general:
            # The dict's own lookup, through the replaced hash, once per parameter it serves.
            served = [p for p in ps if case.startswith("Tensor") or type(p) is torch.nn.Parameter]
            assert hashed_inside[1:] == [len(served)] * 2
        outs.append([p.detach().clone() for p in ps] + [dict(opt.state[p]) for p in ps])
    for a, b in zip(*outs):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            assert all(
                torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a
            )
        else:
            assert torch.equal(a, b)
