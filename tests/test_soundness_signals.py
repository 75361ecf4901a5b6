"""A KeyboardInterrupt (or any exception a signal handler raises) can land at the first
bytecode Python runs after the core's call returns. The step must be whole by then: values,
step counts and autograd version counters all advanced, or none of them.

The interrupt is placed exactly there with a profile hook on the call's return, the earliest
point at which Python runs a signal handler."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import rustadam.numpy as rnp
from rustadam import Adam, _core


def _interrupt_after(fn):
    """Raises KeyboardInterrupt as ``fn`` (a builtin) returns, once."""

    def hook(frame, event, arg):
        if event == "c_return" and arg is fn:
            sys.setprofile(None)
            raise KeyboardInterrupt

    sys.setprofile(hook)


def _oracle(p, g, lr, t, m, v, b1=0.9, b2=0.999, eps=1e-8):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p, m, v


def test_an_interrupt_after_the_core_returns_finds_the_torch_step_whole():
    torch.manual_seed(0)
    params = [torch.randn(50, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)]
    grads = [torch.randn_like(p) for p in params]
    opt = Adam(
        [{"params": params[:1]}, {"params": params[1:], "lr": 0.01}],
        lr=0.1,
        eps=1e-8,
        optimized_update=False,
    )
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    before = [p.detach().clone() for p in params]
    moments = [
        (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()) for p in params
    ]
    versions = [(p._version, opt.state[p]["exp_avg"]._version) for p in params]
    _interrupt_after(_core.step_plain)
    try:
        with pytest.raises(KeyboardInterrupt):
            opt.step()
    finally:
        sys.setprofile(None)
    for p, p0, (m0, v0), (pv, mv), g, lr in zip(
        params, before, moments, versions, grads, (0.1, 0.01)
    ):
        want = _oracle(p0.numpy(), g.numpy(), lr, 2, m0.numpy(), v0.numpy())
        np.testing.assert_allclose(p.detach().numpy(), want[0], rtol=1e-12, atol=1e-15)
        assert opt.state[p]["step"] == 2
        assert p._version > pv and opt.state[p]["exp_avg"]._version > mv


def test_an_interrupt_after_the_core_returns_finds_the_numpy_step_whole():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(20), rng.standard_normal((3, 5))]
    grads = [rng.standard_normal(p.shape) for p in params]
    opt = rnp.Adam(params, lr=0.1, eps=1e-8, optimized_update=False)
    opt.step([grads[0], None])  # the second parameter's state is created by the next step
    before = [p.copy() for p in params]
    _interrupt_after(_core.numpy_adam_step_many)
    try:
        with pytest.raises(KeyboardInterrupt):
            opt.step(grads)
    finally:
        sys.setprofile(None)
    assert [opt.state[i]["step"] for i in (0, 1)] == [2, 1]
    m0 = 0.1 * grads[0]
    v0 = 0.001 * grads[0] ** 2
    want0 = _oracle(before[0], grads[0], 0.1, 2, m0, v0)[0]
    want1 = _oracle(before[1], grads[1], 0.1, 1, 0.0, 0.0)[0]
    np.testing.assert_allclose(params[0], want0, rtol=1e-12)
    np.testing.assert_allclose(params[1], want1, rtol=1e-12)


def _interrupt_after_method(name):
    """Raises KeyboardInterrupt as a builtin method called ``name`` returns, once."""

    def hook(frame, event, arg):
        if event == "c_return" and getattr(arg, "__name__", None) == name:
            sys.setprofile(None)
            raise KeyboardInterrupt

    sys.setprofile(hook)


@pytest.mark.parametrize("case", ["first step", "tensor step count"])
def test_an_interrupt_after_the_general_paths_core_call_finds_the_step_whole(case):
    # The general path (a first step, whose state is created; a step count stored as a tensor,
    # as torch.optim.Adam stores it) runs a checked plan, then the bookkeeping.
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    g = torch.randn_like(p)
    p.grad = g.clone()
    opt = Adam([p], lr=0.1, eps=1e-8, optimized_update=False)
    t, m0, v0 = 1, np.zeros(5), np.zeros(5)
    if case == "tensor step count":
        opt.step()
        opt.state[p]["step"] = torch.tensor(1.0)
        m0, v0 = opt.state[p]["exp_avg"].numpy().copy(), opt.state[p]["exp_avg_sq"].numpy().copy()
        t = 2
    before, version = p.detach().clone(), p._version
    _interrupt_after_method("execute")
    try:
        with pytest.raises(KeyboardInterrupt):
            opt.step()
    finally:
        sys.setprofile(None)
    want = _oracle(before.numpy(), g.numpy(), 0.1, t, m0, v0)[0]
    np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12)
    assert p in opt.state and opt.state[p]["step"] == t
    assert p._version > version
