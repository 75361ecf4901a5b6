"""The step on torch's OpenMP threads, on the core's own rayon pool and on one thread: the same
bits every time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rustadam import Adam, WeightDecay, _core


def run(pool: str | None, threads: int, monkeypatch) -> list[torch.Tensor]:
    if pool is None:
        monkeypatch.delenv("RUSTADAM_THREAD_POOL", raising=False)
    else:
        monkeypatch.setenv("RUSTADAM_THREAD_POOL", pool)
    gen = torch.Generator().manual_seed(0)
    shapes = [(300_000,), (257, 129), (7,), (0,), (40_000,)]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float32]
    params = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]
    opt = Adam(params, num_threads=threads, weight_decay=WeightDecay(0.1), backend="rust")
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    return params + [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]


def test_pools_and_thread_counts_give_identical_bits(monkeypatch):
    reference = run("rayon", 1, monkeypatch)
    for pool in (None, "openmp", "rayon"):
        for threads in (2, 3):
            got = run(pool, threads, monkeypatch)
            for a, b in zip(got, reference):
                assert torch.equal(a, b), (pool, threads)


def test_unknown_pool_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RUSTADAM_THREAD_POOL", "tbb")
    p = torch.zeros(3)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match='unknown thread pool "tbb"'):
        Adam([p]).step()


def test_openmp_runtime_is_found_once_torch_is_loaded():
    # torch loads its OpenMP runtime with global symbols; the default pool is then OpenMP.
    t = [torch.zeros(4)]
    _core.adam_step(
        t,
        [torch.ones(4)],
        [torch.zeros(4)],
        [torch.zeros(4)],
        [1],
        _core.Config(lr=1e-3, eps=1e-8),
        num_threads=2,
        pool="openmp",
    )
    assert t[0][0] < 0


FORK_SCRIPT = """
import os, sys
import numpy as np
import torch
from rustadam import Adam
from rustadam.numpy import Adam as NumpyAdam

p = torch.from_numpy(np.ones(1 << 20, dtype=np.float32))
p.grad = torch.from_numpy(np.ones(1 << 20, dtype=np.float32))
Adam([p], num_threads=2).step()            # the parent uses the thread pool first
w = np.zeros(1 << 20, dtype=np.float32)
NumpyAdam([w], num_threads=2).step([np.ones_like(w)])
pid = os.fork()
if pid == 0:
    # torch's own parallel ops never return in such a child (libgomp's team is gone), so the
    # child steps numpy arrays; its threads must be its own.
    w2 = np.zeros(1 << 20, dtype=np.float32)
    NumpyAdam([w2], num_threads=2).step([np.ones_like(w2)])
    os._exit(0 if (w2 < 0).all() else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
@pytest.mark.parametrize("pool", ["openmp", "rayon"])
def test_step_in_a_child_made_by_fork(pool):
    """A forked child inherits the thread pools without their threads: it must build its own
    instead of waiting forever for the parent's (which stepped torch tensors on `pool` first)."""
    env = {**os.environ, "RUSTADAM_THREAD_POOL": pool}
    out = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT], env=env, timeout=60, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_a_pool_that_cannot_start_leaves_every_group_unchanged():
    # Group 0 is small enough to step on the calling thread, group 1 needs the pool, which is
    # built on first use: with no address space left for thread stacks the build fails. That
    # must happen before group 0 is written, not between the two groups.
    from _attacks import run_case

    out = run_case(
        r"""
        import resource
        from rustadam import Adam
        small, big = torch.randn(10), torch.randn(1 << 20)
        opt = Adam([{"params": [small]}, {"params": [big], "lr": 1e-2}], num_threads=2)
        small.grad, big.grad = torch.ones(10), torch.ones(1 << 20)
        opt.init_state(opt.state[small], opt.param_groups[0], small)
        opt.init_state(opt.state[big], opt.param_groups[1], big)
        snap = snapshot(opt)
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 20), resource.RLIM_INFINITY))
        try:
            opt.step()
            print("stepped")
        except RuntimeError as e:
            print("refused:", str(e).splitlines()[0])
            assert_unchanged(opt, snap, "after the refused step")
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        opt.step()
        print("then", [opt.state[p]["step"] for p in (small, big)])
        """,
        env={"RUSTADAM_THREAD_POOL": "rayon"},
    )
    lines = out.strip().splitlines()
    # Where the limit leaves room for the pool the step is simply whole; here it does not.
    assert lines[0].startswith("refused:") and "thread pool" in lines[0], out
    assert "nothing was written" in lines[0], out
    assert lines[-1] == "then [1, 1]", out
