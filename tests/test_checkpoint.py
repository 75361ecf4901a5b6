"""Checkpoints: state_dict round trips, interop with torch.optim.Adam/AdamW, casting, bad input.

The oracle for "training continues as it would have" is the run that was never interrupted
(bit-identical, same optimizer) or torch.optim's own continuation where the spec coincides with
it (``optimized_update=False``; L2 with ``weight_decouple=False`` is torch.optim.Adam's
``weight_decay``, decoupled is AdamW's).
"""

from __future__ import annotations

import copy
import io
from typing import Any, Callable

import pytest
import torch
from torch import nn

from rustadam import Adam, WeightDecay

BACKENDS = ("rust", "torch")
EPS = 1e-8


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)
    # A parameter that never gets a gradient: no state, and state_dict must cope with that.
    model[2].frozen = nn.Parameter(torch.ones(2, dtype=dtype))
    return model


def groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups with their own hyper-parameters; ``frozen`` rides along without a grad."""
    return [
        {"params": list(model[0].parameters())},
        {"params": list(model[2].parameters()), "lr": 3e-3, "betas": (0.8, 0.99)},
    ]


def data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=gen, dtype=dtype), torch.randn(16, 3, generator=gen)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    p = next(model.parameters())
    x, y = data(p.dtype)
    x, y = x.to(p.device), y.to(p.device, p.dtype)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()


def saved(obj: Any) -> Any:
    """``obj`` through torch.save and torch.load(weights_only=True), as a checkpoint is."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_params(a: nn.Module, b: nn.Module, **tol: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if tol:
            torch.testing.assert_close(p, q, **tol, msg=name)
        else:
            assert torch.equal(p, q), name


def snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    return copy.deepcopy(opt.state_dict())


