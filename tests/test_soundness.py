"""Soundness of the glue between torch and the Rust core: stale metadata, objects the
extension must refuse by type, all-or-nothing steps, overlapping parameters, numpy aliasing,
autograd version counters, memory the optimizer no longer needs, and the torch path.

Every case that could crash the interpreter (write freed or foreign memory, abort, hang) runs in
its own subprocess through ``_attacks.run_case``; the rest run here. Threads and processes are in
``test_soundness_threads.py``.
"""

from __future__ import annotations

import copy
import gc
import math
import re
import weakref

import numpy as np
import pytest
import torch

import rustadam.numpy as rnp
from _attacks import assert_unchanged, run_case, snapshot
from oracle import AdamOracle
from rustadam import Adam, WeightDecay

BACKENDS = ["auto", "rust", "torch"]
LR, BETAS = 0.1, (0.9, 0.999)


def grads_for(params, seed, dtype=None):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype or p.dtype)


def set_grad(t, g):
    """Assigns a gradient, also of another dtype (torch checks ``grad_dtype`` on assignment)."""
    if g.dtype != t.dtype and hasattr(t, "grad_dtype"):
        t.grad_dtype = None
    t.grad = g


def assert_close(a, b, what=""):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


# ---- stale metadata between steps --------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "rust"])
def test_transposed_square_param_steps_like_the_torch_twin_and_the_oracle(backend):
    torch.manual_seed(0)
    init = [torch.randn(6, 6), torch.randn(5)]
    a = [p.clone() for p in init]
    b = [p.clone() for p in init]
    oa = Adam(a, lr=LR, weight_decay=WeightDecay(0.1), backend=backend)
    ob = Adam(b, lr=LR, weight_decay=WeightDecay(0.1), backend="torch")
    group = {"lr": LR, "betas": BETAS, "eps": 1e-16, "weight_decay": 0.1}
    oracle = AdamOracle([dict(group, params=[p.numpy() for p in init])])
    for seed in range(2):
        grads_for(a, seed)
        grads_for(b, seed)
        oracle.step([[p.grad.double().numpy() for p in a]])
        oa.step()
        ob.step()
    for ps in (a, b):
        ps[0].data = ps[0].data.t()  # same memory and data pointer, other strides
    oracle.params[0][0] = oracle.params[0][0].T.copy()  # the moments keep their positions
    for seed in range(2, 5):
        grads_for(a, seed)
        grads_for(b, seed)
        oracle.step([[p.grad.double().numpy() for p in a]])
        oa.step()
        ob.step()
        for i, (p, q) in enumerate(zip(a, b)):
            assert_close(p, q, f"param {i} vs torch twin after step {seed}")
            np.testing.assert_allclose(
                p.double().numpy(), oracle.params[0][i], rtol=1e-5, atol=1e-6
            )
            for k in ("exp_avg", "exp_avg_sq"):
                assert_close(oa.state[p][k], ob.state[q][k], f"{k} {i}")
                np.testing.assert_allclose(
                    oa.state[p][k].double().numpy(),
                    oracle.state[0][i][k],
                    rtol=1e-5,
                    atol=1e-7,
                )


def test_param_shrunk_with_a_stale_grad_is_refused_and_changes_nothing():
    out = run_case(
        r"""
        from rustadam import Adam, WeightDecay
        for backend in ("auto", "rust", "torch"):
            for named in (False, True):
                torch.manual_seed(0)
                p, q, r = torch.randn(4096), torch.randn(3, 5), torch.randn(7)
                first = [("shrunk", p), ("q", q)] if named else [p, q]
                second = [("r", r)] if named else [r]
                opt = Adam([{"params": first}, {"params": second}], lr=0.1,
                           weight_decay=WeightDecay(0.1), backend=backend)
                for t in (p, q, r):
                    t.grad = torch.randn(t.shape)
                opt.step()
                for t in (p, q, r):
                    t.grad = torch.randn(t.shape)
                p.data = p.data[:5]           # the gradient and the state keep 4096 elements
                snap = snapshot(opt)
                try:
                    opt.step()
                    print(backend, named, "NO ERROR")
                except BaseException as e:
                    try:
                        assert_unchanged(opt, snap, f"{backend} named={named}")
                        unchanged = "unchanged"
                    except AssertionError as a:
                        unchanged = "CHANGED " + str(a)[:200]
                    want = "'shrunk'" if named else "param_groups[0]['params'][0]"
                    msg = repr(str(e)[:200])
                    print(backend, named, exc_name(e), want in str(e), unchanged, msg)
        print("END")
        """,
        timeout=60,
    )
    lines = out.strip().splitlines()
    assert lines[-1] == "END", out
    for line in lines[:-1]:
        assert re.match(r"\w+ (True|False) RuntimeError True unchanged ", line), line


