"""The step allocates nothing that stays: peak memory does not grow over many steps."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap

import pytest

# Run in a fresh interpreter: the test process's own peak is set by whatever ran before it.
SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from rustadam import Adam, WeightDecay
    torch.manual_seed(0)
    params = [torch.randn(1 << 20) for _ in range(4)]          # 16 MiB of float32 params
    params += [torch.randn(1000) for _ in range(1000)]         # many small tensors
    params += [torch.randn(1 << 18, dtype=torch.bfloat16)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Adam(params, backend="{backend}", weight_decay=WeightDecay(0.01))
    for _ in range(5):
        opt.step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(100):
        opt.step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(after - before)
    """
)


@pytest.mark.parametrize("backend", ["rust", "auto"])
def test_peak_memory_does_not_grow_over_100_steps(backend):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(backend=backend)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    growth_kib = int(out.stdout.strip().splitlines()[-1])
    # ru_maxrss is in KiB on Linux. One step's transient bookkeeping (tables of pointers for
    # ~1000 tensors) is a few hundred KiB at most and is freed; a leak of even one float32
    # tensor's copy per step would add megabytes over 100 steps.
    assert growth_kib < 1024, f"peak RSS grew by {growth_kib} KiB over 100 steps"


def test_ru_maxrss_is_in_kib():
    """The unit the bound above assumes (Linux reports KiB, macOS bytes)."""
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 10_000  # > 10 MiB: torch loaded
    assert sys.platform.startswith("linux")
