"""The foreach path's checks and order: overlapping parameters step as torch's for-loop does,
and what torch's Adam refuses is refused before anything is written (``backend="foreach"``, and
``backend="auto"`` for what the core leaves to that path)."""

from __future__ import annotations

import pytest
import torch

from rustadam import Adam, WeightDecay
from rustadam._core import Config
from rustadam._foreach import check, foreach_adam


class Sub(torch.Tensor):
    """A plain subclass: ``backend="auto"`` sends it to the foreach path."""


def _cfg(**kw):
    base = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, weight_decouple=True,
                absolute=False, optimized_update=False, maximize=False, amsgrad=False,
                rounding="nearest")  # fmt: skip
    base.update(kw)
    return Config(**base)


def _rustadam(params, backend, **kw):
    return Adam(params, lr=0.1, eps=1e-8, optimized_update=False, weight_decay=WeightDecay(0),
                backend=backend, **kw)  # fmt: skip


def _grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)


# ---- overlapping parameters --------------------------------------------------------------------


def _views(base):
    return [base[0:12], base[6:18], base[20:24]]  # elements 6..11 shared; the third alone


@pytest.mark.parametrize("backend", ["foreach", "auto"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_overlapping_parameters_step_as_torchs_for_loop(backend, amsgrad):
    torch.manual_seed(0)
    base64 = torch.randn(24, dtype=torch.float64)
    base = base64.float()
    if backend == "auto":  # exact tensors go to the core; a subclass goes to the foreach path
        base = base.as_subclass(Sub)
    ref_base = base64.clone()
    ours, ref = _views(base), _views(ref_base)
    opt = _rustadam(ours, backend, amsgrad=amsgrad)
    oracle = torch.optim.Adam(ref, lr=0.1, eps=1e-8, amsgrad=amsgrad, foreach=False)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(4):
        _grads(ours, g1)
        _grads(ref, g2)
        opt.step()
        oracle.step()
    torch.testing.assert_close(base.as_subclass(torch.Tensor).double(), ref_base, rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    for p, q in zip(ours, ref):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                opt.state[p][key].as_subclass(torch.Tensor).double(), oracle.state[q][key],
                rtol=1e-5, atol=1e-8,
            )  # fmt: skip


@pytest.mark.parametrize("shared", ["other_param", "other_exp_avg"])
def test_an_exp_avg_viewing_another_parameters_memory_steps_in_order(shared):
    """State that aliases another parameter (or its moment) is read and written in turn."""
    torch.manual_seed(0)
    a64, b64 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    a, b = a64.float(), b64.float()
    opt = _rustadam([a, b], "foreach")
    oracle = torch.optim.Adam([a64, b64], lr=0.1, eps=1e-8, foreach=False)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for step in range(3):
        _grads([a, b], g1)
        _grads([a64, b64], g2)
        opt.step()
        oracle.step()
        if step == 0:
            for o, (x, y) in ((opt, (a, b)), (oracle, (a64, b64))):
                src = x if shared == "other_param" else o.state[x]["exp_avg"]
                o.state[y]["exp_avg"] = src.view(6)
    torch.testing.assert_close(a.double(), a64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.double(), b64, rtol=1e-5, atol=1e-6)


def test_check_steps_alone_only_parameters_that_meet_where_one_writes():
    base = torch.zeros(30)
    ps = [base[0:10], base[5:15], base[20:30], torch.zeros(4)]
    shared_grad = torch.ones(10)
    gs = [torch.ones(10), torch.ones(10), shared_grad, torch.ones(4)]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    assert check(ps, gs, ms, vs, None, None, [1] * 4, _cfg()) == [0, 1]
    # Gradients are only read: two parameters may share one.
    gs2 = [torch.ones(10), shared_grad, shared_grad, torch.ones(4)]
    assert check(ps[2:], gs2[2:], ms[2:], vs[2:], None, None, [1, 1], _cfg()) == []
    assert check([ps[2], ps[0]], [shared_grad, shared_grad], ms[:2], vs[:2], None, None, [1, 1],
                 _cfg()) == []  # fmt: skip


def test_a_gradient_that_is_another_parameter_steps_in_order():
    """Parameter 1's gradient is parameter 0: it sees parameter 0 after its update."""
    torch.manual_seed(0)
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    a2, b2 = a.clone(), b.clone()
    g = torch.randn(5, dtype=torch.float64)
    z = [torch.zeros(5, dtype=torch.float64) for _ in range(4)]
    foreach_adam([a, b], [g, a], z[0:2], z[2:4], None, None, [1, 1], [0, 0], _cfg())
    z = [torch.zeros(5, dtype=torch.float64) for _ in range(4)]
    foreach_adam([a2], [g], [z[0]], [z[2]], None, None, [1], [0], _cfg())
    foreach_adam([b2], [a2], [z[1]], [z[3]], None, None, [1], [0], _cfg())
    assert torch.equal(a, a2) and torch.equal(b, b2)


# ---- refusals: the documented error, and nothing changed ----------------------------------------


def _snapshot(opt):
    def copy(x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.device.type == "meta":
            return ("meta", tuple(x.shape), x.dtype)
        if x.layout != torch.strided:
            return ("sparse", x.to_dense().clone())
        return x.as_subclass(torch.Tensor).resolve_conj().clone()

    params = [copy(p) for g in opt.param_groups for p in g["params"]]
    states = [{k: copy(v) for k, v in opt.state[p].items()} for g in opt.param_groups
              for p in g["params"]]  # fmt: skip
    return params, states


def _same(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _refused(opt, match):
    before = _snapshot(opt)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert _same(before, _snapshot(opt)), "a refused step changed something"


def _stepped_once(params, backend, **kw):
    opt = _rustadam(params, backend, **kw)
    gen = torch.Generator().manual_seed(5)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
    opt.step()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
    return opt


@pytest.mark.parametrize("backend", ["foreach", "auto"])
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_a_conjugate_view_moment_is_refused_not_dropped(backend, key):
    # The conjugate view of a complex parameter's moment would be written through a copy.
    torch.manual_seed(0)
    z = torch.randn(4, dtype=torch.complex64)
    # With "auto" the core would step (and write) the others before the foreach path runs.
    opt = _stepped_once([torch.randn(3), z] if backend == "foreach" else [z], backend)
    opt.state[z][key] = opt.state[z][key].conj()
    _refused(opt, rf"its {key} is a conjugate view \(is_conj\(\) is set\)")
    with pytest.raises(RuntimeError, match="view_as_real doesn't work on unresolved conj"):
        ref = torch.randn(4, dtype=torch.complex64)
        o = torch.optim.Adam([ref], foreach=False)
        ref.grad = torch.ones_like(ref)
        o.step()
        o.state[ref][key] = o.state[ref][key].conj()
        o.step()


def _float8():
    return getattr(torch, "float8_e4m3fn", torch.float16)


@pytest.mark.parametrize("backend", ["foreach", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int32, torch.bool, "float8"])
def test_a_moment_of_another_dtype_is_refused(backend, dtype):
    dtype = _float8() if dtype == "float8" else dtype
    torch.manual_seed(0)
    a, b = torch.randn(3), torch.randn(5)
    # With "auto" the core would step (and write) a before the foreach path runs.
    opt = _stepped_once([a, b] if backend == "foreach" else [b], backend)
    opt.state[b]["exp_avg"] = opt.state[b]["exp_avg"].to(dtype)
    _refused(opt, "its exp_avg has another dtype than it")


@pytest.mark.parametrize("backend", ["foreach", "auto", "torch"])
@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"])
def test_a_parameter_without_arithmetic_is_refused_before_any_write(backend, name):
    # torch has no arithmetic for float8: its ops fail part way through a step, so after the
    # other parameters (here in an earlier group) were written.
    dtype = getattr(torch, name, None)
    if dtype is None:
        pytest.skip(f"this torch has no {name}")
    a, b = torch.randn(4, 3), torch.randn(5)
    opt = _stepped_once([a, b], backend)
    p = torch.ones(3).to(dtype)
    p.grad = torch.ones(3).to(dtype)
    opt.add_param_group({"params": [p]})
    _refused(opt, rf"param_groups\[1\]\['params'\]\[0\].*its dtype is {dtype}; Adam steps")


@pytest.mark.parametrize("backend", ["foreach", "auto"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_parameters_are_refused(backend, dtype):
    p = torch.tensor([10, 20, 30]).to(dtype)
    p.grad = torch.tensor([1, 0, 5]).to(dtype)
    opt = _rustadam([p], backend)
    with pytest.raises(RuntimeError, match=rf"its dtype is {dtype}; Adam steps float16, bfloat16"):
        opt.step()
    assert torch.equal(p, torch.tensor([10, 20, 30]).to(dtype)) and not opt.state[p]


BAD_STATE = {
    "exp_avg on meta": lambda s, p: s.__setitem__("exp_avg", torch.zeros(p.shape, device="meta",
                                                                         dtype=p.dtype)),
    "exp_avg sparse": lambda s, p: s.__setitem__("exp_avg", torch.zeros(p.shape, dtype=p.dtype)
                                                 .to_sparse()),
    "exp_avg None": lambda s, p: s.__setitem__("exp_avg", None),
    "exp_avg_sq expanded": lambda s, p: s.__setitem__(
        "exp_avg_sq", torch.zeros(1, dtype=p.dtype).expand(p.shape)),
}  # fmt: skip
BAD_WHY = {
    "exp_avg on meta": "its exp_avg is on device meta, the parameter on cpu",
    "exp_avg sparse": "its exp_avg's layout is torch.sparse_coo, not torch.strided",
    # (the optimizer finds it missing before the path does)
    "exp_avg None": "its state has no 'exp_avg' tensor",
    "exp_avg_sq expanded": "its exp_avg_sq has elements that share memory",
}


@pytest.mark.parametrize("backend", ["foreach", "auto"])
@pytest.mark.parametrize("case", sorted(BAD_STATE))
def test_a_bad_state_of_a_later_parameter_changes_nothing(backend, case):
    """The foreach path steps by device and dtype; the first ones must not be written before a
    later parameter is refused."""
    torch.manual_seed(0)
    ps = [torch.randn(3), torch.randn(4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    if backend == "auto":
        ps = [p.as_subclass(Sub) for p in ps]
    opt = _stepped_once(ps, backend)
    BAD_STATE[case](opt.state[ps[2]], ps[2])
    _refused(opt, BAD_WHY[case])


@pytest.mark.parametrize("backend", ["foreach", "auto"])
@pytest.mark.parametrize("case", ["None", "expanded", "float32"])
def test_a_bad_kahan_compensation_of_a_later_parameter_changes_nothing(backend, case):
    torch.manual_seed(0)
    ps = [torch.randn(6), torch.randn(6, dtype=torch.bfloat16), torch.randn(10).bfloat16()]
    if backend == "auto":
        ps = [p.as_subclass(Sub) for p in ps]
    opt = _stepped_once(ps, backend, rounding="kahan")
    state = opt.state[ps[2]]
    if case == "None":
        state["compensation"] = None
        why = "rounding='kahan' needs a compensation buffer for a 16-bit parameter"
    elif case == "expanded":
        state["compensation"] = torch.zeros(1, dtype=torch.bfloat16).expand(10)
        why = "its compensation has elements that share memory"
    else:
        state["compensation"] = state["compensation"].float()
        why = "its compensation has another dtype than it"
    _refused(opt, why)


def test_a_missing_kahan_compensation_is_refused_as_the_core_refuses_it():
    messages = {}
    for backend in ("auto", "foreach"):  # an exact CPU tensor: the core, then the foreach path
        p = torch.randn(3).bfloat16()
        opt = _stepped_once([p], backend)
        opt.param_groups[0]["rounding"] = "kahan"  # the state has no compensation
        before = _snapshot(opt)
        with pytest.raises(RuntimeError) as e:
            opt.step()
        assert _same(before, _snapshot(opt))
        messages[backend] = str(e.value).split(": ", 1)[1]
    assert messages["foreach"] == messages["auto"]
    assert messages["auto"] == "rounding='kahan' needs a compensation buffer for a 16-bit parameter"


def test_direct_calls_name_the_list_position_or_the_given_label():
    ps = [torch.zeros(3), torch.zeros(3)]
    gs = [torch.ones(3), torch.ones(3)]
    ms = [torch.zeros(3), torch.zeros(3, dtype=torch.float64)]
    vs = [torch.zeros(3), torch.zeros(3)]
    args = (ps, gs, ms, vs, None, None, [1, 1], [0, 0], _cfg())
    with pytest.raises(RuntimeError, match=r"^params\[1\]: its exp_avg has another dtype"):
        foreach_adam(*args)
    with pytest.raises(RuntimeError, match=r"^weight 'w1': its exp_avg has another dtype"):
        foreach_adam(*args, label=lambda i: f"weight 'w{i}'")
    assert all(not p.any() for p in ps) and not ms[0].any()


# ---- a plain parameter with a subclass gradient or moment ---------------------------------------


@pytest.mark.parametrize("role", ["grad", "exp_avg"])
def test_a_subclass_gradient_or_moment_goes_to_torchs_ops(role):
    """The core takes exact tensors only: a plain parameter whose gradient or moment is a
    subclass is stepped with torch's ops (as torch.optim.Adam steps it), with the same numbers
    as an all-plain twin; backend="rust" names it (by its name, past a parameter without a
    gradient) and changes nothing."""
    gen = torch.Generator().manual_seed(5)
    values = [torch.randn(4, generator=gen) for _ in range(3)]

    def make(backend):
        ps = [torch.nn.Parameter(v.clone()) for v in values]
        groups = [
            {"params": ps[:1], "param_names": ["w0"]},
            {"params": ps[1:], "param_names": ["first", "second"]},
        ]
        return ps, _rustadam(groups, backend)

    ps, opt = make("auto")
    twin, twin_opt = make("auto")
    for step in range(3):
        grads = [torch.randn(4, generator=gen) for _ in range(3)]
        for q, g in zip(twin, grads):
            q.grad = g.clone()
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        if step:  # the state exists from the first step on
            twin[1].grad = ps[1].grad = None  # 'first' sits this one out
            if role == "grad":
                ps[2].grad = ps[2].grad.as_subclass(Sub)
            else:
                state = opt.state[ps[2]]
                state["exp_avg"] = state["exp_avg"].as_subclass(Sub)
        opt.step()
        twin_opt.step()
        for p, q in zip(ps, twin):
            assert torch.equal(p.detach(), q.detach())

    strict, strict_opt = make("rust")
    for p in strict:
        p.grad = torch.ones(4)
    strict_opt.step()
    strict[1].grad = None
    if role == "grad":
        strict[2].grad = torch.ones(4).as_subclass(Sub)
    else:
        state = strict_opt.state[strict[2]]
        state["exp_avg"] = state["exp_avg"].as_subclass(Sub)
    before = [p.detach().clone() for p in strict]
    with pytest.raises(RuntimeError, match=rf"'second'.*its {role} is a Sub"):
        strict_opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(strict, before))
    assert [s["step"] for s in strict_opt.state.values()] == [1, 1, 1]


# ---- a step mixing the core and torch's ops is all or nothing ----------------------------------


class NoForeach(torch.Tensor):
    """Takes torch's single-tensor ops but raises on ``torch._foreach_*`` (after the checks)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "").startswith("_foreach"):
            raise NotImplementedError(f"NoForeach: no {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scale"])
@pytest.mark.parametrize("first", [False, True], ids=["state", "first-step"])
def test_an_error_of_torchs_ops_leaves_the_cores_parameters_too(scaled, first):
    """The core's parameters, moments, step counts and (with GradScaler's scale) gradients stay
    as they were when the foreach ops of another parameter of the step raise."""
    ps = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]
    opt = _rustadam(ps, "auto")
    if not first:
        for p in ps:
            p.grad = torch.ones(3)
        opt.step()
    for p in ps:
        p.grad = torch.full((3,), 8.0)
    ps[1].grad = ps[1].grad.as_subclass(NoForeach)
    if scaled:
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    before = [(p.detach().clone(), p.grad.clone(), p.grad._version) for p in ps]
    states = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
              for p, s in opt.state.items()}  # fmt: skip
    with pytest.raises(NotImplementedError, match="NoForeach"):
        opt.step()
    for p, (value, grad, version) in zip(ps, before):
        assert torch.equal(p.detach(), value) and torch.equal(p.grad, grad)
        assert p.grad._version == version
    assert opt.state.keys() == states.keys()
    for p, s in states.items():
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v


def test_a_wrapper_sharing_a_core_parameters_memory_is_refused():
    """A wrapper subclass has no storage of its own: the tensors it wraps are compared with the
    core's. One of them aliasing a plain parameter cannot be stepped in the parameters' order
    (the paths write after the core): refused by name, nothing changed."""
    from torch.testing._internal.two_tensor import TwoTensor

    base = torch.randn(4)
    p = torch.nn.Parameter(base)
    q = torch.nn.Parameter(TwoTensor(base.detach(), torch.randn(4)))
    p.grad, q.grad = torch.ones(4), TwoTensor(torch.ones(4), torch.ones(4))
    opt = _rustadam([p, q], "auto")
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=r"\['params'\]\[1\].*shares memory with .*\[0\]"):
        opt.step()
    assert torch.equal(p.detach(), before) and len(opt.state) == 0


def test_a_gradient_read_by_the_core_and_by_torchs_ops_is_taken():
    """Only reading shares nothing that could be ordered: a gradient whose memory both a core
    parameter and a subclass one read steps both, as with gradients of their own."""
    g = torch.tensor([1.0, 2.0, 3.0])
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    a.grad, b.grad = g, g.as_subclass(Sub)
    _rustadam([a, b], "auto").step()
    c, d = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    c.grad, d.grad = g.clone(), g.clone()
    _rustadam([c, d], "auto").step()
    assert torch.equal(a.detach(), c.detach()) and torch.equal(b.detach(), d.detach())
    assert torch.equal(g, torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("backend", ["foreach", "auto"])
def test_overlapping_parameters_of_two_groups_step_in_order(backend):
    """torch's ops compute a group's results before writing them: parameters meeting one of
    another group are stepped alone, after the groups before were written (the loop's order)."""

    def run(backend, sub):
        st = torch.arange(1.0, 9.0)
        a, b = st[0:6], st[2:8]
        if sub:
            a, b = a.as_subclass(Sub), b.as_subclass(Sub)
        pa, pb = torch.nn.Parameter(a), torch.nn.Parameter(b)
        opt = _rustadam([{"params": [pa]}, {"params": [pb], "lr": 0.05}], backend)
        for _ in range(2):
            pa.grad, pb.grad = torch.ones(6), -0.5 * torch.ones(6)
            opt.step()
        return st

    assert torch.equal(run(backend, sub=backend == "auto"), run("torch", sub=False))


def test_a_parameter_aliasing_a_core_parameter_through_another_storage_is_refused():
    """Memory is compared by address: two storages over one numpy array share it."""
    import numpy as np

    arr = np.arange(1.0, 9.0, dtype=np.float32)
    a = torch.nn.Parameter(torch.from_numpy(arr[0:6]))
    b = torch.nn.Parameter(torch.from_numpy(arr[2:8]).as_subclass(Sub))
    a.grad, b.grad = torch.ones(6), torch.ones(6)
    before = arr.copy()
    with pytest.raises(RuntimeError, match=r"\['params'\]\[1\].*shares memory with .*\[0\]"):
        _rustadam([a, b], "auto").step()
    assert (arr == before).all()


class Opaque(torch.Tensor):
    """A wrapper subclass that does not say what it wraps (no ``__tensor_flatten__``)."""

    @staticmethod
    def __new__(cls, elem):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype)
        r.elem = elem
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map

        def unwrap(x):
            return x.elem if isinstance(x, Opaque) else x

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        if func._schema.is_mutable:
            return None if func.__name__.startswith("_foreach") else args[0]

        def wrap(x):
            return Opaque(x) if isinstance(x, torch.Tensor) else x

        return tree_map(wrap, out)


@pytest.mark.parametrize("wrapper_first", [False, True])
def test_a_wrapper_whose_memory_cannot_be_seen_steps_in_the_loops_order(wrapper_first):
    """Nothing can tell what it aliases: the step takes the loop's order, one parameter at a
    time, so that wrapping a core parameter listed before or after it gives torch's result."""

    def run(backend):
        a = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        w = torch.nn.Parameter(Opaque(a.data))
        opt = _rustadam([w, a] if wrapper_first else [a, w], backend)
        for _ in range(2):
            a.grad = torch.tensor([1.0, -1.0, 0.5])
            w.grad = Opaque(torch.tensor([0.3, 0.2, -2.0]))
            opt.step()
        return a.detach().clone()

    assert torch.equal(run("auto"), run("torch"))
    assert torch.equal(run("foreach"), run("torch"))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("backend", ["auto", "foreach"])
def test_wrappers_sharing_what_they_wrap_step_in_order(groups, backend):
    """Two wrapper subclasses wrapping one tensor overlap through it, in one group or two."""
    from torch.testing._internal.two_tensor import TwoTensor

    def run(backend):
        x = torch.tensor([1.0, 2.0, 3.0])
        p = torch.nn.Parameter(TwoTensor(x, torch.zeros(3)))
        q = torch.nn.Parameter(TwoTensor(x, torch.ones(3)))
        spec = [{"params": [p, q]}] if groups == 1 else [{"params": [p]}, {"params": [q]}]
        opt = Adam(spec, lr=0.1, eps=1e-8, weight_decay=WeightDecay(0.5), backend=backend)
        for _ in range(2):
            p.grad = TwoTensor(torch.ones(3), torch.ones(3))
            q.grad = TwoTensor(-torch.ones(3), torch.ones(3))
            opt.step()
        return x

    assert torch.equal(run(backend), run("torch"))


class Flat(torch.Tensor):
    """A subclass with memory of its own that says it wraps nothing."""

    def __tensor_flatten__(self):
        return [], None


def test_a_subclass_saying_it_wraps_nothing_still_shows_its_own_memory():
    x = torch.tensor([1.0, 2.0, 3.0])
    a, f = torch.nn.Parameter(x), torch.nn.Parameter(x.as_subclass(Flat))
    a.grad, f.grad = torch.ones(3), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"shares memory with"):
        _rustadam([{"params": [a]}, {"params": [f]}], "auto").step()
    assert torch.equal(x, torch.tensor([1.0, 2.0, 3.0]))


def test_a_parameter_the_core_leaves_to_torchs_ops_is_bumped_once():
    """Its tensors are bumped by torch's ops that write them, not by the core's record too."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = _rustadam([a, b], "auto")

    def grads():
        a.grad = torch.ones(3)
        b.grad = torch._neg_view(torch.ones(3))  # the core leaves a negative view to torch

    grads()
    opt.step()
    tensors = [a, b, *(opt.state[p][k] for p in (a, b) for k in ("exp_avg", "exp_avg_sq"))]
    before = [t._version for t in tensors]
    grads()
    opt.step()
    assert [t._version - v for t, v in zip(tensors, before)] == [1] * 6