def test_storage_freed_and_reused_smaller_at_the_same_address_is_never_a_crash():
    out = run_case(
        r"""
        from rustadam import Adam
        outcomes = []
        for backend in ("auto", "rust"):
            for n in (1 << 12, 1 << 18):  # a heap chunk and an mmap'ed block
                p = torch.randn(n)
                opt = Adam([p], lr=0.1, backend=backend)
                p.grad = torch.randn(n)
                opt.step()
                addr = p.data_ptr()
                hits = 0
                for attempt in range(64):
                    p.data = torch.zeros(1)   # frees the old storage
                    gc.collect(0)             # (a full collection takes 0.2 s with torch)
                    small = torch.randn(n // 2)
                    if small.data_ptr() == addr:
                        hits += 1
                    p.data = small            # the gradient, too, keeps n elements
                    if attempt % 2:           # a gradient of the new size; the state keeps n
                        p.grad = None
                        p.grad = torch.randn(n // 2)
                    try:
                        opt.step()
                        outcomes.append("stepped")
                    except (RuntimeError, ValueError) as e:
                        outcomes.append(type(e).__name__)
                    if hits >= 4:
                        break
                print(backend, n, "same-address hits", hits)
        # the heap is still sound: allocate, free, compute
        junk = [torch.randn(1000 + i) for i in range(200)]
        del junk
        gc.collect()
        print("outcomes", sorted(set(outcomes)))
        print("END", bool(torch.randn(1 << 16).isfinite().all()))
        """,
        timeout=240,
    )
    assert out.strip().splitlines()[-1] == "END True", out
    # Every step had a gradient or a state of the old size: nothing meaningful could run.
    assert (
        "outcomes ['RuntimeError']" in out
        or "outcomes ['ValueError']" in out
        or ("outcomes ['RuntimeError', 'ValueError']" in out)
    ), out


@pytest.mark.parametrize("entry", ["step", "adam_step", "execute"])
def test_a_finalizer_run_by_a_collection_during_the_step_cannot_free_what_it_writes(entry):
    # The storages' Python objects are made in the hold pass; a collection they trigger once
    # the collector runs again would call a finalizer that frees a checked parameter's memory
    # (32 MiB: munmapped) before the kernel writes it, unless nothing runs in between.
    out = run_case(
        f"""
        from rustadam import Adam, _core
        entry = {entry!r}
        K = 1000
        big = torch.zeros(8 << 20)
        params = [big] + [torch.zeros(16) for _ in range(K - 1)]
        ran = []

        class Finalizer:
            def __del__(self):
                ran.append(big.untyped_storage().nbytes())
                big.untyped_storage().resize_(0)

        def garbage():
            a, b = Finalizer(), Finalizer()
            a.other, b.other = b, a

        if entry == "step":
            params = [torch.nn.Parameter(p) for p in params]
            big = params[0]
            opt = Adam(params, lr=0.1)
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
            for p in params:  # fresh gradients: storages without a Python object yet
                p.grad = torch.ones_like(p)
            gc.collect()
            garbage()
            opt.step()
        else:
            grads = [torch.ones_like(p) for p in params]
            ms = [torch.zeros_like(p) for p in params]
            vs = [torch.zeros_like(p) for p in params]
            cfg = _core.Config(lr=0.1)
            gc.collect()
            garbage()
            if entry == "adam_step":
                _core.adam_step(params, grads, ms, vs, [1] * K, cfg)
            else:
                group = [(cfg, params, grads, ms, vs, None, None, [1] * K, [0] * K)]
                plan = _core.plan(group, strict=True)
                try:  # a collection after plan() frees it first: the re-check refuses
                    plan.execute(num_threads=1)
                except _core.StepError as e:
                    assert "moved after the step was checked" in str(e), e
        print("END", ran)
        """,
        timeout=120,
    )
    assert out.strip().splitlines()[-1].startswith("END"), out


# ---- objects the extension refuses by type -----------------------------------------------------

