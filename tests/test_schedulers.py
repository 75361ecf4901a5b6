"""LR schedulers and tensor learning rates.

Schedulers write ``group['lr']`` (and OneCycleLR ``group['betas']``) between steps; rustadam reads
them at every step. The oracle is the float64 Adam (tests/oracle.py) fed, step by
step, the learning rate in closed form (StepLR, CosineAnnealingLR) or the values the scheduler
left in the group (OneCycleLR, ReduceLROnPlateau), with gradients drawn in advance so that the
oracle needs nothing from the optimizer under test.
"""

from __future__ import annotations

import copy
import io
import math
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler

from oracle import AdamOracle
from rustadam import Adam, WeightDecay

BACKENDS = ("rust", "torch")
STEPS = 12
LR = 0.05
WD = 0.1
SHAPES = [(3, 4), (5,)]
# float64 on both sides: rustadam's rounding against the oracle's, ~1e-16 relative per step.
# A learning rate or β1 off by one scheduler step moves the parameters by > 1e-4.
TOL = {"rtol": 1e-10, "atol": 1e-12}


def grads() -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return [[rng.standard_normal(s) for s in SHAPES] for _ in range(STEPS)]


def make(backend: str, lr: Any = LR) -> tuple[list[torch.Tensor], Adam]:
    rng = np.random.default_rng(1)
    params = [torch.tensor(rng.standard_normal(s), requires_grad=True) for s in SHAPES]
    # Decoupled decay θ·(1 − α·λ) makes the scheduled α act twice per step.
    opt = Adam(
        [{"params": [params[0]]}, {"params": [params[1]], "lr": LR / 2, "betas": (0.8, 0.99)}],
        lr=lr,
        weight_decay=WeightDecay(WD),
        backend=backend,
    )
    return params, opt


def oracle_of(params: list[torch.Tensor], opt: Adam) -> AdamOracle:
    return AdamOracle(
        [
            {
                "params": [p.detach().numpy()],
                "lr": float(g["lr"]),
                "betas": g["betas"],
                "eps": g["eps"],
                "weight_decay": g["weight_decay"],
            }
            for p, g in zip(params, opt.param_groups)
        ]
    )


def run(
    backend: str,
    make_scheduler: Callable[[Adam], Any],
    expected: Optional[Callable[[int, int, float], float]] = None,
    metric: Optional[Callable[[int], float]] = None,
) -> tuple[list[torch.Tensor], Adam, AdamOracle, list[list[tuple[float, tuple]]]]:
    """Steps rustadam under a scheduler, and the oracle with the same schedule.

    ``expected(gi, t, base_lr)``: the closed-form lr of group gi at step t (from 0); without it
    the oracle takes the hyper-parameters the scheduler left in the group. Returns the
    (lr, betas) each group used at each step.
    """
    params, opt = make(backend)
    oracle = oracle_of(params, opt)
    base = [float(g["lr"]) for g in opt.param_groups]
    sched = make_scheduler(opt)
    used = []
    for t, step_grads in enumerate(grads()):
        used.append([(float(g["lr"]), tuple(g["betas"])) for g in opt.param_groups])
        for gi, g in enumerate(opt.param_groups):
            lr = expected(gi, t, base[gi]) if expected else float(g["lr"])
            oracle.groups[gi]["lr"] = lr
            oracle.groups[gi]["betas"] = tuple(g["betas"])
        for p, gr in zip(params, step_grads):
            p.grad = torch.from_numpy(gr.copy())
        opt.step()
        oracle.step([[gr] for gr in step_grads])
        if metric is None:
            sched.step()
        else:
            sched.step(metric(t))
    return params, opt, oracle, used


