"""torch.compile: a compiled model trains with rustadam, and ``torch.compile(opt.step)`` runs.

The step (its checks and the Rust core) is opaque to TorchDynamo: it runs eagerly behind one
graph break, so the compiled step is the eager step, bit for bit, on every backend. Kept tiny
(a few steps of a small MLP): compiling is slow.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
import torch._dynamo
from torch import nn

from rustadam import Adam

STEPS = 3


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def optimizer(model: nn.Module, backend: str) -> Adam:
    if backend == "torch":
        # One group: Inductor compiles one kernel per group (and per recompile), slowly.
        return Adam(model.parameters(), lr=1e-2, backend=backend)
    return Adam(
        [
            {"params": list(model[0].parameters())},
            {"params": list(model[2].parameters()), "lr": 3e-3},
        ],
        lr=1e-2,
        backend=backend,
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)


def test_compiled_model_trains_with_rustadam() -> None:
    model, eager = make(), make()
    compiled = torch.compile(model)
    opt, eager_opt = optimizer(model, "auto"), optimizer(eager, "auto")
    x, y = batch()
    losses = []
    for _ in range(STEPS):
        for m, o in ((compiled, opt), (eager, eager_opt)):
            o.zero_grad()
            loss = (m(x) - y).pow(2).mean()
            loss.backward()
            o.step()
            if m is compiled:
                losses.append(loss.item())
    assert losses == sorted(losses, reverse=True)
    # Inductor's forward/backward round differently (~1e-7 relative on the gradients); Adam's
    # per-element normalization passes that on to the steps (lr 1e-2): far below 1e-5.
    for p, q, p0 in zip(model.parameters(), eager.parameters(), make().parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
        assert (p - p0).abs().max() > 1e-3  # it did train


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_compiled_step_matches_the_eager_step(backend: str) -> None:
    model, eager = make(), copy.deepcopy(make())
    opt, eager_opt = optimizer(model, backend), optimizer(eager, backend)
    step = torch.compile(opt.step)
    x, y = batch()
    for _ in range(STEPS):
        for m, o, s in ((model, opt, step), (eager, eager_opt, eager_opt.step)):
            o.zero_grad()
            (m(x) - y).pow(2).mean().backward()
            s()
    for p, q in zip(model.parameters(), eager.parameters()):
        assert torch.equal(p, q)
    assert all(s["step"] == STEPS for s in opt.state.values())


def test_fullgraph_compile_of_the_rust_step_is_refused() -> None:
    """As documented: the Rust call is a graph break, which ``fullgraph=True`` forbids."""
    model = make()
    opt = optimizer(model, "rust")
    x, y = batch()
    (model(x) - y).pow(2).mean().backward()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(opt.step, fullgraph=True)()


def test_importing_does_not_load_the_compiler() -> None:
    """torch._dynamo would be most of rustadam's import time. (Constructing any torch optimizer
    loads it: torch.optim.Optimizer.add_param_group does.)"""
    code = (
        "import sys, torch\n"
        "from rustadam import Adam, WeightDecay\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_fullgraph_refusal_names_rustadam() -> None:
    model = make()
    opt = optimizer(model, "rust")
    x, y = batch()
    (model(x) - y).pow(2).mean().backward()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="rustadam_step_runs_eagerly"):
        torch.compile(opt.step, fullgraph=True)()