TYPE_ATTACK = r"""
import torch
from rustadam import _core

n = 64
cfg = _core.Config(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                   weight_decouple=True, absolute=False, optimized_update=True,
                   maximize=False, amsgrad=False)

def four():
    return [torch.zeros(n), torch.ones(n), torch.zeros(n), torch.zeros(n)]

# Control: the entry point as specified steps plain tensors and Parameters.
bufs = four()
bufs[0] = torch.nn.Parameter(bufs[0], requires_grad=False)
_core.adam_step([bufs[0]], [bufs[1]], [bufs[2]], [bufs[3]], [1], cfg)
assert bufs[0].detach().ne(0).all(), "the control step did not write"
print("control ok")

canary = torch.zeros(n)

class Duck:
    # says it is a float32 CPU tensor of n elements living at the canary's address
    shape = torch.Size([n]); dtype = torch.float32; layout = torch.strided
    device = torch.device("cpu"); is_cpu = True; is_cuda = False; requires_grad = False
    def stride(self, dim=None): return (1,) if dim is None else 1
    def data_ptr(self): return canary.data_ptr()
    def numel(self): return n
    def dim(self): return 1
    def size(self, dim=None): return self.shape if dim is None else n
    def element_size(self): return 4
    def storage_offset(self): return 0
    def is_contiguous(self, memory_format=None): return True
    def is_neg(self): return False
    def is_conj(self): return False
    def is_complex(self): return False
    def untyped_storage(self): return canary.untyped_storage()
    def __len__(self): return n

class Sub(torch.Tensor):
    pass

class SubParam(torch.nn.Parameter):
    pass

impostors = {
    "duck": lambda: Duck(),
    "subclass": lambda: canary.as_subclass(Sub),
    "parameter subclass": lambda: SubParam(canary, requires_grad=False),
}
for name, make in impostors.items():
    for slot in range(4):
        bufs = four()
        before = [b.clone() for b in bufs]
        bufs[slot] = make()
        try:
            _core.adam_step([bufs[0]], [bufs[1]], [bufs[2]], [bufs[3]], [1], cfg)
            outcome = "accepted"
        except BaseException as e:
            outcome = type(e).__name__
        written = not torch.equal(canary, torch.zeros(n)) or any(
            not torch.equal(b, b0) for b, b0 in zip(bufs, before) if type(b) is torch.Tensor)
        print(name, slot, outcome, "written" if written else "untouched")
        canary.zero_()
print("END")
"""


def test_core_refuses_every_object_that_is_not_exactly_a_tensor_or_parameter():
    out = run_case(TYPE_ATTACK, timeout=60, prelude=False)
    lines = out.strip().splitlines()
    assert lines[0] == "control ok" and lines[-1] == "END", out
    for line in lines[1:-1]:
        assert line.endswith("TypeError untouched"), line


LOOKAHEAD_ATTACK = r"""
from rustadam import _core

# Long lists: while it reads one parameter, the plan hints the caches about the buffers of
# the parameters up to a dozen places further on, before it has checked their type. Objects
# of every size (some smaller than a tensor object) sit there; each must be refused by type
# when its turn comes, with nothing written.
n = 40
cfg = _core.Config(lr=0.1)
for bad in (None, 1, 2.5, True, "s", b"", object(), (), [], {}, torch.float32, torch.Size([3])):
    for pos in (0, 5, 20, 39):
        for slot in range(4):
            lists = [[torch.zeros(3) for _ in range(n)] for _ in range(4)]
            before = [[t.clone() for t in lst] for lst in lists]
            lists[slot][pos] = bad
            try:
                _core.plan([(cfg, *lists, None, None, [1] * n, [0] * n)], strict=True).execute(
                    num_threads=1)
                outcome = "accepted"
            except TypeError as e:
                named = f"s[{pos}] must be exactly" in str(e)
                outcome = "TypeError" if named else f"TypeError: {e}"
            except BaseException as e:
                outcome = exc_name(e)
            same = all(torch.equal(a, b) for lst, lb in zip(lists, before)
                       for a, b in zip(lst, lb) if type(a) is torch.Tensor)
            print(type(bad).__name__, pos, slot, outcome, "untouched" if same else "written")
print("END")
"""


def test_objects_ahead_in_long_lists_are_refused_by_type_when_reached():
    out = run_case(LOOKAHEAD_ATTACK, timeout=120)
    lines = out.strip().splitlines()
    assert lines[-1] == "END", out
    assert len(lines) == 12 * 4 * 4 + 1
    for line in lines[:-1]:
        assert line.endswith("TypeError untouched"), line


SHRINKING_LIST_ATTACK = r"""
from rustadam import Adam

# The one-call step walks a group's list with look-ahead; here the parameters' hash (Python
# code the state lookup runs when torch's identity hash is replaced) empties that list while
# it is walked. No crash, no exception left pending, and the interpreter carries on.
ps = [torch.nn.Parameter(torch.randn(4)) for _ in range(30)]
opt = Adam(ps, lr=0.1)
for p in ps:
    p.grad = torch.ones(4)
opt.step()  # the states exist: later steps take the one call
plist = opt.param_groups[0]["params"]
real = torch.Tensor.__hash__
def shrinking(t):
    if len(plist) > 3:
        del plist[3:]
    return real(t)
torch.Tensor.__hash__ = shrinking
try:
    opt.step()
    print("stepped", len(plist))
except Exception as e:
    print("raised", exc_name(e))
torch.Tensor.__hash__ = real
print(sum(range(10)), "END")
"""


