"""Memory that moves after a step was checked, the registry of running steps across fork() and
numpy, and parameters the batched paths cannot order: each a regression test of a case that
crashed, raced or gave other numbers than torch.optim.

Crash-prone cases run in their own interpreter through ``_attacks.run_case``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _attacks import assert_unchanged, run_case, snapshot
from rustadam import Adam, _core


def test_a_plan_whose_storage_moved_before_execute_writes_nothing():
    """``share_memory_()`` and ``resize_`` keep the storage object but give it new memory (the
    old block is freed): ``execute`` finds it and refuses before any write."""
    out = run_case(
        """
        from rustadam import _core
        for move in ("share", "resize"):
            ps = [torch.randn(4096) for _ in range(3)]
            ms, vs = [torch.zeros(4096) for _ in ps], [torch.zeros(4096) for _ in ps]
            gs = [torch.ones(4096) for _ in ps]
            before = [t.clone() for t in ps + ms + vs]
            group = [(_core.Config(), ps, gs, ms, vs, None, None, [1] * 3, [0] * 3)]
            plan = _core.plan(group, strict=True)
            if move == "share":
                ps[2].share_memory_()
            else:
                ps[2].untyped_storage().resize_(0)
            try:
                plan.execute(num_threads=2)
                print(move, "executed")
            except _core.StepError as e:
                assert e.args[:3] == (0, 2, "fatal") and "moved" in e.args[3], e.args
                print(move, "refused")
            # (the resized parameter has no memory left to compare: torch would read past it)
            same = [
                torch.equal(a, b)
                for a, b in zip(before, ps + ms + vs)
                if b.untyped_storage().nbytes() >= b.nbytes
            ]
            print(move, "unchanged", all(same))
        """
    )
    for move in ("share", "resize"):
        assert f"{move} refused" in out and f"{move} unchanged True" in out, out


def test_a_mode_moving_memory_between_the_checks_never_crashes():
    """Python code runs in the general path after the core's first read (checks of a parameter
    the core defers, here a negative view, which a TorchFunctionMode answers): the step reads
    everything again before writing, so memory moved meanwhile is never written."""
    out = run_case(
        """
        from torch.overrides import TorchFunctionMode
        from rustadam import Adam
        big = torch.nn.Parameter(torch.randn(1 << 20))
        neg = torch.nn.Parameter(torch.randn(64)._neg_view())
        opt = Adam([big, neg], lr=0.1)
        for p in (big, neg):
            p.grad = torch.ones_like(p)
        opt.step()

        class Mover(TorchFunctionMode):
            moved = 0
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if not Mover.moved:
                    Mover.moved = 1
                    with torch._C.DisableTorchFunction():
                        big.share_memory_()
                return func(*args, **(kwargs or {}))

        before = big.detach().clone()
        with Mover():
            opt.step()
        print("moved", Mover.moved, "stepped", not torch.equal(before, big.detach()))
        """
    )
    assert "moved 1 stepped True" in out, out


def test_a_child_forked_while_the_parent_steps_in_another_thread_can_step():
    """The child inherits the claim of the parent's running step, not the thread that would
    release it: claims of another process do not count."""
    out = run_case(
        """
        from rustadam import Adam
        # torch's own parallel ops hang in a child forked after they ran: keep them serial
        torch.set_num_threads(1)
        p = torch.nn.Parameter(torch.randn(1 << 22))
        p.grad = torch.ones_like(p)
        opt = Adam([p], lr=0.1, num_threads=1)
        opt.step()
        stop = threading.Event()
        def loop():
            while not stop.is_set():
                opt.step()
        t = threading.Thread(target=loop)
        t.start()
        time.sleep(0.3)
        results = []
        for _ in range(6):  # a fork lands inside a step in most tries
            pid = os.fork()
            if pid == 0:
                try:
                    Adam([p], lr=0.1, num_threads=1).step()  # the same memory, a new optimizer
                    opt.step()  # the optimizer whose step another thread of the parent ran
                    os._exit(0)
                except BaseException as e:
                    print(type(e).__name__, e, flush=True)
                    os._exit(3)
            results.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        stop.set()
        t.join()
        print("children", results)
        """,
        env={"RUSTADAM_THREAD_POOL": "rayon"},
    )
    assert "children [0, 0, 0, 0, 0, 0]" in out, out


def test_numpy_steps_claim_their_memory_like_torch_steps():
    """Two numpy optimizers over two arrays of one buffer (no common base object), stepped from
    two threads: one is refused while the other runs, never both writing at once."""
    import threading

    import rustadam.numpy as rnp

    n = 1 << 22
    buf = bytearray(n * 4)
    a, b = np.frombuffer(buf, np.float32), np.frombuffer(buf, np.float32)
    g = np.ones(n, np.float32)
    opts = rnp.Adam([a], num_threads=1), rnp.Adam([b], num_threads=1)
    seen: list[str] = []

    def run(o):
        for _ in range(30):
            try:
                o.step([g])
                seen.append("ok")
            except RuntimeError as e:
                assert "another rustadam step is running" in str(e)
                seen.append("refused")

    ts = [threading.Thread(target=run, args=(o,)) for o in opts]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert "ok" in seen
    if "refused" not in seen:
        pytest.skip("the two threads never overlapped on this machine")


def assert_refused_unchanged(opt, message):
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("backend", ["auto", "rust", "foreach"])
def test_a_parameter_listed_twice_is_refused_by_the_batched_paths(backend):
    """torch.optim steps a repeated parameter once per listing (t + 1, then t + 2); the batched
    paths refuse it by name instead of applying two updates with one count."""
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    opt = Adam([p, p], lr=0.1, backend=backend)
    assert_refused_unchanged(opt, r"\['params'\]\[1\].*same tensor as .*\['params'\]\[0\]")
    # With its state in place (the one-call step's case).
    opt.state[p] = {"step": 1, "exp_avg": torch.zeros(5), "exp_avg_sq": torch.zeros(5)}
    assert_refused_unchanged(opt, r"\['params'\]\[1\].*same tensor as .*\['params'\]\[0\]")


def test_a_parameter_listed_twice_steps_as_torch_optim_on_the_torch_path():
    init = torch.randn(5)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    with pytest.warns(UserWarning, match="duplicate"):
        ours = Adam([a, a], lr=0.1, optimized_update=False, eps=1e-8, backend="torch")
    with pytest.warns(UserWarning, match="duplicate"):
        ref = torch.optim.Adam([b, b], lr=0.1)
    for _ in range(3):
        a.grad, b.grad = a.detach() * 2, b.detach() * 2
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b)
    assert ours.state[a]["step"] == int(ref.state[b]["step"]) == 6


def test_a_deferred_parameter_sharing_memory_with_a_core_one_is_refused_not_reordered():
    """The core steps its parameters first: a parameter it defers (a negative view) that shares
    memory with one it steps would be stepped out of torch's order, so the step is refused."""
    base = torch.randn(8)
    p0 = torch.nn.Parameter(base._neg_view())
    p1 = torch.nn.Parameter(base[:])
    for p in (p0, p1):
        p.grad = torch.ones(8)
    opt = Adam([p0, p1], lr=0.1)
    assert_refused_unchanged(opt, r"\['params'\]\[0\].*shares memory with .*\['params'\]\[1\]")