def assert_same_state_dict(a: Any, b: Any, path: str = "") -> None:
    """Exact equality of nested state_dicts (tensors bit for bit, same dtype and device)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.device == b.device, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same_state_dict(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state_dict(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, path


@pytest.mark.parametrize("optimized_update", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_continues_bit_identically(backend: str, optimized_update: bool) -> None:
    def new(model: nn.Module) -> Adam:
        return Adam(
            groups(model),
            lr=1e-2,
            weight_decay=WeightDecay(0.01),
            optimized_update=optimized_update,
            backend=backend,
        )

    model = make_model()
    opt = new(model)
    train(model, opt, 4)
    checkpoint = saved({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, 4)  # the uninterrupted run

    resumed = make_model()
    resumed.load_state_dict(checkpoint["model"])
    ropt = new(resumed)
    ropt.load_state_dict(checkpoint["opt"])
    assert all(type(s["step"]) is int and s["step"] == 4 for s in ropt.state.values())
    assert len(ropt.state) == 4  # not the grad-less parameter
    train(resumed, ropt, 4)

    assert_same_params(model, resumed)
    assert_same_state_dict(opt.state_dict(), ropt.state_dict())


def torch_reference(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "AdamW":
        return torch.optim.AdamW(params, lr=1e-2, eps=EPS, weight_decay=0.05, foreach=False)
    wd = 0.05 if kind == "Adam-L2" else 0.0
    return torch.optim.Adam(params, lr=1e-2, eps=EPS, weight_decay=wd, foreach=False)


def matching_rustadam(kind: str, params: Any, backend: str) -> Adam:
    """The rustadam configuration that computes what ``torch_reference(kind)`` computes."""
    wd = {
        "Adam": WeightDecay(0.0),
        "Adam-L2": WeightDecay(0.05, weight_decouple=False),
        "AdamW": WeightDecay(0.05),
    }[kind]
    return Adam(params, lr=1e-2, eps=EPS, weight_decay=wd, optimized_update=False, backend=backend)


# float64 so that the two implementations' rounding (torch.optim uses lerp for m) stays far
# below the tolerance: each step differs by ~1e-16 relative, 8 steps cannot reach 1e-11.
F64_TOL = {"rtol": 1e-11, "atol": 1e-13}


@pytest.mark.parametrize("kind", ["Adam", "Adam-L2", "AdamW"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_state_dict_loads_and_training_continues_as_torch(kind: str, backend: str) -> None:
    model = make_model(torch.float64)
    topt = torch_reference(kind, model.parameters())
    train(model, topt, 4)
    checkpoint = saved({"model": model.state_dict(), "opt": topt.state_dict()})
    assert isinstance(checkpoint["opt"]["state"][0]["step"], torch.Tensor)
    train(model, topt, 4)  # torch's own continuation

    ours = make_model(torch.float64)
    ours.load_state_dict(checkpoint["model"])
    opt = matching_rustadam(kind, ours.parameters(), backend)
    opt.load_state_dict(checkpoint["opt"])
    for p in ours.parameters():
        if p.requires_grad and p is not ours[2].frozen:
            assert type(opt.state[p]["step"]) is int and opt.state[p]["step"] == 4
    train(ours, opt, 4)

    assert_same_params(model, ours, **F64_TOL)
    for p, q in zip(model.parameters(), ours.parameters()):
        if p is model[2].frozen:
            continue
        assert opt.state[q]["step"] == int(topt.state[p]["step"]) == 8
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[q][key], topt.state[p][key], **F64_TOL)


@pytest.mark.parametrize("kind", ["Adam", "Adam-L2", "AdamW"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rustadam_state_dict_loads_into_torch_and_training_continues(
    kind: str, backend: str
) -> None:
    model = make_model(torch.float64)
    opt = matching_rustadam(kind, model.parameters(), backend)
    train(model, opt, 4)
    checkpoint = saved({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, 4)

    theirs = make_model(torch.float64)
    theirs.load_state_dict(checkpoint["model"])
    topt = torch_reference(kind, theirs.parameters())
    topt.load_state_dict(checkpoint["opt"])
    # torch.optim.Adam turns the int count into its float tensor itself.
    step = topt.state[theirs[0].weight]["step"]
    assert isinstance(step, torch.Tensor) and step.item() == 4
    train(theirs, topt, 4)

    assert_same_params(model, theirs, **F64_TOL)


@pytest.mark.parametrize("source", ["rustadam", "torch"])
def test_loading_onto_float64_params_casts_state_like_torch(source: str) -> None:
    model = make_model(torch.float32)
    if source == "torch":
        first = torch.optim.Adam(model.parameters(), lr=1e-2, eps=EPS)
    else:
        first = Adam(model.parameters(), lr=1e-2, eps=EPS, optimized_update=False)
    train(model, first, 3)
    sd = saved(first.state_dict())

    wide = make_model(torch.float64)
    wide.load_state_dict(model.state_dict())
    opt = Adam(wide.parameters(), lr=1e-2, eps=EPS, optimized_update=False, backend="rust")
    opt.load_state_dict(sd)
    # torch.optim.Adam's own behaviour on the same state_dict: the same dtypes and values.
    topt = torch.optim.Adam(make_model(torch.float64).parameters(), lr=1e-2, eps=EPS)
    topt.load_state_dict(sd)
    for i, (p, tp) in enumerate(zip(wide.parameters(), topt.param_groups[0]["params"])):
        if p is wide[2].frozen:
            assert p not in opt.state
            continue
        state, tstate = opt.state[p], topt.state[tp]
        assert state["step"] == 3 and type(state["step"]) is int
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == tstate[key].dtype == torch.float64, (i, key)
            assert torch.equal(state[key], sd["state"][i][key].double()), (i, key)
    # And it trains on, on the Rust core's float64 kernel, like torch from the same point.
    train(wide, opt, 3)
    theirs = make_model(torch.float64)
    theirs.load_state_dict(model.state_dict())
    ref = torch.optim.Adam(theirs.parameters(), lr=1e-2, eps=EPS, foreach=False)
    ref.load_state_dict(sd)
    train(theirs, ref, 3)
    assert_same_params(wide, theirs, **F64_TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loading_onto_cuda_params_moves_state_like_torch() -> None:
    model = make_model()
    opt = Adam(model.parameters(), lr=1e-2)
    train(model, opt, 3)
    checkpoint = saved({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, 3)

    gpu = make_model().cuda()
    gpu.load_state_dict(checkpoint["model"])
    gopt = Adam(gpu.parameters(), lr=1e-2)
    gopt.load_state_dict(checkpoint["opt"])
    for p in gpu.parameters():
        if p is gpu[2].frozen:
            continue
        assert type(gopt.state[p]["step"]) is int and gopt.state[p]["step"] == 3
        assert gopt.state[p]["exp_avg"].device == gopt.state[p]["exp_avg_sq"].device == p.device
    train(gpu, gopt, 3)  # CUDA tensors take the torch path
    # CUDA's float32 arithmetic against the CPU Rust core's: rounding-level apart.
    for p, q in zip(model.parameters(), gpu.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-5, atol=1e-6)


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda sd: sd.pop(key)


def _set_state(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(sd: dict[str, Any]) -> None:
        sd["state"][0][key] = value

    return edit


def _del_state(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda sd: sd["state"][0].pop(key)


def _set_group(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(sd: dict[str, Any]) -> None:
        sd["param_groups"][0][key] = value

    return edit


def _del_group(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda sd: sd["param_groups"][0].pop(key)


def _more_groups(sd: dict[str, Any]) -> None:
    sd["param_groups"].append(dict(sd["param_groups"][1], params=[]))


def _fewer_params(sd: dict[str, Any]) -> None:
    sd["param_groups"][1]["params"].pop()


BAD = {
    "no state": (_drop("state"), "no 'state' entry"),
    "no param_groups": (_drop("param_groups"), "no 'param_groups' entry"),
    "group count": (_more_groups, "different number of parameter groups: 3, the optimizer has 2"),
    "group size": (_fewer_params, r"param_groups\[1\] has 2 parameters, the optimizer's has 3"),
    "no exp_avg": (_del_state("exp_avg"), r"has no \['exp_avg'\]"),
    "no step": (_del_state("step"), r"has no \['step'\]"),
    "shape": (_set_state("exp_avg_sq", torch.zeros(7, 4)), r"'exp_avg_sq' of shape \(7, 4\)"),
    "scalar moment": (_set_state("exp_avg", 0.0), "a float as 'exp_avg', not a tensor"),
    "negative step": (_set_state("step", -1), "step=-1; expected a count"),
    "fractional step": (_set_state("step", torch.tensor(2.5)), "expected a count"),
    # The next update would count past int64: every later step would be refused.
    "last int64 step": (_set_state("step", 2**63 - 1), "below 2\\*\\*63 - 1"),
    "huge float step": (_set_state("step", torch.tensor(2.0**63)), "below 2\\*\\*63 - 1"),
    "state not a dict": (_set_state("exp_avg", None), "a NoneType as 'exp_avg'"),
    "no lr": (_del_group("lr"), r"param_groups\[0\] of the loaded state dict has no \['lr'\]"),
    "no weight_decay": (_del_group("weight_decay"), r"has no \['weight_decay'\]"),
    # amsgrad needs the running maximum, which this state lacks.
    "amsgrad": (_set_group("amsgrad", True), r"has no \['max_exp_avg_sq'\]"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_that_does_not_fit_raises_and_changes_nothing(case: str, backend: str) -> None:
    edit, message = BAD[case]
    model = make_model()
    opt = Adam(groups(model), lr=1e-2, weight_decay=WeightDecay(0.01), backend=backend)
    train(model, opt, 2)
    bad = snapshot(opt)
    edit(bad)
    before = snapshot(opt)
    state_objects = {id(t) for s in opt.state.values() for t in s.values()}
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert_same_state_dict(before, opt.state_dict())
    assert state_objects == {id(t) for s in opt.state.values() for t in s.values()}
    # Nothing was left behind either: training goes on exactly as an untouched optimizer's.
    twin = make_model()
    twin_opt = Adam(groups(twin), lr=1e-2, weight_decay=WeightDecay(0.01), backend=backend)
    train(twin, twin_opt, 2)
    train(model, opt, 2)
    train(twin, twin_opt, 2)
    assert_same_params(model, twin)


def test_state_of_a_non_dict_is_rejected() -> None:
    model = make_model()
    opt = Adam(model.parameters())
    train(model, opt, 1)
    bad = snapshot(opt)
    bad["state"][0] = torch.zeros(7, 5)
    with pytest.raises(ValueError, match="is a Tensor, not a dict"):
        opt.load_state_dict(bad)


@pytest.mark.parametrize(
    ("source", "ours", "ok"),
    [
        ("Adam-L2", WeightDecay(0.05, weight_decouple=False), True),
        ("Adam-L2", WeightDecay(0.05), False),
        ("AdamW", WeightDecay(0.05), True),
        ("AdamW", WeightDecay(0.05, weight_decouple=False), False),
        ("AdamW", WeightDecay(0.05, absolute=True), False),
    ],
)
def test_weight_decay_of_the_other_kind_is_refused(
    source: str, ours: WeightDecay, ok: bool
) -> None:
    """A torch state_dict says whether its λ is L2 or decoupled; continuing with the other
    kind would silently train another model."""
    model = make_model()
    topt = torch_reference(source, model.parameters())
    train(model, topt, 1)
    opt = Adam(model.parameters(), weight_decay=ours)
    if ok:
        opt.load_state_dict(topt.state_dict())
        assert opt.param_groups[0]["weight_decay"] == 0.05
    else:
        with pytest.raises(ValueError, match=r"weight decay 0\.05"):
            opt.load_state_dict(topt.state_dict())
        assert opt.state_dict()["state"] == {}


def test_state_of_unlisted_ids_is_kept_as_torch_does() -> None:
    """torch keeps state under ids no group lists (old checkpoints); so does rustadam."""
    model = make_model()
    opt = Adam(model.parameters())
    train(model, opt, 1)
    sd = snapshot(opt)
    sd["state"][99] = {"anything": 1}
    opt.load_state_dict(sd)
    assert opt.state[99] == {"anything": 1}
    train(model, opt, 1)