def test_a_list_emptied_while_the_one_call_walks_it_is_not_a_crash():
    out = run_case(SHRINKING_LIST_ATTACK, timeout=60)
    lines = out.strip().splitlines()
    assert lines[-1] == "45 END", out
    assert lines[0] in ("stepped 3", "raised RuntimeError"), out


def test_torch_function_subclass_that_frees_a_checked_param_steps_like_torch():
    out = run_case(
        r"""
        from rustadam import Adam, WeightDecay
        VICTIM = []

        class Evil(torch.Tensor):
            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):
                # Replace the other parameter's data by a copy: its old storage is freed.
                for v in VICTIM:
                    v.data = v.data.clone()
                with torch._C.DisableTorchFunctionSubclass():
                    return func(*args, **(kwargs or {}))

        def run(make_opt, order):
            torch.manual_seed(0)
            victim = torch.nn.Parameter(torch.randn(1 << 20))   # 4 MiB: mmap'ed, unmapped on free
            evil = torch.randn(33).as_subclass(Evil)
            evil.requires_grad_(True)
            params = [victim, evil] if order == "victim first" else [evil, victim]
            opt = make_opt(params)
            results = []
            for s in range(3):
                torch.manual_seed(10 + s)
                victim.grad = torch.randn(victim.shape)
                evil.grad = torch.randn(33).as_subclass(Evil)
                VICTIM[:] = [victim]
                opt.step()
                VICTIM[:] = []
            return victim.detach().clone(), evil.detach().as_subclass(torch.Tensor).clone()

        for order in ("victim first", "evil first"):
            ref = run(lambda ps: torch.optim.Adam(ps, lr=0.1, eps=1e-8, foreach=False), order)
            for backend in ("auto", "torch"):
                got = run(lambda ps: Adam(ps, lr=0.1, eps=1e-8, optimized_update=False,
                                          weight_decay=WeightDecay(0), backend=backend), order)
                ok = all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(got, ref))
                print(order, backend, "equal" if ok else "DIFFERENT")
        print("END")
        """,
        timeout=90,
    )
    lines = out.strip().splitlines()
    assert lines[-1] == "END", out
    assert len(lines) == 5 and all(line.endswith(" equal") for line in lines[:-1]), out


# ---- all-or-nothing steps ----------------------------------------------------------------------


def three_groups(backend, wd=None):
    """g0: two dense params; g1: a dense param and a non-dense one (a slice); g2: one dense."""
    wd = WeightDecay(0.1) if wd is None else wd
    torch.manual_seed(0)
    base = torch.randn(40)
    a, b, e, d = torch.randn(4, 4), torch.randn(10), torch.randn(3, 3), torch.randn(6)
    c = base[::2]
    assert not c.is_contiguous()
    opt = Adam(
        [{"params": [a, b]}, {"params": [e, c]}, {"params": [d]}],
        lr=LR,
        weight_decay=wd,
        backend=backend,
    )
    params = [a, b, e, c, d]
    for seed in range(2):
        grads_for(params, seed)
        opt.step()
    grads_for(params, 2)
    return opt, params, c


