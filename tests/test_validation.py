"""Bad input fails loudly with the spec's messages; the edges of step() behave as specified."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch

from oracle import AdamOracle
from rustadam import Adam, WeightDecay

BACKENDS = ("rust", "torch", "auto")


def param(*shape: int, dtype: torch.dtype = torch.float32) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape, dtype=dtype))


# ---- constructor validation: exact messages -------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"lr": -1e-3}, "Invalid learning rate: -0.001"),
        ({"eps": -1e-8}, "Invalid epsilon value: -1e-08"),
        ({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0: 1.0"),
        ({"betas": (-0.1, 0.999)}, "Invalid beta parameter at index 0: -0.1"),
        ({"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0"),
        ({"betas": (0.9, -0.5)}, "Invalid beta parameter at index 1: -0.5"),
    ],
)
def test_invalid_hyper_parameters(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Adam([param(2)], **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -1},
        {"eps": -1},
        {"betas": (1, 0.999)},
        {"betas": (0.9, -1)},
        {"lr": torch.tensor(-1.0)},
        {"lr": torch.tensor([-0.5])},
        {"betas": (0.9, torch.tensor(1.0))},
    ],
    ids=["int lr", "int eps", "int beta1", "int beta2", "0-dim lr", "1-dim lr", "tensor beta2"],
)
def test_invalid_values_are_shown_as_given_as_torch_shows_them(kwargs: dict[str, Any]) -> None:
    messages = []
    for cls in (torch.optim.Adam, Adam):
        with pytest.raises(ValueError) as info:
            cls([param(2)], **kwargs)
        messages.append(str(info.value))
    assert messages[1] == messages[0]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lr", "0.1"),
        ("eps", "1e-8"),
        ("betas", ("0.9", 0.999)),
        ("lr", torch.tensor(0.1, device="meta")),
        ("lr", torch.tensor(0.1 + 1j)),
    ],
)
def test_hyper_parameters_must_be_real_numbers(key: str, value: Any) -> None:
    """Not converted from a string (torch.optim.Adam refuses one), nor read from a tensor that
    has no real value: a TypeError at construction, a ValueError naming the group at a step
    (set after construction), with nothing changed."""
    with pytest.raises(TypeError, match="must be a real number"):
        Adam([param(2)], **{key: value})
    a, b = param(2), param(3)
    opt = Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    opt.param_groups[1][key] = value
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(ValueError, match=r"param_groups\[1\]: .*must be a real number"):
        opt.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    assert len(opt.state) == 0


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("value", [np.array(0.01), np.array([[0.01]]), np.float32(0.01)])
def test_numpy_numbers_are_taken_as_torch_takes_them(value: Any, backend: str) -> None:
    """A numpy scalar or 1-element array as lr, eps or weight decay gives the float's step,
    on the per-parameter path too (float() of a 2-d array raised there)."""
    results = []
    for v in (value, float(np.asarray(value).item())):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 4))
        p.grad = torch.linspace(2, -2, 4)
        Adam([p], lr=v, eps=v, weight_decay=v, backend=backend).step()
        results.append(p.detach())
    assert torch.equal(results[0], results[1])


def test_betas_of_other_number_types_give_every_path_the_float64_step() -> None:
    """Taken as floats everywhere: the per-parameter path once computed β**t in the given
    type's own arithmetic (float32 for numpy's float32 or a float tensor)."""
    betas = (np.float32(0.9), torch.tensor([0.999]))
    results = []
    for backend in ("rust", "torch"):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=torch.float64))
        opt = Adam([p], lr=0.01, betas=betas, backend=backend)
        for t in range(5):
            p.grad = torch.linspace(2, -2 + t, 5, dtype=torch.float64)
            opt.step()
        results.append(p.detach())
    assert torch.equal(results[0], results[1])


def test_invalid_weight_decay() -> None:
    with pytest.raises(ValueError) as info:
        WeightDecay(-0.1)
    assert str(info.value) == "Invalid weight_decay value: -0.1"
    with pytest.raises(ValueError) as info:
        WeightDecay(-2.0, weight_decouple=False, absolute=True)
    assert str(info.value) == "Invalid weight_decay value: -2.0"


def test_boundary_values_are_valid() -> None:
    """0 ≤ lr, 0 ≤ eps, 0 ≤ β < 1 and λ ≥ 0 are all accepted."""
    opt = Adam([param(2)], lr=0.0, betas=(0.0, 0.0), eps=0.0, weight_decay=WeightDecay(0.0))
    assert opt.param_groups[0]["betas"] == (0.0, 0.0)
    assert WeightDecay(0.0).defaults() == {"weight_decay": 0.0}
    assert WeightDecay(0.3, weight_decouple=False).defaults() == {"weight_decay": 0.3}


@pytest.mark.parametrize("backend", ["cuda", "Rust", "", None])
def test_invalid_backend(backend: Any) -> None:
    with pytest.raises(ValueError, match="backend"):
        Adam([param(2)], backend=backend)


@pytest.mark.parametrize("threads", [0, -1, 1.5])
def test_invalid_num_threads(threads: Any) -> None:
    with pytest.raises(ValueError, match="num_threads"):
        Adam([param(2)], num_threads=threads)


# ---- gradients the optimizer must refuse ----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradient(backend: str) -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    opt = Adam(emb.parameters(), backend=backend)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def own_gradient() -> torch.nn.Parameter:
    """A parameter whose gradient is its own memory (torch refuses ``p.grad = p`` itself)."""
    p = param(4, 3)
    with pytest.raises(RuntimeError):
        p.grad = p
    p.grad = p.detach()
    assert p.grad.data_ptr() == p.data_ptr()
    return p


def overlapping_gradient() -> torch.Tensor:
    """A parameter and a gradient that are overlapping views of one buffer."""
    buffer = torch.randn(10)
    p = buffer[:6]
    p.grad = buffer[4:]
    return p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [own_gradient, overlapping_gradient], ids=["own", "overlap"])
@pytest.mark.parametrize("decay", [WeightDecay(), WeightDecay(0.1, weight_decouple=False)])
def test_gradient_sharing_memory_with_its_parameter(
    make: Callable[[], torch.Tensor], backend: str, decay: WeightDecay
) -> None:
    p = make()
    opt = Adam([param(3), p], lr=0.1, weight_decay=decay, backend=backend)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step()


# ---- tensors the Rust core cannot take, and layouts that need care ---------------------------


def negative_view_param() -> tuple[torch.Tensor, str]:
    """A float32 CPU tensor whose negative bit is set (the values are −base)."""
    return torch.randn(5)._neg_view(), "negative view"


def meta_param() -> tuple[torch.Tensor, str]:
    return torch.nn.Parameter(torch.zeros(3, device="meta")), "meta"


@pytest.mark.parametrize("make", [negative_view_param, meta_param], ids=["neg", "meta"])
def test_rust_backend_names_the_tensor_it_cannot_take(make: Callable) -> None:
    bad, reason = make()
    assert bad.is_leaf
    good = [param(3), param(2, 2), param(4)]
    # Group 1 holds a parameter without a gradient before the bad one: its index in the group,
    # not among the parameters that have gradients, is what the message must name.
    opt = Adam([{"params": good[:1]}, {"params": [*good[1:], bad]}], backend="rust")
    good[0].grad = torch.ones(3)
    good[2].grad = torch.ones(4)
    bad.grad = torch.ones(bad.shape, device=bad.device)
    with pytest.raises(RuntimeError) as info:
        opt.step()
    message = str(info.value)
    assert "param_groups[1]['params'][2]" in message
    assert reason in message


@pytest.mark.parametrize("backend", ["auto", "torch", "foreach"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_meta_parameters_step_as_torch_adam_steps_them(backend: str, amsgrad: bool) -> None:
    """Meta tensors (shapes without memory, as in deferred initialisation) share no memory and
    compute nothing: they step as torch.optim.Adam steps them, into the same state."""

    def run(make: Callable) -> list[dict[str, Any]]:
        ps = [torch.nn.Parameter(torch.zeros(s, device="meta")) for s in ((3, 2), (4,))]
        opt = make(ps)
        for _ in range(2):
            for p in ps:
                p.grad = torch.zeros(p.shape, device="meta")
            opt.step()
        return [
            {
                k: int(v) if k == "step" else (v.shape, v.dtype, v.device)
                for k, v in opt.state[p].items()
            }
            for p in ps
        ]

    ours = run(lambda ps: Adam(ps, backend=backend, amsgrad=amsgrad))
    assert ours == run(lambda ps: torch.optim.Adam(ps, amsgrad=amsgrad))


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().resolve_neg().numpy().astype(np.float64)


def check_per_step(
    tensors: list[torch.Tensor],
    grads: Callable[[int], list[torch.Tensor]],
    hyper: dict[str, Any],
    tol: Callable[[np.ndarray], np.ndarray],
    backend: str,
    steps: int = 30,
) -> None:
    """Steps ``tensors`` and compares each step against the oracle run from the stored θ, m, v
    of the step before (so that low-precision rounding does not accumulate)."""
    opt = Adam([{"params": tensors, **hyper}], backend=backend)
    for n in range(steps):
        oracle = AdamOracle([{"params": [to_np(t) for t in tensors], **hyper}])
        for i, t in enumerate(tensors):
            st = opt.state[t]
            if st:
                oracle.state[0][i] = {
                    "step": st["step"],
                    "exp_avg": to_np(st["exp_avg"]),
                    "exp_avg_sq": to_np(st["exp_avg_sq"]),
                }
        gs = grads(n)
        for t, g in zip(tensors, gs):
            t.grad = g
        opt.step()
        oracle.step([[to_np(g) for g in gs]])
        for i, t in enumerate(tensors):
            got, want = to_np(t), oracle.params[0][i]
            assert np.isfinite(got).all(), f"step {n + 1}, tensor {i}"
            assert (np.abs(got - want) <= tol(want)).all(), f"step {n + 1}, tensor {i}"
            assert opt.state[t]["step"] == n + 1


HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}


def f32_tol(x: np.ndarray) -> np.ndarray:
    """One float32 step from the same state: the stored θ is rounded once (½ ulp) and the step
    (≤ lr·(1 − β1)/√(1 − β2) ≈ 0.01 here) carries a few float32 roundings (~1e-9)."""
    return np.spacing(np.abs(x).astype(np.float32)).astype(np.float64) + 1e-8


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_negative_view_is_stepped_correctly(backend: str) -> None:
    base = torch.randn(5)
    view = base._neg_view()
    check_per_step([view], lambda n: [torch.randn(5)], HYPER, f32_tol, backend)
    assert torch.equal(base, -view.resolve_neg())


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_strided_view_is_stepped_in_place(backend: str) -> None:
    big = torch.randn(4, 6)
    view = big[:, ::2]
    untouched = big[:, 1::2].clone()
    # The gradient is itself a view with other strides.
    big_grads = [torch.randn(6, 4).t() for _ in range(30)]
    check_per_step([view], lambda n: [big_grads[n][:, :3]], HYPER, f32_tol, backend)
    assert view.data_ptr() == big.data_ptr()
    assert torch.equal(big[:, 1::2], untouched)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gradient_laid_out_unlike_its_parameter(backend: str) -> None:
    p = torch.nn.Parameter(torch.randn(5, 3))
    grads = [torch.randn(3, 5).t() for _ in range(30)]
    assert not grads[0].is_contiguous()
    other = torch.nn.Parameter(torch.randn(7))
    check_per_step([p, other], lambda n: [grads[n], torch.randn(7)], HYPER, f32_tol, backend)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_float16(backend: str) -> None:
    """float16 is computed in float32 and rounded once when stored: one step from the stored
    state is within one float16 ulp of the exact result. Gradient magnitudes 0.5..2 keep v in
    float16's normal range; elements 0..7 always have a zero gradient, which with the default
    eps (0 in float16) must still give a zero update, not 0/0."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, generator=gen).half()
    p = torch.nn.Parameter(x0.clone())

    def grads(n: int) -> list[torch.Tensor]:
        mag = torch.rand(64, generator=gen) * 1.5 + 0.5
        sign = torch.randint(0, 2, (64,), generator=gen) * 2 - 1
        g = (mag * sign).half()
        g[:8] = 0
        return [g]

    def f16_tol(x: np.ndarray) -> np.ndarray:
        return np.spacing(np.abs(x).astype(np.float16)).astype(np.float64)

    check_per_step([p], grads, {**HYPER, "eps": 1e-16}, f16_tol, backend)
    assert torch.equal(p.detach()[:8], x0[:8])
    opt = Adam([p], backend=backend)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float16