def test_the_registry_and_execute_check_cost_nothing_in_a_normal_step():
    """A fresh plan executes (its storages did not move) and steps like the one-call path."""
    ps = [torch.randn(100) for _ in range(3)]
    ms, vs = [torch.zeros(100) for _ in ps], [torch.zeros(100) for _ in ps]
    gs = [torch.ones(100) for _ in ps]
    twin = [p.clone() for p in ps]
    group = [(_core.Config(), ps, gs, ms, vs, None, None, [1] * 3, [0] * 3)]
    _core.plan(group, strict=True).execute(num_threads=1)
    opt = Adam([torch.nn.Parameter(t) for t in twin], lr=1e-3, eps=1e-16)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones(100)
    opt.step()
    for a, b in zip(ps, opt.param_groups[0]["params"]):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_a_fork_worker_importing_rustadam_itself_does_not_use_the_inherited_team():
    """A multiprocessing worker started by "fork" after the parent's torch ran parallel ops, which
    imports rustadam only then: its first threaded step runs on the core's own pool."""
    out = run_case(
        """
        import multiprocessing as mp
        import numpy as np
        torch.randn(1 << 22).exp().sum()  # the parent's torch starts its OpenMP team

        def worker(q):
            from rustadam import Adam
            n = 1 << 22  # threaded by the core; made without torch's (hanging) parallel ops
            p = torch.from_numpy(np.zeros(n, np.float32))
            p.grad = torch.from_numpy(np.ones(n, np.float32))
            opt = Adam([p], lr=1e-3, num_threads=2)
            opt.state[p].update(
                step=0,
                exp_avg=torch.from_numpy(np.zeros(n, np.float32)),
                exp_avg_sq=torch.from_numpy(np.zeros(n, np.float32)),
            )
            opt.step()
            q.put(float(p[0]))

        ctx = mp.get_context("fork")
        q = ctx.Queue()
        proc = ctx.Process(target=worker, args=(q,))
        proc.start()
        print("stepped", q.get(timeout=40))
        proc.join(10)
        """,
        timeout=60,
    )
    assert "stepped" in out and abs(float(out.split()[-1]) + 1e-3) < 1e-7, out


class Sub(torch.Tensor):
    """A subclass: stepped by the foreach path, not the core."""


@pytest.mark.parametrize(
    "bad",
    [
        lambda p: torch.zeros(3),
        lambda p: torch.zeros(1).expand(p.shape),
        lambda p: torch.zeros(p.shape, dtype=torch.float64),
    ],
    ids=["shape", "expanded", "float64"],
)
def test_a_later_group_refused_by_the_foreach_path_leaves_the_core_group_unchanged(bad):
    """The core's group and the foreach path's group of one step: the path's checks come before
    the core writes anything."""
    torch.manual_seed(0)
    plain = torch.nn.Parameter(torch.randn(6))
    sub = torch.nn.Parameter(torch.randn(5).as_subclass(Sub))
    opt = Adam([{"params": [plain]}, {"params": [sub]}], lr=0.1)
    for p in (plain, sub):
        p.grad = torch.ones(p.shape)
    opt.step()
    opt.state[sub]["exp_avg_sq"] = bad(sub)
    assert_refused_unchanged(opt, r"param_groups\[1\]\['params'\]\[0\].*exp_avg_sq")


def test_among_many_parameters_only_the_one_sharing_memory_with_a_core_one_is_refused():
    """Forty core and forty subclass parameters in one buffer each, then one subclass parameter
    that views a core one: that pair is named; without it the step goes through."""
    base = torch.randn(80, 4)
    core = [torch.nn.Parameter(torch.randn(4)) for _ in range(40)]
    subs = [torch.nn.Parameter(base[i].as_subclass(Sub)) for i in range(40)]
    for p in core + subs:
        p.grad = torch.ones(4)
    Adam(core + subs, lr=0.1).step()  # disjoint: stepped
    view = torch.nn.Parameter(core[17].detach()[1:].as_subclass(Sub))
    view.grad = torch.ones(3)
    opt = Adam(core + subs + [view], lr=0.1)
    assert_refused_unchanged(opt, r"\['params'\]\[80\].*shares memory with .*\['params'\]\[17\]")