def assert_matches(params: list[torch.Tensor], oracle: AdamOracle) -> None:
    for gi, p in enumerate(params):
        torch.testing.assert_close(p.detach(), torch.from_numpy(oracle.params[gi][0]), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_lr(backend: str) -> None:
    params, _, oracle, used = run(
        backend,
        lambda opt: lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
        expected=lambda gi, t, base: base * 0.5 ** (t // 3),
    )
    assert_matches(params, oracle)
    assert used[-1][0][0] == LR * 0.5**3


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_annealing_lr(backend: str) -> None:
    t_max, eta_min = 8, 1e-3

    def cosine(gi: int, t: int, base: float) -> float:
        return eta_min + (base - eta_min) * (1 + math.cos(math.pi * t / t_max)) / 2

    params, _, oracle, used = run(
        backend,
        lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min),
        expected=cosine,
    )
    assert_matches(params, oracle)
    assert min(u[0][0] for u in used) == pytest.approx(eta_min)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_cycle_lr_with_cycle_momentum_drives_beta1(backend: str) -> None:
    def one_cycle(opt: Adam) -> lr_scheduler.OneCycleLR:
        return lr_scheduler.OneCycleLR(
            opt,
            max_lr=[0.1, 0.05],
            total_steps=STEPS,
            cycle_momentum=True,
            base_momentum=0.5,
            max_momentum=0.95,
        )

    params, _, oracle, used = run(backend, one_cycle)
    beta1s = [u[0][1][0] for u in used]
    assert max(beta1s) == 0.95 and min(beta1s) < 0.51  # down to base_momentum and back
    assert all(u[1][1][1] == 0.99 for u in used)  # β2 is left alone
    assert_matches(params, oracle)

    # The test can tell: an optimizer that kept its first β1 would be far off.
    stale = oracle_of(*make("torch"))
    for t, step_grads in enumerate(grads()):
        for gi in range(2):
            stale.groups[gi]["lr"] = used[t][gi][0]
            stale.groups[gi]["betas"] = used[0][gi][1]
        stale.step([[gr] for gr in step_grads])
    assert not np.allclose(stale.params[0][0], oracle.params[0][0], rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduce_lr_on_plateau(backend: str) -> None:
    params, _, oracle, used = run(
        backend,
        lambda opt: lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1),
        metric=lambda t: 1.0,  # a plateau from the start
    )
    lrs = [u[0][0] for u in used]
    assert len(set(lrs)) >= 4 and lrs == sorted(lrs, reverse=True)
    assert_matches(params, oracle)


def one_cycle(opt: Adam) -> lr_scheduler.OneCycleLR:
    return lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS, cycle_momentum=True)


def step_lr(opt: Adam) -> lr_scheduler.StepLR:
    return lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)


@pytest.mark.parametrize("make_scheduler", [one_cycle, step_lr], ids=["OneCycleLR", "StepLR"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_resuming_a_scheduler_from_a_checkpoint(
    backend: str, make_scheduler: Callable[[Adam], Any]
) -> None:
    def train(params: list[torch.Tensor], opt: Adam, sched: Any, steps: range) -> None:
        all_grads = grads()
        for t in steps:
            for p, gr in zip(params, all_grads[t]):
                p.grad = torch.from_numpy(gr.copy())
            opt.step()
            sched.step()

    params, opt = make(backend)
    sched = make_scheduler(opt)
    half = STEPS // 2
    train(params, opt, sched, range(half))
    buf = io.BytesIO()
    torch.save(
        {"params": params, "opt": opt.state_dict(), "sched": sched.state_dict()},
        buf,
    )
    train(params, opt, sched, range(half, STEPS))

    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    resumed, ropt = make(backend)
    with torch.no_grad():
        for p, q in zip(resumed, checkpoint["params"]):
            p.copy_(q)
    # torch's order: the scheduler first (it writes the groups), then the optimizer's state.
    rsched = make_scheduler(ropt)
    ropt.load_state_dict(checkpoint["opt"])
    rsched.load_state_dict(checkpoint["sched"])
    train(resumed, ropt, rsched, range(half, STEPS))

    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ropt.param_groups]
    assert [g["betas"] for g in opt.param_groups] == [g["betas"] for g in ropt.param_groups]


# ---- tensor learning rates -------------------------------------------------------------------


def lockstep(opt_a: Adam, opt_b: Adam, pa: list, pb: list, steps: int, sched: bool) -> None:
    # γ = 0.5 keeps the float32 tensor and the float64 float on the same values.
    sa = lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5) if sched else None
    sb = lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.5) if sched else None
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for p, q in zip(pa, pb):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        if sa and sb:
            sa.step()
            sb.step()


@pytest.mark.parametrize("sched", [False, True], ids=["const", "StepLR"])
@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "1-elem"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("decay", ["decoupled", "l2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_works_like_the_float(
    backend: str, decay: str, dtype: torch.dtype, shape: tuple, sched: bool
) -> None:
    lr = torch.full(shape, 0.03)
    wd = WeightDecay(WD, weight_decouple=decay == "decoupled")
    torch.manual_seed(0)
    pa = [torch.randn(4, 3, dtype=dtype, requires_grad=True) for _ in range(2)]
    pb = [copy.deepcopy(p) for p in pa]
    with_tensor = Adam(pa, lr=lr, weight_decay=wd, backend=backend)
    # The float the tensor holds (0.03 rounded to float32), so both runs mean the same α.
    with_float = Adam(pb, lr=float(lr), weight_decay=wd, backend=backend)
    lockstep(with_tensor, with_float, pa, pb, 6, sched)
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
    assert with_tensor.param_groups[0]["lr"] is lr  # schedulers fill it in place
    assert float(lr) == float(with_float.param_groups[0]["lr"])
    assert (float(lr) < 0.01) == sched  # StepLR did act


def test_tensor_lr_must_have_one_element() -> None:
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"Tensor lr must be 1-element, got shape \(2,\)"):
        Adam([p], lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        Adam([p], lr=torch.tensor(-1.0))
