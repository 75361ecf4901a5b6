"""Mixed precision: ``torch.amp.GradScaler("cpu")`` with CPU autocast in bfloat16 and float16.

GradScaler.step unscales the gradients and calls ``optimizer.step()`` only when they are all
finite. The oracle for the other steps is the same training without a scaler (plain backward
under the same autocast); on the steps where an inf or NaN is planted in a gradient, nothing of
the optimizer or the parameters may change. L2 weight decay adds λ·θ to the gradient, so a
gradient that reached the optimizer still scaled would show (Adam alone is scale-invariant).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rustadam import Adam, WeightDecay

BACKENDS = ("rust", "torch")
STEPS = 8
BAD_STEPS = {2: float("inf"), 5: float("nan")}
LR = 1e-2


def setup(backend: str) -> tuple[nn.Module, Adam]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = Adam(
        model.parameters(),
        lr=LR,
        weight_decay=WeightDecay(0.05, weight_decouple=False),
        backend=backend,
    )
    return model, opt


def loss_of(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype  # autocast is on
    return (out.float() - y).pow(2).mean()


def snapshot(model: nn.Module, opt: Adam) -> list[torch.Tensor]:
    return [t.clone() for t in model.parameters()] + [
        t.clone() for s in opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"])
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_skips_bad_steps_and_matches_unscaled_training(
    backend: str, dtype: torch.dtype
) -> None:
    model, opt = setup(backend)
    ref_model, ref_opt = setup(backend)
    # A power of two that no gradient here overflows with; it is not grown during the test.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    for it in range(STEPS):
        opt.zero_grad()
        scaler.scale(loss_of(model, dtype)).backward()
        if it in BAD_STEPS:
            model[0].weight.grad[1, 2] = BAD_STEPS[it]
        before = snapshot(model, opt)
        steps_before = [s["step"] for s in opt.state.values()]
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if it in BAD_STEPS:
            # Skipped: parameters, moments and counts as they were; the scale backs off.
            assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model, opt)))
            assert [s["step"] for s in opt.state.values()] == steps_before
            assert scaler.get_scale() == scale / 2
            continue
        assert scaler.get_scale() == scale

        ref_opt.zero_grad()
        loss_of(ref_model, dtype).backward()
        ref_opt.step()
        assert [s["step"] for s in opt.state.values()] == [
            s["step"] for s in ref_opt.state.values()
        ]
        for p, q in zip(model.parameters(), ref_model.parameters()):
            if dtype == torch.bfloat16:
                # bfloat16 has float32's exponent range: scaling by 2^k is exact all through the
                # backward, so the unscaled gradients are the very same numbers.
                assert torch.equal(p.grad, q.grad)
                assert torch.equal(p, q)
            else:
                # float16 backward without a scale rounds small gradients onto its subnormal
                # grid (below 6.1e-5) where the scaled run keeps 11 bits; Adam normalizes each
                # element, so such a relative gradient difference becomes the same relative
                # difference of that element's step (≤ lr). Observed: < 2e-4·lr per step.
                # Allowed: 1% of a step per step taken; a gradient left scaled by 256 under
                # the L2 term, or a step taken on a skipped iteration, is off by ≥ lr.
                taken = opt.state[p]["step"]
                torch.testing.assert_close(p, q, rtol=0, atol=1e-2 * LR * taken)
    assert opt.state[model[0].weight]["step"] == STEPS - len(BAD_STEPS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_unscale_then_clip(backend: str) -> None:
    """The documented pattern: unscale_, clip, step; the optimizer sees the clipped grads."""
    model, opt = setup(backend)
    ref_model, ref_opt = setup(backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(loss_of(model, torch.bfloat16)).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        scaler.step(opt)
        scaler.update()

        ref_opt.zero_grad()
        loss_of(ref_model, torch.bfloat16).backward()
        nn.utils.clip_grad_norm_(ref_model.parameters(), 0.1)
        ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_a_skipped_first_step_creates_no_state() -> None:
    """A skipped first step leaves the parameters as they were and creates no state."""
    model, opt = setup("auto")
    initial = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(loss_of(model, torch.bfloat16)).backward()
    model[2].bias.grad[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert len(opt.state) == 0
    for p, q in zip(model.parameters(), initial.parameters()):
        assert torch.equal(p, q)


# GradScaler's fused protocol without GradScaler: the attributes it sets on the optimizer.
def _scaled(opt: Adam, scale: float) -> None:
    opt.grad_scale = torch.tensor(scale)
    opt.found_inf = torch.tensor(0.0)


@pytest.mark.parametrize("scale", [2.0**10, 3.0], ids=["pow2", "three"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]
)
@pytest.mark.parametrize("layout", ["dense", "transposed"])
def test_grad_scale_divides_gradients_in_place_as_div_does(
    scale: float, dtype: torch.dtype, layout: str
) -> None:
    """With ``grad_scale`` the core divides every gradient in place, rounded as torch's own
    ``grad.div_(scale)`` (whose result torch's fused Adam also leaves in ``.grad``), and steps
    with it: the same parameters as a step on the divided gradients, bumped grad versions."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 7), (4,)]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(dtype) * scale for s in shapes]
    if layout == "transposed":
        grads[0] = grads[0].t().contiguous().t()  # a non-dense-in-order gradient
    expected_grads = [g.div(torch.tensor(scale)) for g in grads]

    ps = [nn.Parameter(p.clone()) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    versions = [p.grad._version for p in ps]
    opt = Adam(ps, lr=1e-2, backend="rust")
    _scaled(opt, scale)
    opt.step()

    ref = [nn.Parameter(p.clone()) for p in params]
    for q, g in zip(ref, expected_grads):
        q.grad = g.clone()
    Adam(ref, lr=1e-2, backend="rust").step()
    for p, q, g, v in zip(ps, ref, expected_grads, versions):
        assert torch.equal(p.grad, g)
        assert torch.equal(p.detach(), q.detach())
        assert p.grad._version > v


def test_a_refused_step_leaves_the_gradients_scaled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step refused after the checks (here: a bad RUSTADAM_SIMD, read as the core runs)
    divides nothing, so that trying again divides once, not twice."""
    gen = torch.Generator().manual_seed(4)
    params = [nn.Parameter(torch.randn(6, generator=gen)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(6, generator=gen) * 8
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, ref):
        q.grad = p.grad / 8
    before = [(p.detach().clone(), p.grad.clone()) for p in params]
    opt = Adam(params, lr=1e-2)
    _scaled(opt, 8.0)
    monkeypatch.setenv("RUSTADAM_SIMD", "bogus")
    with pytest.raises(ValueError, match="RUSTADAM_SIMD"):
        opt.step()
    for p, (value, grad) in zip(params, before):
        assert torch.equal(p.detach(), value) and torch.equal(p.grad, grad)
    assert len(opt.state) == 0
    monkeypatch.delenv("RUSTADAM_SIMD")
    opt.step()
    Adam(ref, lr=1e-2).step()
    for p, q in zip(params, ref):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(p.grad, q.grad)


def test_an_expanded_gradient_cannot_be_unscaled_in_place() -> None:
    """A gradient whose elements share memory cannot be divided in place (``div_`` refuses it
    too): the step names the parameter and changes nothing."""
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4))
    a.grad, b.grad = torch.randn(3), torch.tensor([2.0]).expand(4)
    snap = [a.detach().clone(), b.detach().clone(), a.grad.clone()]
    opt = Adam([{"params": [a]}, {"params": [b]}], lr=1e-2)
    _scaled(opt, 4.0)
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[0\].*expanded"):
        opt.step()
    assert torch.equal(a.detach(), snap[0]) and torch.equal(b.detach(), snap[1])
    assert torch.equal(a.grad, snap[2]) and torch.equal(b.grad, torch.full((4,), 2.0))
    assert len(opt.state) == 0
