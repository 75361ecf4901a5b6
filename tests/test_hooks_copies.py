"""torch.optim's hooks on rustadam.Adam, and copies: deepcopy, pickle, repr."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from rustadam import Adam, WeightDecay

BACKENDS = ("rust", "torch")


def make(backend: str, **kwargs: Any) -> tuple[nn.Module, Adam]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = Adam(
        [
            {"params": list(model[0].parameters())},
            {"params": list(model[2].parameters()), "lr": 3e-3, "betas": (0.8, 0.99)},
        ],
        lr=1e-2,
        backend=backend,
        **kwargs,
    )
    return model, opt


def loss(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    return (model(x) - y).pow(2).mean()


def train(model: nn.Module, opt: Adam, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        loss(model).backward()
        opt.step()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---- hooks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_hooks_local_and_global_run_in_torch_order(backend: str) -> None:
    model, opt = make(backend)
    calls: list[tuple[str, bool]] = []
    start = params_of(model)

    def recorder(name: str) -> Any:
        def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            assert optimizer is opt
            moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), start))
            calls.append((name, moved))

        return hook

    handles = [
        register_optimizer_step_pre_hook(recorder("global pre")),
        register_optimizer_step_post_hook(recorder("global post")),
        opt.register_step_pre_hook(recorder("pre")),
        opt.register_step_post_hook(recorder("post")),
    ]
    try:
        opt.zero_grad()
        loss(model).backward()
        opt.step()
    finally:
        for h in handles:
            h.remove()
    # Pre-hooks see the parameters before the update, post-hooks after it.
    assert calls == [
        ("global pre", False),
        ("pre", False),
        ("post", True),
        ("global post", True),
    ]
    calls.clear()
    train(model, opt, 1)
    assert calls == []  # removed handles are gone


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_pre_hook_may_replace_the_arguments(backend: str) -> None:
    model, opt = make(backend)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss(model)
        value.backward()
        return value

    opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": closure}))
    start = params_of(model)
    returned = opt.step()  # no closure given: the hook supplies it
    assert isinstance(returned, torch.Tensor) and returned.item() > 0
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start))


def test_step_hooks_run_once_when_a_subclass_overrides_step() -> None:
    class Logged(Adam):
        def step(self, closure: Any = None) -> Any:
            self.calls.append("step")
            return super().step(closure)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    opt = Logged(model.parameters(), lr=1e-2)
    opt.calls = []
    opt.register_step_pre_hook(lambda o, a, k: opt.calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: opt.calls.append("post"))
    handle = register_optimizer_step_pre_hook(lambda o, a, k: opt.calls.append("global pre"))
    try:
        train(model, opt, 2)
    finally:
        handle.remove()
    assert opt.calls == ["global pre", "pre", "step", "post"] * 2


def test_the_profiler_records_the_step_under_torchs_name() -> None:
    model, opt = make("rust")
    opt.zero_grad()
    loss(model).backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = [e.name for e in prof.events()]
    assert names.count("Optimizer.step#Adam.step") == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_hooks(backend: str) -> None:
    model, opt = make(backend)
    train(model, opt, 2)
    seen: list[str] = []

    def pre(optimizer: Any) -> None:
        seen.append("pre")

    def post(optimizer: Any, sd: dict[str, Any]) -> dict[str, Any]:
        seen.append("post")
        sd["run"] = "exp-7"  # a post-hook may add to the dict it returns
        return sd

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert seen == ["pre", "post"] and sd["run"] == "exp-7"
    assert sd["state"][0]["step"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_hooks_run_around_loading_and_before_the_checks(backend: str) -> None:
    model, opt = make(backend)
    train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    # An old checkpoint format, say: the moments under other names. rustadam refuses it as it
    # is, and takes it once a user pre-hook has renamed them.
    for s in sd["state"].values():
        s["m"], s["v"] = s.pop("exp_avg"), s.pop("exp_avg_sq")
    twin_model, twin = make(backend)
    with pytest.raises(ValueError, match="has no"):
        twin.load_state_dict(sd)

    seen: list[str] = []

    def rename(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        seen.append("pre")
        state = {
            k: {"step": s["step"], "exp_avg": s["m"], "exp_avg_sq": s["v"]}
            for k, s in state_dict["state"].items()
        }
        return {"state": state, "param_groups": state_dict["param_groups"]}

    def post(optimizer: Any) -> None:
        seen.append("post")
        assert all(s["step"] == 2 for s in optimizer.state.values())

    twin.register_load_state_dict_pre_hook(rename)
    twin.register_load_state_dict_post_hook(post)
    twin.load_state_dict(sd)
    assert seen == ["pre", "post"]
    twin_model.load_state_dict(model.state_dict())
    train(model, opt, 2)
    train(twin_model, twin, 2)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


# ---- copies ------------------------------------------------------------------------------------


def configured(backend: str) -> tuple[nn.Module, Adam]:
    """Every setting away from its default, so a copy that drops one shows."""
    model, opt = make(
        backend,
        eps=1e-3,
        weight_decay=WeightDecay(0.3, weight_decouple=False),
        optimized_update=False,
        num_threads=1,
    )
    opt.note = "a public attribute of the user's"
    return model, opt


def assert_copied(opt: Adam, other: Adam) -> None:
    assert type(other) is type(opt)
    assert other.weight_decay == opt.weight_decay and other.weight_decay is not opt.weight_decay
    assert other.optimized_update is False and other.backend == opt.backend
    assert other.num_threads == 1 and other.note == opt.note
    # torch.optim's __setstate__ adds differentiable=False to the defaults of every copy.
    assert {k: v for k, v in other.defaults.items() if k != "differentiable"} == opt.defaults
    for g, h in zip(opt.param_groups, other.param_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {
            k: v for k, v in h.items() if k != "params"
        }


def copy_by(how: str, obj: Any) -> Any:
    if how == "deepcopy":
        return copy.deepcopy(obj)
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_copy_keeps_every_setting_and_trains_identically(backend: str, how: str) -> None:
    model, opt = configured(backend)
    train(model, opt, 3)
    model2, opt2 = copy_by(how, (model, opt))
    assert_copied(opt, opt2)
    # The copy's groups and state hold the copied model's parameters, not the original's.
    assert [p for g in opt2.param_groups for p in g["params"]] == list(model2.parameters())
    for p, q in zip(model.parameters(), model2.parameters()):
        s, t = opt.state[p], opt2.state[q]
        assert s["step"] == t["step"] == 3 and type(t["step"]) is int
        assert torch.equal(s["exp_avg"], t["exp_avg"]) and s["exp_avg"] is not t["exp_avg"]
    # Both go on alike, and stepping one leaves the other alone.
    before = params_of(model)
    train(model2, opt2, 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    train(model, opt, 2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_copy_of_an_optimizer_under_an_lr_scheduler_steps_only_itself(backend: str) -> None:
    """Schedulers patch ``opt.step`` with a wrapper that calls the original optimizer; a copy
    must not take it along (torch's copies don't)."""
    model, opt = configured(backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, 1)
    sched.step()
    model2, opt2 = copy.deepcopy((model, opt))
    assert_copied(opt, opt2)
    before = params_of(model)
    train(model2, opt2, 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt2.state[next(model2.parameters())]["step"] == 2
    assert opt.state[next(model.parameters())]["step"] == 1


def test_copy_drops_hooks_like_torch() -> None:
    model, opt = make("auto")
    calls: list[int] = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    model2, opt2 = copy.deepcopy((model, opt))
    train(model2, opt2, 1)
    assert calls == []
    tmodel = copy.deepcopy(model)
    topt = torch.optim.Adam(tmodel.parameters())
    topt.register_step_post_hook(lambda *a: calls.append(2))
    tmodel2, topt2 = copy.deepcopy((tmodel, topt))
    train(tmodel2, topt2, 1)
    assert calls == []


class WarmUp(Adam):
    """A subclass as the spec has them: a warm-up through ``get_lr``."""

    def get_lr(self, state: dict[str, Any], group: dict[str, Any]) -> float:
        return group["lr"] * min(1.0, state["step"] / 4)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_subclass_copy_keeps_its_override(how: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = WarmUp(model.parameters(), lr=0.1)
    model2, opt2 = copy_by(how, (model, opt))
    assert type(opt2) is WarmUp
    train(model, opt, 3)
    train(model2, opt2, 3)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_repr_shows_hyper_parameters_and_weight_decay() -> None:
    _, opt = configured("rust")
    text = repr(opt)
    assert text.startswith("Adam (\n")
    for line in [
        "weight_decay: WeightDecay(weight_decay=0.3, weight_decouple=False, absolute=False)",
        "optimized_update: False",
        "backend: 'rust'",
        "num_threads: 1",
        "Parameter Group 0",
        "    lr: 0.01",
        "    eps: 0.001",
        "    betas: (0.9, 0.999)",
        "    weight_decay: 0.3",
        "Parameter Group 1",
        "    lr: 0.003",
        "    betas: (0.8, 0.99)",
    ]:
        assert line + "\n" in text, line
    assert text.endswith(")")


def test_weight_decay_equality_and_repr() -> None:
    a = WeightDecay(0.1, weight_decouple=False)
    assert a == WeightDecay(0.1, weight_decouple=False)
    assert a != WeightDecay(0.1) and a != WeightDecay(0.2, weight_decouple=False)
    assert hash(a) == hash(copy.deepcopy(a))
    assert pickle.loads(pickle.dumps(a)) == a
    assert repr(a) == "WeightDecay(weight_decay=0.1, weight_decouple=False, absolute=False)"