# ---- step() ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_with_closure(backend: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    before = [p.detach().numpy().copy() for p in model.parameters()]
    opt = Adam(model.parameters(), lr=0.1, backend=backend)
    seen = {}

    def closure() -> torch.Tensor:
        seen["grad_enabled"] = torch.is_grad_enabled()
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        seen["grads"] = [p.grad.numpy().copy() for p in model.parameters()]
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert seen["grad_enabled"] is True
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    # The update used the gradients the closure produced.
    hyper = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-16, "weight_decay": 0.0}
    oracle = AdamOracle([{"params": before, **hyper}])
    oracle.step([seen["grads"]])
    for p, want in zip(model.parameters(), oracle.params[0]):
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12, atol=1e-14)
        assert p.grad_fn is None and p.requires_grad
    assert opt.step(lambda: 42.0) == 42.0
    assert opt.step() is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_grad_are_untouched_and_get_no_state(backend: str) -> None:
    with_grad, without, frozen = param(3), param(4), param(2)
    frozen.requires_grad_(False)
    copies = [t.detach().clone() for t in (without, frozen)]
    opt = Adam(
        [with_grad, without, frozen],
        lr=0.1,
        weight_decay=WeightDecay(0.5, absolute=True),
        backend=backend,
    )
    for _ in range(3):
        with_grad.grad = torch.randn(3)
        opt.step()
    for t, copy in zip((without, frozen), copies):
        assert len(opt.state.get(t, {})) == 0
        assert torch.equal(t.detach(), copy)
    assert opt.state[with_grad]["step"] == 3
    # A parameter's state appears on its first update, with t = 1 there.
    without.grad = torch.randn(4)
    opt.step()
    assert opt.state[without]["step"] == 1 and opt.state[with_grad]["step"] == 4
