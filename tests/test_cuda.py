"""CUDA checks, skipped cleanly without a GPU: the Triton kernel natively against the CPU paths.

- the kernel on CUDA tensors equals the foreach path on the same values on the CPU, bit for bit
  (the foreach path equals the Rust core bit for bit in tests/test_foreach.py);
- a checkpoint of ``rustadam.Adam`` moves between CPU and GPU through ``state_dict``;
- the kernel reads grad_scale/found_inf on the device, and a step of ``torch.amp.GradScaler``
  with inf gradients changes nothing.
"""

from __future__ import annotations

import types

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cfg(**kw):
    d = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, weight_decouple=True,
             absolute=False, optimized_update=True, maximize=False, amsgrad=False,
             rounding="nearest")  # fmt: skip
    d.update(kw)
    return types.SimpleNamespace(**d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "mode",
    [
        dict(),
        dict(weight_decay=0.1),
        dict(weight_decay=0.1, weight_decouple=False),
        dict(amsgrad=True, maximize=True, optimized_update=False),
        dict(rounding="stochastic"),
        dict(rounding="kahan"),
    ],
)
def test_cuda_kernel_equals_cpu_bit_for_bit(dtype, mode):
    from rustadam import _triton
    from rustadam._foreach import foreach_adam

    if not _triton.available():
        pytest.skip("triton is not installed")
    c = _cfg(**mode)
    gen = torch.Generator().manual_seed(0)
    shapes = [(257, 129), (1000,), (), (0,), (3, 5, 7)]
    mk = lambda: [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]  # noqa: E731
    p, g, m = mk(), mk(), mk()
    v = [x.abs() for x in mk()]
    vm = [x.clone() for x in v] if c.amsgrad else None
    comp = [torch.zeros_like(x) for x in p] if c.rounding == "kahan" else None
    steps, seeds = [1, 5, 9, 2, 77], [1, 2, 3, 4, 5]
    cpu = [[x.clone() for x in lst] if lst is not None else None for lst in (p, m, v, vm, comp)]
    gpu = [[x.cuda() for x in lst] if lst is not None else None for lst in (p, m, v, vm, comp)]
    foreach_adam(cpu[0], g, cpu[1], cpu[2], cpu[3], cpu[4], steps, seeds, c)
    _triton.triton_adam(gpu[0], [x.cuda() for x in g], gpu[1], gpu[2], gpu[3], gpu[4], steps,
                        seeds, c)  # fmt: skip
    for a, b in zip(cpu, gpu):
        if a is not None:
            for x, y in zip(a, b):
                assert torch.equal(x, y.cpu())
    # the foreach path on CUDA too (its fma probe and tensor divisions)
    gpu2 = [[x.cuda() for x in lst] if lst is not None else None for lst in (p, m, v, vm, comp)]
    foreach_adam(gpu2[0], [x.cuda() for x in g], gpu2[1], gpu2[2], gpu2[3], gpu2[4], steps,
                 seeds, c)  # fmt: skip
    for a, b in zip(cpu, gpu2):
        if a is not None:
            for x, y in zip(a, b):
                assert torch.equal(x, y.cpu())


def test_found_inf_on_cuda_changes_nothing():
    from rustadam import _triton

    if not _triton.available():
        pytest.skip("triton is not installed")
    p = [torch.randn(1000, device="cuda")]
    before = p[0].clone()
    m, v = [torch.zeros_like(p[0])], [torch.zeros_like(p[0])]
    _triton.triton_adam(p, [torch.full_like(p[0], float("inf"))], m, v, None, None, [1], [0],
                        _cfg(), grad_scale=torch.tensor([2.0], device="cuda"),
                        found_inf=torch.tensor([1.0], device="cuda"))  # fmt: skip
    assert torch.equal(p[0], before) and not m[0].any() and not v[0].any()


def test_checkpoint_moves_between_cpu_and_cuda():
    from rustadam import Adam

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = Adam(model.parameters(), lr=1e-2)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    gmodel = torch.nn.Linear(8, 4).cuda()
    gmodel.load_state_dict(model.state_dict())
    gopt = Adam(gmodel.parameters(), lr=1e-2)
    gopt.load_state_dict(sd)
    for s in gopt.state.values():
        assert s["exp_avg"].is_cuda
    x = torch.randn(2, 8)
    model.zero_grad()
    model(x).sum().backward()
    opt.step()
    gmodel(x.cuda()).sum().backward()
    gopt.step()
    for a, b in zip(model.parameters(), gmodel.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-6, atol=1e-7)
    back = Adam(model.parameters(), lr=1e-2)
    back.load_state_dict(gopt.state_dict())
    assert all(not s["exp_avg"].is_cuda for s in back.state.values())


def test_grad_scaler_on_cuda():
    from rustadam import Adam

    model = torch.nn.Linear(8, 4).cuda()
    opt = Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cuda")
    for i in range(3):
        x = torch.randn(4, 8, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        if i == 1:
            for p in model.parameters():
                p.grad.fill_(float("inf"))
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        after = list(model.parameters())
        if i == 1:
            assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert all(torch.isfinite(p).all() for p in after)
