"""Subclasses that override the per-parameter methods get exactly their own behaviour."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import numpy as np
import pytest
import torch

from oracle import AdamOracle
from rustadam import Adam, WeightDecay

BACKENDS = ("rust", "torch", "auto")
STEPS = 40
# float64 throughout: both sides evaluate the same formulas at 2^-53, so after 40 steps they
# agree to ~1e-14; 1e-11 leaves a wide margin and is still 1e8 below any override's effect.
TOL = {"rtol": 1e-11, "atol": 1e-11}


class WarmupAdam(Adam):
    """Linear warm-up of the learning rate over ``group['warmup']`` updates."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: WeightDecay = WeightDecay(),  # noqa: B008
        optimized_update: bool = True,
        warmup: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, optimized_update, {"warmup": warmup}, **kwargs
        )

    def get_lr(self, state: dict[str, Any], group: dict[str, Any]) -> float:
        if state["step"] < group["warmup"]:
            return 1e-8 + state["step"] * group["lr"] / group["warmup"]
        return group["lr"]


class AMSGrad(Adam):
    """Adam with v replaced by the running maximum of v in the update."""

    def init_state(self, state: dict[str, Any], group: dict[str, Any], param: torch.Tensor) -> None:
        super().init_state(state, group, param)
        state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def get_mv(
        self, state: dict[str, Any], group: dict[str, Any], grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m, v = super().get_mv(state, group, grad)
        torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
        return m, state["max_exp_avg_sq"]


class ClampedAdam(Adam):
    """An Adam step followed by clipping θ to [-bound, bound]."""

    def __init__(self, params: Any, lr: float = 1e-3, bound: float = 1.0, **kwargs: Any) -> None:
        super().__init__(
            params, lr, (0.9, 0.999), 1e-16, WeightDecay(), True, {"bound": bound}, **kwargs
        )

    def step_param(
        self, state: dict[str, Any], group: dict[str, Any], grad: torch.Tensor, param: torch.Tensor
    ) -> None:
        super().step_param(state, group, grad, param)
        param.clamp_(-group["bound"], group["bound"])


# Their oracles, each following the same math in numpy.


class WarmupOracle(AdamOracle):
    def get_lr(self, state: dict[str, Any], group: dict[str, Any]) -> float:
        if state["step"] < group["warmup"]:
            return 1e-8 + state["step"] * group["lr"] / group["warmup"]
        return group["lr"]


class AMSGradOracle(AdamOracle):
    def init_state(self, state: dict[str, Any], group: dict[str, Any], param: np.ndarray) -> None:
        super().init_state(state, group, param)
        state["max_exp_avg_sq"] = np.zeros_like(param)

    def get_mv(
        self, state: dict[str, Any], group: dict[str, Any], grad: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        m, v = super().get_mv(state, group, grad)
        state["max_exp_avg_sq"] = np.maximum(state["max_exp_avg_sq"], v)
        return m, state["max_exp_avg_sq"]


class ClampedOracle(AdamOracle):
    def step_param(
        self, state: dict[str, Any], group: dict[str, Any], grad: np.ndarray, param: np.ndarray
    ) -> np.ndarray:
        new = super().step_param(state, group, grad, param)
        return np.clip(new, -group["bound"], group["bound"])


def gradients(shapes: list[tuple], seed: int, scale: Any = 1.0) -> list[list[np.ndarray]]:
    """grads[step][param]; ``scale(step)`` may vary the size over time; param 1 skips step 3."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(1, STEPS + 1):
        k = scale(s) if callable(scale) else scale
        out.append(
            [
                None if (i == 1 and s == 3) else rng.normal(size=sh) * k
                for i, sh in enumerate(shapes)
            ]
        )
    return out


def run(
    opt: Adam,
    params: list[torch.Tensor],
    oracle: AdamOracle,
    grads: list[list[Optional[np.ndarray]]],
    layout: list[int],
) -> None:
    """Steps both; ``layout[i]`` is the group of params[i]; compares θ after every step."""
    for n, step in enumerate(grads, start=1):
        per_group: list[list[Optional[np.ndarray]]] = [[] for _ in oracle.groups]
        for p, g, gi in zip(params, step, layout):
            p.grad = None if g is None else torch.tensor(g)
            per_group[gi].append(g)
        opt.step()
        oracle.step(per_group)
        flat = [x for row in oracle.params for x in row]
        for i, (p, want) in enumerate(zip(params, flat)):
            np.testing.assert_allclose(p.detach().numpy(), want, **TOL, err_msg=f"step {n}, {i}")


def init_params(shapes: list[tuple], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s) for s in shapes]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimized_update", [True, False], ids=["optimized", "textbook"])
def test_warmup_get_lr(optimized_update: bool, backend: str) -> None:
    shapes = [(4, 3), (5,), (2, 2)]
    x0 = init_params(shapes, 0)
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in x0]
    # Group 0 takes the subclass's default warm-up (10 steps), group 1 sets its own.
    opt = WarmupAdam(
        [{"params": ps[:2]}, {"params": ps[2:], "lr": 5e-2, "warmup": 25, "betas": (0.8, 0.99)}],
        lr=2e-2,
        eps=1e-8,
        # Decoupled decay uses group['lr'], not the warmed-up α (docs/NUMERICS.md: θ·(1 − lr·λ)).
        weight_decay=WeightDecay(0.1),
        optimized_update=optimized_update,
        backend=backend,
    )
    assert opt.param_groups[0]["warmup"] == 10 and opt.param_groups[1]["warmup"] == 25
    base = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
    hyper = [
        {**base, "lr": 2e-2, "warmup": 10},
        {**base, "lr": 5e-2, "warmup": 25, "betas": (0.8, 0.99)},
    ]
    oracle = WarmupOracle(
        [{"params": x0[:2], **hyper[0]}, {"params": x0[2:], **hyper[1]}],
        optimized_update=optimized_update,
    )
    grads = gradients(shapes, 1)
    run(opt, ps, oracle, grads, [0, 0, 1])

    # Without the warm-up the parameters end up elsewhere: the override really acted.
    plain = AdamOracle(
        [{"params": x0[:2], **hyper[0]}, {"params": x0[2:], **hyper[1]}],
        optimized_update=optimized_update,
    )
    for step in grads:
        plain.step([step[:2], step[2:]])
    assert np.abs(plain.params[1][0] - ps[2].detach().numpy()).max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimized_update", [True, False], ids=["optimized", "textbook"])
def test_amsgrad_init_state_and_get_mv(optimized_update: bool, backend: str) -> None:
    shapes = [(6,), (3, 2)]
    x0 = init_params(shapes, 2)
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in x0]
    opt = AMSGrad(ps, 1e-2, (0.9, 0.99), 1e-8, optimized_update=optimized_update, backend=backend)
    hyper = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}
    oracle = AMSGradOracle([{"params": x0, **hyper}], optimized_update=optimized_update)
    # Large gradients first, then small ones: v falls below its maximum, so max(v) matters.
    grads = gradients(shapes, 3, scale=lambda s: 5.0 if s <= 8 else 0.05)
    run(opt, ps, oracle, grads, [0, 0])
    for p, i in zip(ps, range(2)):
        state = opt.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        np.testing.assert_allclose(
            state["max_exp_avg_sq"].numpy(), oracle.state[0][i]["max_exp_avg_sq"], **TOL
        )
        assert (state["max_exp_avg_sq"] > state["exp_avg_sq"]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_amsgrad_matches_torch_optim_amsgrad(backend: str) -> None:
    """An independent check of the same subclass: torch.optim.Adam(amsgrad=True) is AMSGrad
    with the textbook bias correction."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64)) for _ in range(2)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = AMSGrad(ours, 1e-2, (0.9, 0.99), 1e-8, optimized_update=False, backend=backend)
    ref_opt = torch.optim.Adam(
        ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, amsgrad=True, foreach=False
    )
    gen = torch.Generator().manual_seed(1)
    for s in range(STEPS):
        scale = 5.0 if s < 8 else 0.05
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=gen, dtype=torch.float64) * scale
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_param_override(backend: str) -> None:
    shapes = [(8,), (3, 3)]
    x0 = init_params(shapes, 4)
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in x0]
    opt = ClampedAdam(ps, lr=0.1, bound=0.5, backend=backend)
    assert opt.param_groups[0]["bound"] == 0.5
    hyper = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-16, "weight_decay": 0.0, "bound": 0.5}
    oracle = ClampedOracle([{"params": x0, **hyper}])
    run(opt, ps, oracle, gradients(shapes, 5), [0, 0])
    # The clamp is active, so a run without it would differ.
    assert any((p.detach().abs() == 0.5).any() for p in ps)


