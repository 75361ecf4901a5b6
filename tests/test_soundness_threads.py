"""Soundness under threads and processes: memory freed by another thread while the GIL
is released, concurrent steps, bounded thread pools, fork. Each case runs in its own subprocess
(``_attacks.run_case``) with a timeout, so a crash or a hang fails one test."""

from __future__ import annotations

import pytest

from _attacks import run_case
from rustadam import Adam


def test_another_thread_replacing_param_data_mid_step_is_never_a_crash():
    out = run_case(
        r"""
        from rustadam import Adam
        n = 1 << 24   # 64 MiB, above glibc's largest mmap threshold: a freed storage is unmapped
        p = torch.randn(n)
        keep = p.detach().clone()
        opt = Adam([p], lr=1e-3, backend="rust")
        p.grad = torch.randn(n)
        # The state exists before the other thread starts: torch's own zeros_like (which
        # creates it, here as in torch.optim.Adam) can crash while .data is replaced under it.
        opt.step()
        stop = False

        def swap():
            while not stop:
                p.data = torch.zeros(1)       # frees the storage being stepped
                p.data = keep.clone()         # a new storage of the right size
                p.data = torch.empty(n)       # the same size, new memory: only the pointer moves

        t = threading.Thread(target=swap)
        t.start()
        kinds = {}
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                opt.step()
                kinds["ok"] = kinds.get("ok", 0) + 1
            except BaseException as e:
                kinds[exc_name(e)] = kinds.get(exc_name(e), 0) + 1
        stop = True
        t.join()
        print("kinds", sorted(kinds))
        print("END")
        """,
        timeout=60,
    )
    assert out.strip().splitlines()[-1] == "END", out
    kinds = eval(out.split("kinds ")[1].splitlines()[0])
    assert set(kinds) <= {"ok", "RuntimeError"}, out


def test_two_threads_stepping_one_optimizer_raise_runtime_error_or_complete():
    out = run_case(
        r"""
        from rustadam import Adam, WeightDecay
        torch.manual_seed(0)
        params = [torch.randn(1 << 18), torch.randn(64, 64), torch.randn(300)[::3]]
        opt = Adam(params, lr=1e-3, weight_decay=WeightDecay(0.01))
        for p in params:
            p.grad = torch.randn(p.shape)
        seen = []
        go = threading.Barrier(2)

        def work():
            go.wait()
            for _ in range(60):
                try:
                    opt.step()
                    seen.append("ok")
                except BaseException as e:
                    seen.append(exc_name(e) + ": " + str(e).splitlines()[0][:120] if str(e) else "")

        ts = [threading.Thread(target=work) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        print("kinds", sorted({s.split(":")[0] for s in seen}))
        print("first", [s for s in seen if s != "ok"][:3])
        steps = [opt.state[p]["step"] for p in params]
        print("steps", steps, seen.count("ok"))
        print("finite", all(bool(t.isfinite().all()) for p in params
                            for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])))
        print("END")
        """,
        timeout=60,
    )
    assert out.strip().splitlines()[-1] == "END", out
    kinds = eval(out.split("kinds ")[1].splitlines()[0])
    assert set(kinds) <= {"ok", "RuntimeError"}, out
    assert "finite True" in out, out
    # Every completed step counted once for every parameter: no lost or torn step count.
    steps, ok = out.split("steps ")[1].splitlines()[0].rsplit(" ", 1)
    assert eval(steps) == [int(ok)] * 3, out


def test_two_optimizers_sharing_a_parameter_in_two_threads_never_crash():
    out = run_case(
        r"""
        from rustadam import Adam
        shared = torch.randn(1 << 20)
        own = [torch.randn(1 << 16), torch.randn(1 << 16)]
        opts = [Adam([shared, own[k]], lr=1e-4, backend=b) for k, b in enumerate(("rust", "auto"))]
        shared.grad = torch.randn(shared.shape)
        for o in own:
            o.grad = torch.randn(o.shape)
        kinds = set()
        go = threading.Barrier(2)

        def work(k):
            go.wait()
            for _ in range(60):
                try:
                    opts[k].step()
                    kinds.add("ok")
                except BaseException as e:
                    kinds.add(exc_name(e))

        ts = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        print("kinds", sorted(kinds))
        print("finite", bool(shared.isfinite().all()))
        print("END")
        """,
        timeout=60,
    )
    assert out.strip().splitlines()[-1] == "END", out
    kinds = eval(out.split("kinds ")[1].splitlines()[0])
    assert set(kinds) <= {"ok", "RuntimeError"}, out
    assert "finite True" in out, out


@pytest.mark.parametrize("pool", ["rayon"])
def test_thread_count_stays_bounded_when_num_threads_varies(pool):
    out = run_case(
        r"""
        from rustadam import Adam
        def threads():
            return len(os.listdir("/proc/self/task"))
        p = torch.randn(1 << 20)               # large enough that every thread gets work
        opt = Adam([p], lr=1e-4, backend="rust")
        p.grad = torch.randn(p.shape)
        counts = []
        for sweep in range(2):
            for n in range(1, 41):
                opt.num_threads = n
                opt.step()
            counts.append(threads())
        for n in (3, 17, 40, 1, 29):
            opt.num_threads = n
            opt.step()
        counts.append(threads())
        print("counts", counts)
        print("END")
        """,
        timeout=90,
        env={"RUSTADAM_THREAD_POOL": pool},
    )
    assert out.strip().splitlines()[-1] == "END", out
    counts = eval(out.split("counts ")[1].splitlines()[0])
    assert max(counts) <= 2 * 40 + 16, f"threads: {counts}"
    assert counts[1] <= counts[0] + 2 and counts[2] <= counts[1] + 2, f"growing: {counts}"