BAD_STATES = {
    "exp_avg of the wrong shape": lambda opt, c: opt.state[c].__setitem__(
        "exp_avg", torch.zeros(c.numel() + 1)
    ),
    "exp_avg_sq is exp_avg": lambda opt, c: opt.state[c].__setitem__(
        "exp_avg_sq", opt.state[c]["exp_avg"]
    ),
    "float64 gradient": lambda opt, c: set_grad(c, c.grad.double()),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", list(BAD_STATES))
def test_a_bad_non_dense_param_refuses_the_whole_step(backend, bad):
    opt, params, c = three_groups(backend)
    BAD_STATES[bad](opt, c)
    snap = snapshot(opt)
    with pytest.raises(RuntimeError) as info:
        opt.step()
    assert "param_groups[1]['params'][1]" in str(info.value), str(info.value)
    assert_unchanged(opt, snap, bad)
    # The error is not sticky: fixed, the next step runs everywhere.
    if bad == "float64 gradient":
        c.grad = c.grad.float()
        opt.step()
        assert all(opt.state[p]["step"] == 3 for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["dense", "non-dense"])
def test_expanded_moment_in_a_state_dict_changes_nothing(backend, which):
    opt, params, c = three_groups(backend)
    target = params[2] if which == "dense" else c  # both in group 1
    sd = copy.deepcopy(opt.state_dict())
    pid = 2 if which == "dense" else 3
    sd["state"][pid]["exp_avg"] = torch.zeros(1).expand(target.shape)
    before = snapshot(opt)
    try:
        opt.load_state_dict(sd)
    except ValueError:
        assert_unchanged(opt, before, "load_state_dict refused")
        return
    snap = snapshot(opt)
    with pytest.raises((RuntimeError, ValueError)):
        opt.step()
    assert_unchanged(opt, snap, "step after loading an expanded exp_avg")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "view",
    [
        lambda shape: torch.zeros(1).expand(shape),
        # A window over one row: no stride is 0, yet elements share memory.
        lambda shape: torch.zeros(2 * shape[0]).as_strided(shape, (1,) * len(shape)),
    ],
    ids=["expanded", "windowed"],
)
def test_a_moment_whose_elements_share_memory_is_refused_at_load(backend, view):
    opt, params, _ = three_groups(backend)
    sd = copy.deepcopy(opt.state_dict())
    shape = tuple(params[2].shape)
    sd["state"][2]["exp_avg"] = view(shape)
    from rustadam import _core

    assert not _core.non_overlapping(shape, sd["state"][2]["exp_avg"].stride())
    before = snapshot(opt)
    with pytest.raises(ValueError, match="'exp_avg' with elements that share memory"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before, "load_state_dict refused")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alias", ["the same tensor", "the parameter", "a cast copy"])
def test_moments_sharing_memory_are_refused_at_load_unless_the_load_copies_them(backend, alias):
    opt, params, _ = three_groups(backend)
    sd = copy.deepcopy(opt.state_dict())
    e = params[2]
    if alias == "the same tensor":
        sd["state"][2]["exp_avg_sq"] = sd["state"][2]["exp_avg"]
    elif alias == "the parameter":
        sd["state"][2]["exp_avg"] = e.detach()
    else:  # float64 moments are cast to the parameter's float32: two tensors of their own
        sd["state"][2]["exp_avg_sq"] = sd["state"][2]["exp_avg"] = torch.zeros(e.shape).double()
    before = snapshot(opt)
    if alias == "a cast copy":
        opt.load_state_dict(sd)
        opt.step()  # steps: the load made them apart
        return
    with pytest.raises(ValueError, match="sharing memory with"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before, "load_state_dict refused")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr", [-0.1, math.nan])
def test_invalid_lr_on_a_later_group_refuses_the_step(backend, lr):
    opt, _params, _ = three_groups(backend)
    opt.param_groups[1]["lr"] = lr
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]|group 1") as info:
        opt.step()
    assert "learning rate" in str(info.value).lower() or "lr" in str(info.value), info.value
    assert_unchanged(opt, snap, f"lr={lr}")


# ---- overlapping parameters --------------------------------------------------------------------


def overlapping(kind):
    torch.manual_seed(0)
    base = torch.randn(24)
    if kind == "two strided views":
        views = lambda t: [t[0:12:2], t[4:16:2]]  # noqa: E731 (share elements 4, 6, 8, 10)
    elif kind == "dense then strided":
        views = lambda t: [t[0:8], t[4:20:2]]  # noqa: E731
    else:  # strided then dense
        views = lambda t: [t[1:21:3], t[5:15]]  # noqa: E731
    return base, views


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["two strided views", "dense then strided", "strided then dense"])
def test_overlapping_params_step_sequentially_in_index_order(backend, kind):
    base, views = overlapping(kind)
    b1, b2 = base.clone(), base.clone()
    p1, p2 = views(b1), views(b2)
    assert any(not p.is_contiguous() for p in p1)
    ours = Adam(p1, lr=LR, eps=1e-8, optimized_update=False, weight_decay=WeightDecay(0),
                backend=backend)  # fmt: skip
    ref = torch.optim.Adam(p2, lr=LR, eps=1e-8, weight_decay=0, foreach=False)
    for seed in range(4):
        grads_for(p1, seed)
        grads_for(p2, seed)
        ours.step()
        ref.step()
        assert_close(b1, b2, f"base after step {seed}")
    for p, q in zip(p1, p2):
        for k in ("exp_avg", "exp_avg_sq"):
            assert_close(ours.state[p][k], ref.state[q][k], k)


# ---- numpy: aliasing by memory, not by base object ---------------------------------------------