class L1Decay:
    """Not a WeightDecay: adds λ1·sign(θ) to the gradient, λ1 = group['l1']."""

    def __init__(self, l1: float) -> None:
        self.l1 = l1

    def defaults(self) -> dict[str, Any]:
        return {"l1": self.l1}

    def __call__(
        self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]
    ) -> torch.Tensor:
        return grad + group["l1"] * torch.sign(param)


class MatrixOnlyDecay(WeightDecay):
    """A WeightDecay subclass: decoupled decay on matrices only, never on vectors (biases)."""

    def __call__(
        self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]
    ) -> torch.Tensor:
        if param.dim() < 2:
            return grad
        return super().__call__(param, grad, group)


@pytest.mark.parametrize("backend", BACKENDS)
def test_foreign_weight_decay_object(backend: str) -> None:
    shapes = [(4, 3), (5,)]
    x0 = init_params(shapes, 6)
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in x0]
    opt = Adam(
        [{"params": ps[:1]}, {"params": ps[1:], "l1": 0.5}],
        lr=1e-2,
        weight_decay=L1Decay(0.2),
        backend=backend,
    )
    assert opt.param_groups[0]["l1"] == 0.2 and opt.param_groups[1]["l1"] == 0.5

    class L1Oracle(AdamOracle):
        def weight_decay(self, param: np.ndarray, grad: np.ndarray, group: dict[str, Any]) -> tuple:
            return param, grad + group["l1"] * np.sign(param)

    base = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-16}
    oracle = L1Oracle(
        [{"params": x0[:1], **base, "l1": 0.2}, {"params": x0[1:], **base, "l1": 0.5}]
    )
    grads = gradients(shapes, 7, scale=0.1)
    run(opt, ps, oracle, grads, [0, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_decay_subclass_is_honoured(backend: str) -> None:
    shapes = [(4, 3), (5,)]
    x0 = init_params(shapes, 8)
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in x0]
    opt = Adam(ps, lr=1e-2, weight_decay=MatrixOnlyDecay(0.5), backend=backend)

    class MatrixOnlyOracle(AdamOracle):
        def weight_decay(self, param: np.ndarray, grad: np.ndarray, group: dict[str, Any]) -> tuple:
            if param.ndim < 2:
                return param, grad
            return super().weight_decay(param, grad, group)

    hyper = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-16, "weight_decay": 0.5}
    run(opt, ps, MatrixOnlyOracle([{"params": x0, **hyper}]), gradients(shapes, 9), [0, 0])


