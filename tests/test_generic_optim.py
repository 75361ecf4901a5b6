"""PyTorch's generic optimizer checks (test/optim/test_optim.py's OptimizerInfo tests), adapted.

Where a check is about values (lr=1e-28, zero gradients, untouched parameters) it is exact; where
it is about training (Rosenbrock, an MLP) the loss must go down, and layouts and the parameter
groups added later are compared against the float64 oracle (docs/NUMERICS.md) or each other.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from oracle import AdamOracle
from rustadam import Adam, WeightDecay

BACKENDS = ("rust", "torch", "auto")
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]


def rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    x, y = xy[0], xy[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def layout(values: torch.Tensor, kind: str) -> torch.Tensor:
    """A leaf holding ``values`` contiguously, transposed (dense) or strided (not dense)."""
    if kind == "contiguous" or (kind == "transposed" and values.dim() < 2):
        t = values.clone()  # a dense 1-d tensor is contiguous
    elif kind == "transposed":
        t = values.t().contiguous().t()
    else:  # every other element of a larger buffer
        t = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
        t = t[..., ::2]
        t.copy_(values)
    return t.requires_grad_()


@pytest.mark.parametrize("kind", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rosenbrock_loss_goes_down(backend: str, dtype: torch.dtype, kind: str) -> None:
    xy = layout(torch.tensor([1.5, 1.5], dtype=dtype), kind)
    assert xy.is_contiguous() == (kind == "contiguous")
    opt = Adam([xy], lr=1e-2, backend=backend)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = rosenbrock(xy)
        loss.backward()
        return loss

    first = rosenbrock(xy).item()
    losses = [opt.step(closure).item() for _ in range(150)]
    assert losses[0] == first  # step returns the closure's loss
    assert rosenbrock(xy).item() < first / 10


def mlp_params(dtype: torch.dtype, kind: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 6), (16,), (3, 16), (3,)]
    return [layout(torch.randn(s, generator=gen, dtype=dtype) * 0.5, kind) for s in shapes]


def mlp_loss(params: list[torch.Tensor]) -> torch.Tensor:
    w1, b1, w2, b2 = params
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=gen, dtype=w1.dtype)
    y = torch.randn(32, 3, generator=gen, dtype=w1.dtype)
    return (torch.tanh(x @ w1.t() + b1) @ w2.t() + b2 - y).pow(2).mean()


def train_mlp(backend: str, dtype: torch.dtype, kind: str) -> tuple[list[float], list]:
    """Weights and biases in two groups, under StepLR and ReduceLROnPlateau together (as
    torch's test_param_group_with_lrscheduler_goes_right_direction)."""
    params = mlp_params(dtype, kind)
    opt = Adam(
        [{"params": params[0::2]}, {"params": params[1::2], "lr": 3e-2}],
        lr=1e-2,
        weight_decay=WeightDecay(1e-3),
        backend=backend,
    )
    step_lr = lr_scheduler.StepLR(opt, step_size=10, gamma=0.7)
    plateau = lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = mlp_loss(params)
        loss.backward()
        opt.step()
        step_lr.step()
        plateau.step(loss.item())
        losses.append(loss.item())
    assert opt.param_groups[1]["lr"] < 3e-2 * 0.7**3  # the schedulers did act
    return losses, params


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_two_groups_with_schedulers_any_layout(backend: str, dtype: torch.dtype) -> None:
    losses, params = train_mlp(backend, dtype, "contiguous")
    assert losses[-1] < 0.5 * losses[0]
    for kind in ("transposed", "strided"):
        other_losses, other = train_mlp(backend, dtype, kind)
        assert other[0].is_contiguous() is False
        # The layout changes how torch's matmuls round, nothing else: float64 agrees to
        # rounding; float32 (40 steps, lr ≤ 3e-2) to well below a step.
        tol = {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 0, "atol": 1e-4}
        for p, q in zip(params, other):
            torch.testing.assert_close(q, p, **tol)
        assert other_losses[-1] < 0.5 * other_losses[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_lr_group_leaves_its_params_exactly_unchanged(
    backend: str, dtype: torch.dtype
) -> None:
    """|step| ≤ lr·(1−β1)/√(1−β2) ≈ 3.2e-28 is far below half an ulp of any |θ| ≳ 1e-11;
    decoupled decay with λ = 0 multiplies by exactly 1."""
    torch.manual_seed(0)
    tiny = torch.randn(5, 4, dtype=dtype).clamp_(min=1e-3).requires_grad_()
    normal = torch.randn(5, 4, dtype=dtype, requires_grad=True)
    start_tiny, start_normal = tiny.detach().clone(), normal.detach().clone()
    opt = Adam([{"params": [tiny], "lr": 1e-28}, {"params": [normal]}], lr=1e-2, backend=backend)
    for _ in range(5):
        opt.zero_grad()
        (tiny.pow(2).sum() + normal.pow(2).sum()).backward()
        opt.step()
    assert torch.equal(tiny, start_tiny)
    assert opt.state[tiny]["step"] == 5
    assert not torch.equal(normal, start_normal)


@pytest.mark.parametrize("decay", ["default", "l2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradients_leave_params_exactly_unchanged(
    backend: str, dtype: torch.dtype, decay: str
) -> None:
    """m = v = 0, so the step is 0 / (0 + ε) = 0 (λ = 0: no decay either)."""
    wd = WeightDecay() if decay == "default" else WeightDecay(0.0, weight_decouple=False)
    torch.manual_seed(0)
    p = torch.randn(6, 3, dtype=dtype, requires_grad=True)
    start = p.detach().clone()
    opt = Adam([p], lr=0.1, weight_decay=wd, backend=backend)
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert torch.equal(p, start)
    assert opt.state[p]["step"] == 3
    assert not opt.state[p]["exp_avg"].any() and not opt.state[p]["exp_avg_sq"].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_grad_are_untouched_and_stateless(backend: str) -> None:
    torch.manual_seed(0)
    used = torch.randn(4, requires_grad=True)
    unused = torch.randn(4, requires_grad=True)  # in no graph: its grad stays None
    frozen = torch.randn(4)  # requires no grad at all
    starts = [t.detach().clone() for t in (used, unused, frozen)]
    opt = Adam([used, unused, frozen], lr=0.1, weight_decay=WeightDecay(0.5), backend=backend)
    opt.step()  # no grads anywhere: nothing happens
    assert len(opt.state) == 0
    for _ in range(2):
        opt.zero_grad()
        used.pow(2).sum().backward()
        opt.step()
    assert not torch.equal(used, starts[0])
    assert torch.equal(unused, starts[1]) and torch.equal(frozen, starts[2])
    assert unused not in opt.state and frozen not in opt.state
    assert list(opt.state) == [used]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_state_entry_is_filled_after_a_step(backend: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = Adam(model.parameters(), backend=backend)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    assert len(opt.state) == 4
    for p in model.parameters():
        state = opt.state[p]
        assert len(state) > 0 and set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert type(state["step"]) is int and state["step"] == 1
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].shape == p.shape and state[key].dtype == p.dtype
            assert state[key].any()


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_grad(backend: str, set_to_none: bool) -> None:
    torch.manual_seed(0)
    p = torch.randn(3, 2, requires_grad=True)
    q = torch.randn(2, requires_grad=True)
    opt = Adam([{"params": [p]}, {"params": [q]}], backend=backend)
    (p.sum() * 2 + q.sum()).backward()
    grad = p.grad
    opt.step()
    opt.zero_grad(set_to_none=set_to_none)
    if set_to_none:
        assert p.grad is None and q.grad is None
    else:
        assert p.grad is grad  # zeroed in place
        assert not p.grad.any() and not q.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_after_steps(backend: str) -> None:
    rng = np.random.default_rng(0)
    first = torch.tensor(rng.standard_normal((3, 2)), requires_grad=True)
    later = torch.tensor(rng.standard_normal(4), requires_grad=True)
    opt = Adam(
        [first],
        lr=0.05,
        betas=(0.8, 0.95),
        eps=1e-6,
        weight_decay=WeightDecay(0.1),
        backend=backend,
    )
    hyper = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    oracle = AdamOracle([{"params": [first.detach().numpy()], **hyper}])
    grads = [[rng.standard_normal((3, 2)), rng.standard_normal(4)] for _ in range(6)]
    for t, (g1, g2) in enumerate(grads):
        if t == 3:
            opt.add_param_group({"params": [later], "lr": 0.2})
            new = opt.param_groups[1]
            # The new group takes the optimizer's defaults for what it does not set.
            assert (new["betas"], new["eps"], new["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.1)
            oracle.groups.append({**hyper, "lr": 0.2})
            oracle.params.append([later.detach().numpy().copy()])
            oracle.state.append([{}])
        first.grad = torch.from_numpy(g1.copy())
        later.grad = torch.from_numpy(g2.copy())
        opt.step()
        oracle.step([[g1], [g2]] if t >= 3 else [[g1]])
    assert opt.state[first]["step"] == 6 and opt.state[later]["step"] == 3
    for p, want in ((first, oracle.params[0][0]), (later, oracle.params[1][0])):
        torch.testing.assert_close(p.detach(), torch.from_numpy(want), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("optimizer", [Adam, torch.optim.Adam], ids=["rustadam", "torch"])
def test_duplicate_params_across_groups_are_rejected_as_torch_does(optimizer: Any) -> None:
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    message = "some parameters appear in more than one parameter group"
    with pytest.raises(ValueError, match=message):
        optimizer([{"params": [p]}, {"params": [q, p]}])
    opt = optimizer([{"params": [p]}])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [q, p]})
    assert len(opt.param_groups) == 1
    # Within one group torch only warns (for now); so does rustadam.
    with pytest.warns(UserWarning, match="duplicate parameters"):
        optimizer([p, p])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer([p, q])
