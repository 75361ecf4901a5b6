"""rustadam.functional.adam: every backend computes the float64 oracle's step and refuses the
same calls, by name, changing nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oracle import AdamOracle
from rustadam.functional import adam

BACKENDS = ["auto", "rust", "foreach"]
HYPER = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, optimized_update=False)


def buffers(n=3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(4, generator=gen, dtype=dtype) for _ in range(n)]
    grads = [torch.randn(4, generator=gen, dtype=dtype) for _ in range(n)]
    ms = [torch.randn(4, generator=gen, dtype=dtype).mul_(0.1) for _ in range(n)]
    vs = [torch.rand(4, generator=gen, dtype=dtype).mul_(0.01) for _ in range(n)]
    return params, grads, ms, vs


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_takes_the_oracles_step(backend):
    params, grads, ms, vs = buffers()
    steps = [1, 5, 2**40]
    group = {k: v for k, v in HYPER.items() if k != "optimized_update"}
    oracle = AdamOracle(
        [{"params": [p.numpy().copy() for p in params], **group}], optimized_update=False
    )
    for i, (m, v, t) in enumerate(zip(ms, vs, steps)):
        oracle.state[0][i] = {"step": t - 1, "exp_avg": m.numpy().copy(),
                              "exp_avg_sq": v.numpy().copy()}  # fmt: skip
    oracle.step([[g.numpy() for g in grads]])
    adam(params, grads, ms, vs, steps, backend=backend, **HYPER)
    for i, p in enumerate(params):
        np.testing.assert_allclose(p.numpy(), oracle.params[0][i], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(ms[i].numpy(), oracle.state[0][i]["exp_avg"], rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "bad, error, match",
    [
        (dict(steps=[1, 2.5, 3]), TypeError, r"steps\[1\] is 2.5; expected an int"),
        # torch's checkpoints keep the count as a float tensor: its bias correction would come
        # out in float32 on the torch ops
        (dict(steps=[1, torch.tensor(2.0), 3]), TypeError, r"steps\[1\] is tensor\(2\.\)"),
        (dict(steps=[1, True, 3]), TypeError, r"steps\[1\] is True"),
        (dict(steps=[1, 0, 3]), ValueError, r"steps\[1\] is 0; it counts updates from 1"),
        (dict(steps=[1, 2**63, 3]), ValueError, "must fit in 63 bits"),
        (dict(steps=[1, 2]), ValueError, "steps has 2 entries for 3 parameters"),
        (dict(max_exp_avg_sqs=[torch.zeros(4)] * 3), ValueError, "exactly when amsgrad"),
        (dict(amsgrad=True), ValueError, "exactly when amsgrad"),
        (dict(compensations=[None] * 3), ValueError, "only with rounding='kahan'"),
    ],
)
def test_every_backend_refuses_the_same_calls_changing_nothing(backend, bad, error, match):
    params, grads, ms, vs = buffers()
    before = [t.clone() for t in params + ms + vs]
    kw = {"steps": [1, 2, 3], **HYPER, **bad}
    with pytest.raises(error, match=match):
        adam(params, grads, ms, vs, backend=backend, **kw)
    for t, b in zip(params + ms + vs, before):
        torch.testing.assert_close(t, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kahan_rounding_needs_compensations_only_for_16_bit_parameters(backend):
    # float32: nothing to compensate, every backend steps it as rounding="nearest" does.
    results = []
    for rounding in ("nearest", "kahan"):
        params, grads, ms, vs = buffers(dtype=torch.float32)
        adam(params, grads, ms, vs, [1, 2, 3], rounding=rounding, backend=backend, **HYPER)
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    params, grads, ms, vs = buffers(dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="needs a compensation buffer for a 16-bit"):
        adam(params, grads, ms, vs, [1, 2, 3], rounding="kahan", backend=backend, **HYPER)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "seed, error, match",
    [
        (-1, ValueError, r"seeds\[1\] is -1; a seed is from 0 below 2\*\*64"),
        (2**64, ValueError, "a seed is from 0 below 2"),
        (1.5, TypeError, r"seeds\[1\] is 1.5; expected an int"),
    ],
)
def test_every_backend_refuses_the_same_seeds(backend, seed, error, match):
    params, grads, ms, vs = buffers()
    before = [t.clone() for t in params]
    with pytest.raises(error, match=match):
        adam(params, grads, ms, vs, [1, 2, 3], seeds=[0, seed, 0], backend=backend, **HYPER)
    for t, b in zip(params, before):
        torch.testing.assert_close(t, b, rtol=0, atol=0)
    # numpy's ints are ints
    adam(params, grads, ms, vs, [1, 2, 3], seeds=[np.int64(7)] * 3, backend=backend, **HYPER)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leaf_parameters_that_require_grad_step_outside_no_grad(backend):
    # As Adam.step does; the foreach ops wrote the first parameter, then refused the second.
    params, grads, ms, vs = buffers()
    expected = [t.clone() for t in params]
    adam(expected, grads, [m.clone() for m in ms], [v.clone() for v in vs], [1, 2, 3],
         backend=backend, **HYPER)  # fmt: skip
    leaves = [p.clone().requires_grad_() for p in params]
    adam(leaves, grads, ms, vs, [1, 2, 3], backend=backend, **HYPER)
    for a, b in zip(leaves, expected):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_complex32_parameter_needs_its_kahan_compensation_before_anything_is_written(backend):
    # complex32 steps as pairs of float16, which rounding="kahan" compensates: without a
    # buffer the foreach ops failed with a bare AssertionError (the Triton kernel after an
    # earlier launch had written).
    p, q = torch.ones(4), torch.ones(3, dtype=torch.complex32)
    grads = [torch.ones(4), torch.ones(3, dtype=torch.complex32)]
    ms, vs = [torch.zeros_like(p), torch.zeros_like(q)], [torch.zeros_like(p), torch.zeros_like(q)]
    # (backend="rust" refuses complex32 itself: the core does not take it)
    why = "cannot step parameter 1 on the Rust" if backend == "rust" else "parameter 1: .*needs a"
    with pytest.raises(RuntimeError, match=why):
        adam([p, q], grads, ms, vs, [1, 1], rounding="kahan", compensations=[None, None],
             backend=backend, **HYPER)  # fmt: skip
    assert torch.equal(p, torch.ones(4)) and not ms[0].any()


def test_adam_gives_a_complex32_parameter_its_kahan_compensation():
    # Every path steps it alike (the per-parameter one failed on the complex buffer).
    from rustadam import Adam

    results = []
    for backend in ("auto", "torch"):
        q = torch.nn.Parameter(torch.ones(3, dtype=torch.complex32))
        opt = Adam([q], lr=0.1, rounding="kahan", backend=backend)
        for t in range(3):
            q.grad = torch.full((3,), 0.5 - 0.25j * t, dtype=torch.complex32)
            opt.step()
        comp = opt.state[q]["compensation"]
        assert comp.dtype == torch.complex32 and comp.shape == q.shape
        assert opt.state[q]["step"] == 3
        results.append((torch.view_as_real(q.detach()), torch.view_as_real(comp)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