def test_positional_signature_and_defaults() -> None:
    names = list(inspect.signature(Adam.__init__).parameters)
    assert names[:8] == [
        "self",
        "params",
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "optimized_update",
        "defaults",
    ]
    for extra in names[8:]:
        kind = inspect.signature(Adam.__init__).parameters[extra].kind
        assert kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD), extra

    p = torch.nn.Parameter(torch.zeros(3))
    wd = WeightDecay(0.25, weight_decouple=False)
    opt = Adam([p], 0.5, (0.7, 0.8), 1e-5, wd, False, {"extra": 3})
    assert opt.weight_decay is wd
    assert opt.optimized_update is False
    for key, value in {
        "extra": 3,
        "weight_decay": 0.25,
        "lr": 0.5,
        "betas": (0.7, 0.8),
        "eps": 1e-5,
    }.items():
        assert opt.defaults[key] == value
        assert opt.param_groups[0][key] == value


def test_subclass_defaults_extended() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    opt = WarmupAdam([p], 3e-3, (0.85, 0.95), 1e-12, WeightDecay(0.01), False, 7)
    assert opt.optimized_update is False
    expected = {"warmup": 7, "weight_decay": 0.01, "lr": 3e-3, "betas": (0.85, 0.95), "eps": 1e-12}
    for key, value in expected.items():
        assert opt.defaults[key] == value
        assert opt.param_groups[0][key] == value