def test_absurd_num_threads_is_a_value_error():
    import torch

    with pytest.raises(ValueError, match="num_threads"):
        Adam([torch.zeros(3)], num_threads=100_000)


@pytest.mark.parametrize("n", [0, -1, 2**64, 100_000, True, 2.0, "2"])
def test_every_entry_point_refuses_a_bad_num_threads_by_name(n):
    """The extension's own functions take 1 to 1024 threads: anything else is a ValueError
    naming num_threads (not an OverflowError, not 0 taken as 1), before anything is written."""
    import numpy as np
    import torch

    from rustadam import _core

    p, g, m, v = (np.ones(4, np.float32) for _ in range(4))
    tp, tg, tm, tv = (torch.ones(4) for _ in range(4))
    group = [(_core.Config(), [tp], [tg], [tm], [tv], None, None, [1], [0])]
    calls = [
        lambda: _core.numpy_adam_step(p, g, m, v, 1, _core.Config(), num_threads=n),
        lambda: _core.numpy_adam_step_many([p], [g], [m], [v], [1], _core.Config(), num_threads=n),
        lambda: _core.adam_step([tp], [tg], [tm], [tv], [1], _core.Config(), num_threads=n),
        lambda: _core.plan(group).execute(num_threads=n),
        lambda: _core.plan(group).roofline(num_threads=n),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="num_threads must be an int from 1 to"):
            call()
    assert (p == 1).all() and bool((tp == 1).all())


FORK = r"""
import signal
import numpy as np
from rustadam import Adam

N = 1 << 22

def prepared(threads=None):
    # Built from numpy, with its state set by hand: no torch op runs on it before the fork.
    p = torch.from_numpy(np.random.default_rng(0).standard_normal(N, dtype=np.float32))
    opt = Adam([p], lr=1e-3, backend="rust", num_threads=threads)
    p.grad = torch.from_numpy(np.ones(N, dtype=np.float32))
    opt.state[p].update(step=0, exp_avg=torch.from_numpy(np.zeros(N, dtype=np.float32)),
                        exp_avg_sq=torch.from_numpy(np.zeros(N, dtype=np.float32)))
    return p, opt

def step_checked(p, opt, tag):
    # A constant gradient moves every element by lr at every step; checked with numpy only
    # (torch's own parallel ops do not return in a child once the parent used OpenMP).
    before = p.numpy().copy()
    opt.step()
    assert np.allclose(p.numpy(), before - 1e-3, atol=1e-6), tag

def child_exit_code(body, timeout=10.0):
    pid = os.fork()
    if pid == 0:
        try:
            body()
            os._exit(0)
        except BaseException as e:
            print("child raised", exc_name(e), e, flush=True)
            os._exit(3)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "HANG"
"""


def test_forked_child_steps_after_the_parent_used_the_pools():
    out = run_case(
        FORK
        + r"""
torch.randn(N).exp().sum()            # torch's OpenMP team exists
p, opt = prepared()
step_checked(p, opt, "parent")        # and the core's pool has run
for threads in (None, 2):
    q, o = prepared(threads)
    print("child", threads, child_exit_code(lambda: step_checked(q, o, "child")), flush=True)
step_checked(p, opt, "parent after the children")
print("END")
""",
        timeout=60,
    )
    assert "child None 0\nchild 2 0\nEND" in out, out


def test_forked_child_whose_first_parallel_use_comes_after_the_fork():
    out = run_case(
        FORK
        + r"""
p, opt = prepared()                   # the parent has run nothing parallel yet
print("child", child_exit_code(lambda: step_checked(p, opt, "child")), flush=True)
q, o = prepared(2)
print("child 2 threads", child_exit_code(lambda: step_checked(q, o, "child")), flush=True)
step_checked(p, opt, "parent after the children")
torch.randn(N).exp().sum()
print("END")
""",
        timeout=60,
    )
    assert "child 0\nchild 2 threads 0\nEND" in out, out


def test_a_forked_child_steps_numpy_arrays_a_parent_thread_was_stepping():
    # The claims of a step running in another thread at fork() belong to the parent: the child
    # (which has no such thread) must be able to step the same arrays.
    out = run_case(
        r"""
        import numpy as np
        from rustadam.numpy import adam_step
        n = 1 << 23
        arrays = [np.ones(n), np.full(n, 0.5), np.zeros(n), np.zeros(n)]
        stop = False

        def work():
            t = 0
            while not stop:
                t += 1
                adam_step(*arrays, t, num_threads=1)

        th = threading.Thread(target=work)
        th.start()
        time.sleep(0.2)
        failures = 0
        for _ in range(5):
            time.sleep(0.01)
            pid = os.fork()
            if pid == 0:
                try:
                    a = [np.ones(8), np.full(8, 0.5), np.zeros(8), np.zeros(8)]
                    adam_step(*a, 1)
                    adam_step(*arrays, 10**6, num_threads=1)
                    os._exit(0)
                except BaseException as e:
                    print("child:", type(e).__name__, e, flush=True)
                    os._exit(3)
            _, status = os.waitpid(pid, 0)
            failures += status != 0
        stop = True
        th.join()
        print("failures", failures)
        """,
        timeout=120,
    )
    assert out.strip().splitlines()[-1] == "failures 0", out