@pytest.mark.parametrize("pair", [(0, 2), (0, 3), (2, 3), (1, 0), (1, 2), (1, 3)])
@pytest.mark.parametrize("partial", [False, True])
def test_numpy_arrays_over_the_same_memory_without_a_common_base(pair, partial):
    names = ["param", "grad", "exp_avg", "exp_avg_sq"]
    buf = bytearray(8 * 24)
    arrays = [np.full(16, 0.5), np.full(16, 1.0), np.zeros(16), np.zeros(16)]
    x, y = pair
    arrays[x] = np.frombuffer(buf, dtype=np.float64, count=16, offset=0)
    arrays[y] = np.frombuffer(buf, dtype=np.float64, count=16, offset=8 * 8 if partial else 0)
    arrays[x][:] = arrays[y][:] = 0.25 if names[x] != "grad" else 1.0
    before = bytes(buf)
    with pytest.raises(ValueError) as info:
        rnp.adam_step(*arrays, 1, lr=0.1)
    assert bytes(buf) == before, "written before refusing"
    assert names[x] in str(info.value) or names[y] in str(info.value), info.value


# ---- autograd ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["rust", "auto"])
@pytest.mark.parametrize("n", [5, 100_000])
def test_step_bumps_the_version_counter_of_what_it_writes(backend, n):
    p = torch.nn.Parameter(torch.randn(n))
    opt = Adam([p], lr=LR, backend=backend)
    y = (p * p).sum()  # saves p for backward
    p.grad = torch.ones(n)
    version = p._version
    opt.step()
    assert p._version > version
    m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
    vm, vv = m._version, v._version
    p.grad = torch.ones(n)
    opt.step()
    assert m._version > vm and v._version > vv
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("backend", ["rust", "auto"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_every_written_tensor_of_a_long_step_is_bumped_exactly_once(backend, amsgrad):
    """Versions are bumped a chunk at a time: every tensor of many (not a multiple of the
    chunk), the last ones included, gets exactly one bump per step; gradients none."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(131)]
    opt = Adam(params, lr=LR, backend=backend, amsgrad=amsgrad)
    for p in params:
        p.grad = torch.ones(3)
    opt.step()

    def versions():
        out = []
        for p in params:
            state = opt.state[p]
            out.append(p._version)
            out += [state[k]._version for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
                    if k in state]  # fmt: skip
        return out

    before, grads = versions(), [p.grad._version for p in params]
    saved = (params[-1] * params[-1]).sum()
    opt.step()
    assert [b + 1 for b in before] == versions()
    assert grads == [p.grad._version for p in params]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


@pytest.mark.parametrize("bad", [1, None, "p"])
def test_execute_checks_what_it_will_bump_before_writing(bad):
    """Plan.execute(written=...) refuses a list it could not bump before anything is written,
    not after the step (which then half-recorded itself)."""
    from rustadam import _core

    p, g, m, v = torch.ones(4), torch.ones(4), torch.zeros(4), torch.zeros(4)
    plan = _core.plan([(_core.Config(), [p], [g], [m], [v], None, None, [1], [0])])
    state = {"step": 0}
    with pytest.raises(TypeError, match=r"written\[1\] must be a torch.Tensor"):
        plan.execute(num_threads=1, states=[state], steps=[1], written=[p, bad, m])
    assert torch.equal(p, torch.ones(4)) and state == {"step": 0} and p._version == 0


# ---- memory the optimizer no longer references -------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "rust"])
def test_states_of_a_removed_group_are_freed(backend):
    p, q = torch.randn(100), torch.randn(50, 2)
    opt = Adam([{"params": [p]}, {"params": [q]}], lr=LR, backend=backend)
    grads_for([p, q], 0)
    opt.step()
    refs = [weakref.ref(opt.state[q][k]) for k in ("exp_avg", "exp_avg_sq")]
    opt.param_groups.pop()
    opt.state.pop(q)
    grads_for([p], 1)
    opt.step()
    gc.collect()
    assert all(r() is None for r in refs), "a removed group's state is still alive"


@pytest.mark.parametrize("backend", ["auto", "rust"])
def test_states_replaced_by_load_state_dict_are_freed(backend):
    params = [torch.randn(100), torch.randn(30)[::3]]
    opt = Adam(params, lr=LR, backend=backend)
    for seed in range(2):
        grads_for(params, seed)
        opt.step()
    refs = [weakref.ref(opt.state[p][k]) for p in params for k in ("exp_avg", "exp_avg_sq")]
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    grads_for(params, 3)
    opt.step()
    gc.collect()
    assert all(r() is None for r in refs), "replaced states are still alive"


# ---- the torch path ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize(
    "decay",
    [
        (WeightDecay(0), 0.0, False),
        (WeightDecay(0.1, weight_decouple=False), 0.1, False),
        (WeightDecay(0.1), 0.1, True),
    ],
    ids=["none", "l2", "decoupled"],
)
def test_two_tensor_params_step_like_torch_adam(backend, decay):
    from torch.testing._internal.two_tensor import TwoTensor

    wd, lam, decoupled = decay

    def make():
        torch.manual_seed(0)
        x, y = torch.randn(4, 3), torch.randn(4, 3)
        return [torch.nn.Parameter(TwoTensor(x, y)), torch.nn.Parameter(torch.randn(5))]

    ours_p, ref_p = make(), make()
    ours = Adam(ours_p, lr=LR, eps=1e-8, optimized_update=False, weight_decay=wd, backend=backend)
    ref_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref = ref_cls(ref_p, lr=LR, eps=1e-8, weight_decay=lam, foreach=False)
    for seed in range(3):
        for ps in (ours_p, ref_p):
            torch.manual_seed(100 + seed)
            ga, gb = torch.randn(4, 3), torch.randn(4, 3)
            ps[0].grad = TwoTensor(ga, gb)
            ps[1].grad = torch.randn(5)
        ours.step()
        ref.step()
    assert type(ours_p[0]) is type(ref_p[0])
    assert_close(ours_p[0].a, ref_p[0].a, "a")
    assert_close(ours_p[0].b, ref_p[0].b, "b")
    assert_close(ours_p[1], ref_p[1], "plain")


class _Plain(torch.Tensor):
    """A trivial subclass: takes the torch path on backend="auto"."""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "subclass", "non-dense"])
def test_gradient_of_another_dtype_is_an_error_on_every_backend(backend, kind):
    if kind == "subclass" and backend == "rust":
        pytest.skip("backend='rust' refuses a subclass parameter whatever its gradient")
    torch.manual_seed(0)
    ok = torch.randn(8)
    if kind == "plain":
        bad = torch.randn(3, 4)
    elif kind == "subclass":
        bad = torch.randn(3, 4).as_subclass(_Plain)
    else:
        bad = torch.randn(3, 8)[:, ::2]
    opt = Adam([ok, bad], lr=LR, backend=backend)
    ok.grad = torch.randn(8)
    set_grad(bad, torch.randn(3, 4, dtype=torch.float64))
    snap = snapshot(opt)
    with pytest.raises(RuntimeError) as info:
        opt.step()
    assert "param_groups[0]['params'][1]" in str(info.value), info.value
    assert "PanicException" not in type(info.value).__name__
    assert_unchanged(opt, snap, kind)


def test_errors_name_the_parameter_by_its_name_when_the_group_has_param_names():
    w, b = torch.randn(4, 4), torch.randn(4)
    opt = Adam([("layer.weight", w), ("layer.bias", b)], lr=LR)
    assert opt.param_groups[0].get("param_names") == ["layer.weight", "layer.bias"]
    w.grad = torch.randn(4, 4)
    set_grad(b, torch.randn(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"layer\.bias"):
        opt.step()


@pytest.mark.parametrize("backend", ["auto", "rust"])
def test_a_torch_function_mode_cannot_answer_the_metadata_reads(backend):
    """An active TorchFunctionMode sees every Tensor method call unless torch function is
    disabled. One that says every storage_offset is 0 would make a view past its shrunk storage
    look inside it; the reads must not ask it, so the step is refused and nothing is written."""
    out = run_case(
        rf"""
        from torch.overrides import TorchFunctionMode
        from rustadam import Adam

        class Lying(TorchFunctionMode):
            asked = []
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                Lying.asked.append(name)
                if name == "storage_offset":
                    return 0
                return func(*args, **(kwargs or {{}}))

        base = torch.zeros(1 << 16)
        p = base[(1 << 16) - 1000:]            # the last 1,000 elements
        opt = Adam([p], lr=0.1, backend={backend!r})
        p.grad = torch.ones(1000)
        opt.step()
        base.untyped_storage().resize_(((1 << 16) - 500) * 4)   # p now reaches past its end
        guard = torch.randn(1 << 12)            # memory after the shrunk block, kept
        before = guard.clone()
        with Lying():
            try:
                opt.step()
                print("stepped")
            except RuntimeError as e:
                print("refused", "storage" in str(e))
        print("asked", sorted(set(n for n in Lying.asked
                                  if n in ("storage_offset", "untyped_storage", "is_neg"))))
        print("guard", torch.equal(guard, before), opt.state[p]["step"])
        """
    )
    lines = out.strip().splitlines()
    assert lines[0] == "refused True", out
    assert lines[1] == "asked []", out
    assert lines[2] == "guard True 1", out


def test_a_fake_tensor_passed_off_as_a_parameter_is_refused_by_name():
    # A fake tensor (meta storage, offset 500) whose class was set to nn.Parameter, with a
    # TorchDispatchMode answering its device as the CPU: the core took the storage's null
    # base plus the offset as an address and wrote there (segfault).
    out = run_case(
        r"""
        import warnings
        warnings.simplefilter("ignore")
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils._python_dispatch import TorchDispatchMode
        from rustadam import Adam

        class CpuDevice(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.prim.device.default:
                    return torch.device("cpu")
                return func(*args, **(kwargs or {}))

        for backend in ("auto", "rust"):
            with FakeTensorMode():
                x = torch.empty(1000)[500:504]
            x.__class__ = torch.nn.Parameter
            with CpuDevice():
                assert x.device == torch.device("cpu") and x.untyped_storage().data_ptr() == 0
                x.grad = torch.ones(4)
                opt = Adam([x], lr=0.1, backend=backend)
                m, v = torch.zeros(4), torch.zeros(4)
                opt.state[x] = {"step": 0, "exp_avg": m, "exp_avg_sq": v}
                try:
                    opt.step()
                    print(backend, "stepped")
                except RuntimeError as e:
                    print(backend, "refused:", str(e)[:90])
                assert opt.state[x]["step"] == 0 and not m.any() and not v.any()
        """
    )
    for backend in ("auto", "rust"):
        assert f"{backend} refused: param_groups[0]['params'][0]" in out, out


@pytest.mark.parametrize("backend", ["auto", "rust"])
def test_a_buffer_whose_storage_torch_cannot_read_is_refused_by_name(backend):
    # A wrapper tensor (a storage without memory, offset 500) whose class was set to
    # nn.Parameter, as an exp_avg: torch's own error reading its storage named nothing.
    class Wrapper(torch.Tensor):
        @staticmethod
        def __new__(cls):
            return torch.Tensor._make_wrapper_subclass(
                cls, (4,), strides=(1,), storage_offset=500, dtype=torch.float32, device="cpu"
            )

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            return NotImplemented

    w = Wrapper()
    w.__class__ = torch.nn.Parameter
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    opt = Adam([a, b], lr=0.1, backend=backend)
    a.grad, b.grad = torch.ones(3), torch.ones(4)
    opt.state[a] = {"step": 0, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
    opt.state[b] = {"step": 0, "exp_avg": w, "exp_avg_sq": torch.zeros(4)}
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\].*its exp_avg"):
        opt.step()
    assert not a.detach().any() and not opt.state[a]["exp_avg"].any()
    assert opt.state[a]["step"] == opt.state[b]["step"] == 0


def test_strides_answered_from_python_stay_inside_the_storage():
    # A tensor torch asks Python about (a strides policy, its class set to nn.Parameter)
    # answers with no mode active. A false stride is used as torch's ops use it, within the
    # storage; one that reaches past the storage is refused by name, nothing written.
    out = run_case(
        r"""
        from rustadam import Adam

        class S(torch.Tensor):
            @classmethod
            def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
                return NotImplemented

        def run(stride):
            base = torch.zeros(8, dtype=torch.float64)
            x = torch.Tensor._make_subclass(S, base[0:4], True,
                                            dispatch_sizes_strides_policy="strides")
            x.__class__ = torch.nn.Parameter

            def lie(cls, func, types, args=(), kwargs=None):
                name = str(func)
                if "sym_size" in name:
                    return [4]
                if "sym_stride" in name:
                    return [stride]
                if "sym_numel" in name:
                    return 4
                if "sym_storage_offset" in name:
                    return 0
                if any(k in name for k in ("is_contiguous", "strides_like", "non_overlapping")):
                    return stride == 1
                with torch._C._DisableTorchDispatch():
                    return func(*args, **(kwargs or {}))

            torch.nn.Parameter.__torch_dispatch__ = classmethod(lie)
            try:
                x.grad = torch.ones(4, dtype=torch.float64)
                opt = Adam([x], lr=0.1)
                opt.state[x] = {"step": 0, "exp_avg": torch.zeros(4, dtype=torch.float64),
                                "exp_avg_sq": torch.zeros(4, dtype=torch.float64)}
                try:
                    opt.step()
                    print(stride, "stepped", [i for i, v in enumerate(base.tolist()) if v])
                except RuntimeError as e:
                    print(stride, "refused:", str(e)[:60], "| written:", bool(base.any()))
            finally:
                del torch.nn.Parameter.__torch_dispatch__

        run(2)  # reaches base[6]: inside the storage of 8
        run(3)  # reaches base[9]: past it
        """
    )
    assert "2 stepped [0, 2, 4, 6]" in out, out
    assert "3 refused: param_groups[0]['params'][0]" in out and "written: False" in out, out