class RaisesOnSecond(Adam):
    """An override that raises part way through a step (on the second parameter it is asked
    about), after the first parameter was stepped and the second's moments were updated."""

    calls = 0

    def get_lr(self, state: dict[str, Any], group: dict[str, Any]) -> float:
        RaisesOnSecond.calls += 1
        if RaisesOnSecond.calls == 2:
            raise ValueError("boom in get_lr")
        return super().get_lr(state, group)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scale"])
@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_an_error_of_an_override_part_way_changes_nothing(scaled: bool, first: bool) -> None:
    """The per-parameter path puts back what it wrote before the error: parameters, moments,
    step counts and (with GradScaler's scale) gradients; a first step leaves no state."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    opt = RaisesOnSecond(ps, lr=0.1)
    if not first:
        for p in ps:
            p.grad = torch.randn(3)
        RaisesOnSecond.calls = -10
        opt.step()
    for p in ps:
        p.grad = torch.randn(3) * 8
    if scaled:
        opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    before = [(p.detach().clone(), p.grad.clone()) for p in ps]
    states = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
              for p, s in opt.state.items()}  # fmt: skip
    RaisesOnSecond.calls = 0
    with pytest.raises(ValueError, match="boom"):
        opt.step()
    for p, (value, grad) in zip(ps, before):
        assert torch.equal(p.detach(), value) and torch.equal(p.grad, grad)
    assert opt.state.keys() == states.keys()
    for p, s in states.items():
        assert opt.state[p].keys() == s.keys()
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v


class KeepsHistory(Adam):
    """Keeps a list and a numpy array of its own in each state, changed in place each step."""

    fail_on: Optional[torch.Tensor] = None

    def init_state(self, state: dict[str, Any], group: dict[str, Any], param: torch.Tensor) -> None:
        super().init_state(state, group, param)
        state["hist"], state["ema"] = [], np.zeros(1)

    def step_param(
        self, state: dict[str, Any], group: dict[str, Any], grad: Any, param: Any
    ) -> None:
        super().step_param(state, group, grad, param)
        state["hist"].append(state["step"])
        state["ema"] += 1
        if param is KeepsHistory.fail_on:
            raise ValueError("boom")


def test_an_error_part_way_puts_back_state_entries_that_are_not_tensors() -> None:
    ps = [torch.nn.Parameter(torch.ones(2)) for _ in range(2)]
    opt = KeepsHistory(ps, lr=0.1)
    for p in ps:
        p.grad = torch.ones(2)
    opt.step()
    KeepsHistory.fail_on = ps[1]
    with pytest.raises(ValueError, match="boom"):
        opt.step()
    KeepsHistory.fail_on = None
    for p in ps:
        assert opt.state[p]["hist"] == [1] and opt.state[p]["ema"].tolist() == [1.0]
        assert opt.state[p]["step"] == 1
