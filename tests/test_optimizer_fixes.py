"""The per-parameter path, the step-hook wrapper, group values and state dicts: each test checks
against torch.optim.Adam/AdamW, the Rust core's path, or a refusal that changes nothing."""

from __future__ import annotations

import functools
import io
import math
import warnings
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

from rustadam import Adam, WeightDecay


class Warmup(Adam):
    """A subclass that overrides a per-parameter method (so it takes the per-parameter path)
    without changing the math."""

    def get_lr(self, state: dict[str, Any], group: dict[str, Any]) -> float:
        return group["lr"]


def torch_path(params: Any, **kwargs: Any) -> Adam:
    return Adam(params, backend="torch", **kwargs)


def subclass_path(params: Any, **kwargs: Any) -> Adam:
    return Warmup(params, **kwargs)


PER_PARAM = {"torch": torch_path, "subclass": subclass_path}


def snapshot(opt: Adam) -> list[Any]:
    """Every parameter, every state entry (object and value) and every step count."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            entries = {}
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    dense = value.layout is torch.strided and value.device.type != "meta"
                    entries[key] = (value, value.clone() if dense else None)
                else:
                    entries[key] = (value, None)
            out.append((p, p.detach().clone(), entries))
    return out


def assert_unchanged(opt: Adam, before: list[Any]) -> None:
    now = snapshot(opt)
    assert len(now) == len(before)
    for (p, value, entries), (p2, value2, entries2) in zip(before, now):
        assert p is p2 and torch.equal(value, value2)
        assert entries.keys() == entries2.keys()
        for key, (obj, copy) in entries.items():
            obj2, copy2 = entries2[key]
            if isinstance(obj, torch.Tensor):
                assert obj2 is obj, key
                if copy is not None:
                    assert torch.equal(copy, copy2), key
            else:
                assert obj2 is obj or (type(obj2) is type(obj) is int and obj2 == obj), key


# ---- autograd sees the per-parameter path's writes --------------------------------------------


@pytest.mark.parametrize("path", PER_PARAM)
def test_per_param_path_bumps_versions_so_a_stale_backward_fails_as_with_torch(path: str) -> None:
    def stale_backward(make: Callable[[list[torch.Tensor]], Any]) -> bool:
        p = torch.randn(5, requires_grad=True)
        opt = make([p])
        y = (p * p).sum()
        y.backward(retain_graph=True)
        opt.step()
        try:
            y.backward()
        except RuntimeError as e:
            assert "modified by an inplace operation" in str(e)
            return True
        return False

    assert stale_backward(lambda ps: torch.optim.Adam(ps, lr=0.1))  # torch's behaviour
    assert stale_backward(lambda ps: PER_PARAM[path](ps, lr=0.1))


@pytest.mark.parametrize("path", PER_PARAM)
def test_per_param_path_bumps_every_state_tensor_it_writes(path: str) -> None:
    p = torch.randn(4, dtype=torch.bfloat16)
    opt = PER_PARAM[path]([p], lr=0.1, amsgrad=True, rounding="kahan")
    p.grad = torch.randn(4, dtype=torch.bfloat16)
    opt.step()
    state = opt.state[p]
    versions = {k: v._version for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert set(versions) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "compensation"}
    v0 = p._version
    opt.step()
    assert p._version > v0
    assert all(state[k]._version > v for k, v in versions.items())


# ---- a tensor step count -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "foreach", "subclass"])
def test_tensor_step_counts_as_the_core_counts_it(backend: str) -> None:
    def run(make: Callable[..., Adam], tensor_step: bool) -> tuple[torch.Tensor, Any]:
        p = torch.ones(4)
        opt = make([p], lr=0.1)
        p.grad = torch.arange(4.0)
        opt.step()
        if tensor_step:
            opt.state[p]["step"] = torch.tensor(1.0)  # torch.optim.Adam's format
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(20):
                p.grad = torch.arange(4.0)
                opt.step()
        return p, opt.state[p]["step"]

    core, core_step = run(lambda ps, **k: Adam(ps, backend="auto", **k), False)
    if backend == "subclass":
        make = subclass_path
    else:
        make = functools.partial(Adam, backend=backend)
    ours, step = run(make, True)
    assert core_step == 21 and type(step) is int and step == 21
    assert torch.equal(ours, core)


# ---- all or nothing on the per-parameter path ---------------------------------------------------


def _bad_states() -> dict[str, Callable[[dict[str, Any], torch.Tensor], Any]]:
    return {
        "exp_avg on meta": lambda s, p: s.__setitem__("exp_avg", torch.zeros(5, device="meta")),
        "exp_avg sparse": lambda s, p: s.__setitem__("exp_avg", torch.zeros(5).to_sparse()),
        "exp_avg None": lambda s, p: s.__setitem__("exp_avg", None),
        "exp_avg numpy": lambda s, p: s.__setitem__("exp_avg", np.zeros(5, np.float32)),
        "exp_avg missing": lambda s, p: s.pop("exp_avg"),
        "exp_avg float64": lambda s, p: s.__setitem__(
            "exp_avg", torch.zeros(5, dtype=torch.float64)
        ),
        "exp_avg expanded": lambda s, p: s.__setitem__("exp_avg", torch.zeros(1).expand(5)),
        "exp_avg_sq is exp_avg": lambda s, p: s.__setitem__("exp_avg_sq", s["exp_avg"]),
        "step missing": lambda s, p: s.pop("step"),
        "step of 2 elements": lambda s, p: s.__setitem__("step", torch.tensor([1.0, 2.0])),
        "step on meta": lambda s, p: s.__setitem__("step", torch.tensor(1.0, device="meta")),
        "step 1.5": lambda s, p: s.__setitem__("step", torch.tensor(1.5)),
    }


REASONS = {
    "exp_avg on meta": "meta",
    "exp_avg sparse": "sparse",
    "exp_avg None": "no 'exp_avg' tensor",
    "exp_avg numpy": "ndarray",
    "exp_avg missing": "no 'exp_avg' tensor",
    "exp_avg float64": "dtype",
    "exp_avg expanded": "share memory",
    "exp_avg_sq is exp_avg": "shares memory",
    "step missing": "no 'step'",
    "step of 2 elements": "step=",
    "step on meta": "step=",
    "step 1.5": "step=",
}


@pytest.mark.parametrize("path", PER_PARAM)
@pytest.mark.parametrize("case", list(_bad_states()))
def test_a_bad_later_state_is_refused_before_anything_changes(path: str, case: str) -> None:
    torch.manual_seed(0)
    a, b, c = torch.randn(3), torch.randn(3), torch.randn(5)
    opt = PER_PARAM[path]([{"params": [("a", a)]}, {"params": [("b", b), ("c", c)]}], lr=0.1)
    for t in (a, b, c):
        t.grad = torch.randn(t.shape)
    opt.step()
    for t in (a, b, c):
        t.grad = torch.randn(t.shape)
    _bad_states()[case](opt.state[c], c)
    before = snapshot(opt)
    with pytest.raises(RuntimeError) as info:
        opt.step()
    message = str(info.value)
    assert "parameter 'c' (param_groups[1]['params'][1])" in message, message
    assert REASONS[case] in message, message
    assert_unchanged(opt, before)


@pytest.mark.parametrize("path", PER_PARAM)
def test_a_later_state_that_is_not_a_dict_is_refused_by_name(path: str) -> None:
    a, b, c = torch.randn(3), torch.randn(3), torch.randn(5)
    opt = PER_PARAM[path]([{"params": [("a", a)]}, {"params": [("b", b), ("c", c)]}], lr=0.1)
    for t in (a, b, c):
        t.grad = torch.randn(t.shape)
    opt.step()
    before = snapshot(opt)
    saved, opt.state[c] = opt.state[c], 5
    with pytest.raises(RuntimeError, match=r"parameter 'c' .*its state is a int, not a dict"):
        opt.step()
    assert opt.state[c] == 5
    opt.state[c] = saved
    assert_unchanged(opt, before)


@pytest.mark.parametrize("path", [*PER_PARAM, "rust"])
def test_amsgrad_turned_on_later_is_refused_on_every_path_alike(path: str) -> None:
    def make(params: Any, **kwargs: Any) -> Adam:
        if path == "rust":
            return Adam(params, backend="rust", **kwargs)
        return PER_PARAM[path](params, **kwargs)

    a, b = torch.randn(3), torch.randn(4)
    opt = make([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(4)
    opt.step()
    opt.param_groups[0]["amsgrad"] = True
    opt.state[a]["max_exp_avg_sq"] = torch.zeros(3)  # only the later one lacks it
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"\['params'\]\[1\].*no 'max_exp_avg_sq' tensor"):
        opt.step()
    assert_unchanged(opt, before)


KAHAN = {
    "compensation missing": lambda s, p: s.pop("compensation"),
    "compensation None": lambda s, p: s.__setitem__("compensation", None),
    "compensation expanded": lambda s, p: s.__setitem__(
        "compensation", torch.zeros(1, dtype=torch.bfloat16).expand(10)
    ),
    "compensation is exp_avg": lambda s, p: s.__setitem__("compensation", s["exp_avg"]),
    "compensation is the param": lambda s, p: s.__setitem__("compensation", p.data),
}


@pytest.mark.parametrize("path", [*PER_PARAM, "auto"])
@pytest.mark.parametrize("case", list(KAHAN))
def test_a_bad_kahan_compensation_is_refused_as_on_the_core(path: str, case: str) -> None:
    def make(params: Any, **kwargs: Any) -> Adam:
        if path == "auto":
            return Adam(params, **kwargs)
        return PER_PARAM[path](params, **kwargs)

    torch.manual_seed(0)
    a, b = torch.randn(6, dtype=torch.bfloat16), torch.randn(10, dtype=torch.bfloat16)
    opt = make([{"params": [a]}, {"params": [b]}], lr=0.1, rounding="kahan")
    for t in (a, b):
        t.grad = torch.randn(t.shape, dtype=t.dtype)
    opt.step()
    for t in (a, b):
        t.grad = torch.randn(t.shape, dtype=t.dtype)
    KAHAN[case](opt.state[b], b)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[0\]"):
        opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("path", [*PER_PARAM, "auto"])
def test_kahan_set_on_a_group_later_is_refused_as_on_the_core(path: str) -> None:
    p = torch.randn(3).bfloat16()
    opt = Adam([p], lr=0.1) if path == "auto" else PER_PARAM[path]([p], lr=0.1)
    p.grad = torch.ones(3).bfloat16()
    opt.step()
    opt.param_groups[0]["rounding"] = "kahan"
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="rounding='kahan' needs a compensation buffer"):
        opt.step()
    assert_unchanged(opt, before)


def test_kahan_in_adam_update_without_compensation_is_refused() -> None:
    class OwnState(Adam):  # keeps no compensation buffer
        def init_state(self, state: dict[str, Any], group: dict[str, Any], param: Any) -> None:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)

    p = torch.randn(3).bfloat16()
    p.grad = torch.ones(3).bfloat16()
    opt = OwnState([p], lr=0.1, rounding="kahan")
    with pytest.raises(RuntimeError, match="needs a compensation buffer"):
        opt.step()
    assert opt.state[p] == {}  # a first step that failed leaves no state


# ---- partial states on the fast paths are refused by name ---------------------------------------


@pytest.mark.parametrize("backend", ["auto", "rust", "foreach", "torch"])
@pytest.mark.parametrize(
    "case",
    ["exp_avg None", "exp_avg numpy", "exp_avg missing", "step missing", "step of 2 elements"],
)
def test_partial_state_is_refused_naming_the_parameter(backend: str, case: str) -> None:
    a, b, c = torch.randn(3), torch.randn(3), torch.randn(5)
    opt = Adam([("w0", a), ("w1", b), ("w2", c)], lr=0.1, backend=backend)
    for t in (a, b, c):
        t.grad = torch.randn(t.shape)
    opt.step()
    a.grad = None  # positions, not the list of parameters with gradients, name it
    _bad_states()[case](opt.state[c], c)
    before = snapshot(opt)
    with pytest.raises(RuntimeError) as info:
        opt.step()
    assert "parameter 'w2' (param_groups[0]['params'][2])" in str(info.value)
    assert REASONS[case] in str(info.value)
    assert_unchanged(opt, before)


def test_a_state_with_only_exp_avg_is_refused_by_name() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    opt = Adam([("w", p)], lr=0.1)
    opt.state[p]["exp_avg"] = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"parameter 'w'.*no 'exp_avg_sq' tensor"):
        opt.step()


# ---- step hooks with functools.wraps -------------------------------------------------------------


def _hook_calls(opt: Any, p: torch.Tensor) -> list[str]:
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    for _ in range(2):
        p.grad = torch.ones(3)
        opt.step()
    return calls


def test_hooks_run_when_a_subclass_wraps_step_with_functools_wraps() -> None:
    class TorchSub(torch.optim.Adam):
        @functools.wraps(torch.optim.Adam.step)
        def step(self, closure: Any = None) -> Any:
            return super().step(closure)

    class Sub(Adam):
        @functools.wraps(Adam.step)
        def step(self, closure: Any = None) -> Any:
            return super().step(closure)

    expected = _hook_calls(TorchSub([p := torch.randn(3)], lr=0.1), p)
    assert expected.count("pre") == 2 and expected.count("post") == 2
    assert _hook_calls(Sub([q := torch.randn(3)], lr=0.1), q) == ["pre", "post"] * 2


@pytest.mark.parametrize("wrap", [True, False])
def test_hooks_run_once_when_the_class_step_is_patched(wrap: bool) -> None:
    orig = Adam.step

    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        return orig(self, *args, **kwargs)

    if wrap:
        patched = functools.wraps(orig)(patched)
    Adam.step = patched
    try:
        before = Adam([p := torch.randn(3)], lr=0.1)
        assert _hook_calls(before, p) == ["pre", "post"] * 2
    finally:
        Adam.step = orig
    assert _hook_calls(Adam([q := torch.randn(3)], lr=0.1), q) == ["pre", "post"] * 2


# ---- numpy scalars and tensors as weight decay ---------------------------------------------------


@pytest.mark.parametrize("wd", [np.float32(0.01), np.int64(1), torch.tensor(0.01)])
@pytest.mark.parametrize("where", ["constructor", "group"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_numpy_and_tensor_weight_decay_as_adamw_takes_them(wd: Any, where: str, backend: str):
    torch.manual_seed(0)
    p = torch.randn(5, dtype=torch.float64)
    q = p.clone()
    kwargs: dict[str, Any] = dict(lr=0.01, eps=1e-8, optimized_update=False, backend=backend)
    if where == "constructor":
        ours = Adam([p], weight_decay=wd, **kwargs)
    else:
        ours = Adam([{"params": [p], "weight_decay": wd}], **kwargs)
    ref = torch.optim.AdamW([q], lr=0.01, eps=1e-8, weight_decay=float(wd))
    for _ in range(5):
        g = torch.randn(5, dtype=torch.float64)
        p.grad, q.grad = g, g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("wd", [np.float32(0.3), torch.tensor(0.3)])
@pytest.mark.parametrize("decay", ["decoupled", "l2"])
def test_group_weight_decay_of_any_number_type_gives_the_same_numbers_on_every_path(wd, decay):
    kind = WeightDecay(0.0, weight_decouple=decay == "decoupled")
    results = []
    for backend in ("auto", "foreach", "torch"):
        torch.manual_seed(0)
        p = torch.randn(64)
        opt = Adam(
            [{"params": [p], "weight_decay": wd}], lr=0.1, weight_decay=kind, backend=backend
        )
        for _ in range(3):
            p.grad = torch.randn(64)
            opt.step()
        results.append(p)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_a_numpy_weight_decay_is_kept_as_a_plain_number() -> None:
    opt = Adam([torch.randn(2)], weight_decay=np.float32(0.5))
    assert type(opt.param_groups[0]["weight_decay"]) is float
    with pytest.raises(ValueError, match="Invalid weight_decay value"):
        Adam([torch.randn(2)], weight_decay=np.float32(-1))
    with pytest.raises(TypeError):
        Adam([{"params": [torch.randn(2)], "weight_decay": "0.1"}])


# ---- torch.optim.Adam's decoupled_weight_decay key ----------------------------------------------


@pytest.mark.parametrize("decoupled", [True, False])
def test_decoupled_weight_decay_that_agrees_gives_torchs_numbers(decoupled: bool) -> None:
    torch.manual_seed(0)
    p = torch.randn(5, dtype=torch.float64)
    q = p.clone()
    group = {"params": [q], "decoupled_weight_decay": decoupled}
    ref = torch.optim.Adam([group], lr=0.1, eps=1e-8, weight_decay=0.5)
    ours = Adam(
        [{"params": [p], "decoupled_weight_decay": decoupled}],
        lr=0.1,
        eps=1e-8,
        weight_decay=WeightDecay(0.5, weight_decouple=decoupled),
        optimized_update=False,
    )
    for _ in range(4):
        g = torch.randn(5, dtype=torch.float64)
        p.grad, q.grad = g, g.clone()
        ref.step()
        ours.step()
    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize(
    "decay, decoupled",
    [
        (WeightDecay(0.5, weight_decouple=False), True),
        (WeightDecay(0.5), False),
        (WeightDecay(0.5, absolute=True), True),
    ],
)
def test_decoupled_weight_decay_that_disagrees_is_refused(decay, decoupled, backend) -> None:
    a, b = torch.randn(3), torch.randn(3)
    opt = Adam(
        [{"params": [a]}, {"params": [b], "decoupled_weight_decay": decoupled}],
        lr=0.1,
        weight_decay=decay,
        backend=backend,
    )
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\] sets decoupled_weight_decay"):
        opt.step()
    assert_unchanged(opt, before)
    opt.param_groups[1]["weight_decay"] = 0.0  # no decay: nothing to disagree with
    opt.step()


# ---- state dicts of groups with their own WeightDecay -------------------------------------------


def _train(opt: Adam, params: list[torch.Tensor], steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_group_weight_decay_checkpoints_load_with_weights_only() -> None:
    groups = [
        WeightDecay(0.1, weight_decouple=False),
        WeightDecay(0.05, absolute=True),
        WeightDecay(0.2),
        None,
    ]

    def make(params: list[torch.Tensor]) -> Adam:
        spec = [
            {"params": [p]} if wd is None else {"params": [p], "weight_decay": wd}
            for p, wd in zip(params, groups)
        ]
        return Adam(spec, lr=0.1, weight_decay=WeightDecay(0.01))

    torch.manual_seed(0)
    start = [torch.randn(4) for _ in groups]
    straight = [p.clone() for p in start]
    opt = make(straight)
    _train(opt, straight, 3, seed=1)
    _train(opt, straight, 3, seed=2)

    resumed = [p.clone() for p in start]
    first = make(resumed)
    _train(first, resumed, 3, seed=1)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert first.param_groups[0]["weight_decay"] == groups[0]  # state_dict() changes nothing
    second = Adam([{"params": [p]} for p in resumed], lr=0.3, weight_decay=WeightDecay(0.01))
    second.load_state_dict(loaded)
    assert [g["weight_decay"] for g in second.param_groups] == [*groups[:3], 0.01]
    assert all("weight_decay_kind" not in g for g in second.param_groups)
    _train(second, resumed, 3, seed=2)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind, wd", [("sideways", 0.1), (3, 0.1), ("l2", -1.0)])
def test_a_bad_saved_group_decay_is_refused_and_nothing_changes(kind: Any, wd: float) -> None:
    p = torch.randn(3)
    opt = Adam([{"params": [p], "weight_decay": WeightDecay(0.1, weight_decouple=False)}], lr=0.1)
    _train(opt, [p], 1, seed=0)
    state_dict = opt.state_dict()
    state_dict["param_groups"][0].update(weight_decay_kind=kind, weight_decay=wd)
    before, group = snapshot(opt), dict(opt.param_groups[0])
    with pytest.raises(ValueError, match=r"param_groups\[0\]"):
        opt.load_state_dict(state_dict)
    assert_unchanged(opt, before)
    assert opt.param_groups[0] == group


# ---- load_state_dict names the optimizer's parameter -------------------------------------------


def test_load_state_dict_error_names_this_optimizers_parameter() -> None:
    torch.manual_seed(0)
    m = nn.Linear(2, 3)
    src = Adam(m.named_parameters(), lr=0.1)
    m(torch.randn(4, 2)).sum().backward()
    src.step()
    dst = Adam(list(reversed(list(m.named_parameters()))), lr=0.1)
    with pytest.raises(ValueError) as info:
        dst.load_state_dict(src.state_dict())
    message = str(info.value)
    assert "parameter 'bias' (param_groups[0]['params'][0]) (shape (3,)" in message, message
    assert "saved as 'weight'" in message
    assert dst.state == {} or all(not s for s in dst.state.values())


# ---- num_threads set after construction ---------------------------------------------------------


@pytest.mark.parametrize("threads", [0, -1, 2**64, 1025, 1.5, True, "2"])
def test_num_threads_set_later_is_checked_at_the_step(threads: Any) -> None:
    p = torch.randn(4)
    p.grad = torch.randn(4)
    opt = Adam([p])
    opt.step()
    opt.num_threads = threads
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"num_threads: .*expected an int from 1 to 1024"):
        opt.step()
    assert_unchanged(opt, before)
    with pytest.raises(ValueError, match="num_threads"):
        Adam([p], num_threads=threads)
    opt.num_threads = 1024
    opt.step()
    assert opt.state[p]["step"] == 2


# ---- values set after construction, group names, loaded state -----------------------------------

ALL_BACKENDS = ["auto", "rust", "foreach", "torch"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "3", None])
def test_a_seed_set_later_is_checked_at_the_step(backend: str, seed: Any) -> None:
    p = torch.randn(4)
    p.grad = torch.randn(4)
    opt = Adam([p], backend=backend)
    opt.step()
    opt.seed = seed
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"Invalid seed: .*expected an int in \[0, 2\*\*64\)"):
        opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("names", [5, "w", object()])
def test_param_names_that_are_not_a_list_are_refused_naming_the_group(backend, names) -> None:
    a, b = torch.randn(3), torch.randn(2)
    a.grad, b.grad = torch.randn(3), torch.randn(2)
    opt = Adam([{"params": [a]}, {"params": [b]}], backend=backend)
    opt.step()
    opt.param_groups[1]["param_names"] = names
    before = snapshot(opt)
    match = r"param_groups\[1\]\['param_names'\] is .*expected a list"
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_unchanged(opt, before)


def test_a_loaded_meta_step_or_sparse_moment_is_refused_naming_the_parameter() -> None:
    p = torch.randn(2)
    p.grad = torch.randn(2)
    opt = Adam([p])
    opt.step()
    label = r"the loaded state of param_groups\[0\]\['params'\]\[0\] \(shape \(2,\)"
    for key, value, reason in [
        ("step", torch.tensor(1.0, device="meta"), "has step=.*expected a count"),
        ("exp_avg", torch.zeros(2).to_sparse(), "'exp_avg' of layout torch.sparse_coo"),
    ]:
        sd = opt.state_dict()
        sd["state"][0] = dict(sd["state"][0], **{key: value})
        before = snapshot(opt)
        with pytest.raises(ValueError, match=label + ".*" + reason):
            opt.load_state_dict(sd)
        assert_unchanged(opt, before)


# ---- tensors made under torch.inference_mode() --------------------------------------------------


def _inference(x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return x.clone()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("where", ["param", "exp_avg", "exp_avg_sq"])
def test_inference_tensors_are_stepped_whole_on_every_backend(backend: str, where: str) -> None:
    # torch refuses in-place ops on them outside inference mode, part way through a step of
    # the torch ops; every route steps them as the core does (all of the step, the same bits).
    gen = torch.Generator().manual_seed(0)
    p0 = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in p0] for _ in range(3)]
    runs = []
    for inference in (False, True):
        ps = [p.clone() for p in p0]
        if inference and where == "param":
            ps[1] = _inference(ps[1])
        opt = Adam([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1, backend=backend)
        for k, gs in enumerate(grads):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            if inference and where != "param" and k == 1:
                st = opt.state[ps[1]]
                st[where] = _inference(st[where])
            version = ps[0]._version
            opt.step()
            assert ps[0]._version > version  # other tensors are still bumped
        runs.append((ps, [opt.state[p] for p in ps]))
    (pa, sa), (pb, sb) = runs
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    for x, y in zip(sa, sb):
        assert x["step"] == y["step"] == 3
        assert torch.equal(x["exp_avg"], y["exp_avg"])
        assert torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("decay", [WeightDecay(0.0), WeightDecay(0.0, absolute=True)])
def test_an_infinite_lr_gives_the_spec_decay_on_every_backend(backend: str, decay: Any) -> None:
    # The spec's decoupled decay multiplies by 1 − α·λ even for λ = 0: NaN for α = inf.
    p = torch.tensor([1.0, -2.0, 0.0, 3.0])
    p.grad = torch.tensor([0.5, -0.5, 0.0, 1e-30])
    ref = p.clone()
    opt = Adam([p], lr=float("inf"), weight_decay=decay, backend=backend)
    opt.step()
    factor = 1.0 - (decay.weight_decay if decay.absolute else float("inf") * decay.weight_decay)
    want = ref.double() * factor
    if not decay.absolute:
        assert torch.isnan(want).all()
    m = 0.1 * p.grad.double()
    v = 0.001 * p.grad.double() ** 2
    step = float("inf") * math.sqrt(1 - 0.999) / (1 - 0.9)
    want = (want - step * m / (v.sqrt() + 1e-16)).float()
    assert torch.equal(p.isnan(), want.isnan())
    assert torch.equal(p[~p.isnan()], want[~want.isnan()])


# ---- group keys, copies and loads ---------------------------------------------------------------


class _TwiceDecay(WeightDecay):
    """Decoupled decay with twice the factor: math of its own, in its __call__."""

    def __call__(self, param, grad, group):
        param.data.mul_(1.0 - 2.0 * float(group["lr"]) * float(group["weight_decay"]))
        return grad


@pytest.mark.parametrize("where", ["group", "optimizer"])
def test_a_weight_decay_subclass_runs_its_own_math_on_every_path(where):
    def run(backend):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(5, dtype=torch.float64))
        if where == "group":
            opt = Adam([{"params": [p], "weight_decay": _TwiceDecay(0.1)}], lr=0.1, backend=backend)
        else:
            opt = Adam([p], lr=0.1, weight_decay=_TwiceDecay(0.1), backend=backend)
        p.grad = torch.randn(5, dtype=torch.float64)
        p0 = p.detach().clone()
        opt.step()
        return p0, p.detach().clone()

    (p0, auto), (_, ref) = run("auto"), run("torch")
    torch.testing.assert_close(auto, ref, rtol=0, atol=0)
    # The oracle: θ·(1 − 2αλ), then the first Adam update (about α·sign(g)).
    torch.manual_seed(0)
    torch.randn(5, dtype=torch.float64)
    g = torch.randn(5, dtype=torch.float64)
    expected = p0 * (1 - 2 * 0.1 * 0.1) - 0.1 * g / (g.abs() + 1e-16 / math.sqrt(0.001))
    torch.testing.assert_close(auto, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "other", [torch.optim.NAdam, torch.optim.Adagrad, torch.optim.RMSprop, torch.optim.SGD]
)
def test_a_checkpoint_of_another_optimizer_is_refused_not_stepped_as_adam(other):
    p = nn.Parameter(torch.randn(4))
    kw = {"momentum": 0.9, "centered": True} if other is torch.optim.RMSprop else {}
    kw = {"momentum": 0.9, "dampening": 0.1} if other is torch.optim.SGD else kw
    theirs = other([p], lr=0.01, **kw)
    p.grad = torch.randn(4)
    theirs.step()
    opt = Adam([p])
    p0 = p.detach().clone()
    try:
        opt.load_state_dict(theirs.state_dict())
    except (ValueError, KeyError):
        return  # refused at load
    with pytest.raises(ValueError, match=r"param_groups\[0\]"):
        opt.step()
    torch.testing.assert_close(p.detach(), p0, rtol=0, atol=0)


@pytest.mark.parametrize("key", ["lr", "betas", "eps", "weight_decay", "maximize", "amsgrad"])
def test_a_deleted_group_key_is_named_not_defaulted(key):
    p = nn.Parameter(torch.randn(4))
    opt = Adam([p], weight_decay=0.1)
    del opt.param_groups[0][key]
    p.grad = torch.randn(4)
    p0 = p.detach().clone()
    with pytest.raises(ValueError, match=rf"^param_groups\[0\] has no '{key}'"):
        opt.step()
    torch.testing.assert_close(p.detach(), p0, rtol=0, atol=0)


def test_a_checkpoint_older_than_maximize_and_amsgrad_loads_as_torch_loads_it():
    p = nn.Parameter(torch.randn(4))
    ref = torch.optim.Adam([p], lr=0.01)
    sd = ref.state_dict()
    for g in sd["param_groups"]:
        del g["maximize"], g["amsgrad"]
    opt = Adam([p], lr=0.01)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["maximize"] is False and opt.param_groups[0]["amsgrad"] is False
    p.grad = torch.randn(4)
    opt.step()


@pytest.mark.parametrize("copy_by", ["deepcopy", "pickle"])
def test_copies_keep_gradscalers_fused_route(copy_by):
    import copy
    import pickle

    opt = Adam([nn.Parameter(torch.randn(3))])
    clone = copy.deepcopy(opt) if copy_by == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert clone._step_supports_amp_scaling is True


@pytest.mark.parametrize(
    "bad", [float("inf"), float("nan"), "meta", "two"], ids=["inf", "nan", "meta", "two"]
)
def test_a_load_with_an_odd_entry_no_group_lists_loads_whole(bad):
    # torch keeps state entries of ids no group lists as they are; converting their step must
    # not raise after the load replaced the groups and the state (half a load).
    p = nn.Parameter(torch.randn(4))
    ref = torch.optim.Adam([p], lr=0.5)
    p.grad = torch.randn(4)
    ref.step()
    sd = ref.state_dict()
    step = {
        "meta": torch.tensor(1.0, device="meta"),
        "two": torch.tensor([1.0, 2.0]),
    }.get(bad, torch.tensor(bad) if not isinstance(bad, str) else None)
    sd["state"][7] = {"step": step, "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    ran = []
    opt = Adam([p], lr=0.1)
    opt.register_load_state_dict_post_hook(lambda o: ran.append(True))
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.5 and ran == [True]
    assert opt.state[p]["step"] == 1


def _train_on(opt, params, grads):
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        opt.step()


@pytest.mark.parametrize(
    "decay",
    [
        WeightDecay(0.5, weight_decouple=False),
        WeightDecay(0.05, weight_decouple=True, absolute=True),
        WeightDecay(0.5),
    ],
    ids=["l2", "absolute", "decoupled"],
)
@pytest.mark.parametrize("optimized_update", [False, True])
def test_a_checkpoint_carries_the_optimizers_decay_kind_and_update_form(decay, optimized_update):
    # Loaded into a default Adam (decoupled, optimized update), training goes on exactly as
    # without the interruption: the saved groups' math wins, as torch's group values do.
    torch.manual_seed(0)
    p0 = [torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    grads = [[torch.randn_like(p) for p in p0] for _ in range(6)]
    ref = [nn.Parameter(p.clone()) for p in p0]
    _train_on(Adam(ref, lr=0.1, weight_decay=decay, optimized_update=optimized_update), ref, grads)
    ps = [nn.Parameter(p.clone()) for p in p0]
    first = Adam(ps, lr=0.1, weight_decay=decay, optimized_update=optimized_update)
    _train_on(first, ps, grads[:3])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = Adam(ps)
    second.load_state_dict(torch.load(buf, weights_only=True))
    _train_on(second, ps, grads[3:])
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("decoupled", [True, False])
def test_a_checkpoint_loads_into_torch_adam_with_its_decay_kind(decoupled):
    torch.manual_seed(0)
    p0 = torch.randn(8)
    grads = [[torch.randn(8)] for _ in range(6)]
    decay = WeightDecay(0.5, weight_decouple=decoupled)
    ref = [nn.Parameter(p0.clone())]
    _train_on(Adam(ref, lr=0.1, eps=1e-8, weight_decay=decay, optimized_update=False), ref, grads)
    ps = [nn.Parameter(p0.clone())]
    first = Adam(ps, lr=0.1, eps=1e-8, weight_decay=decay, optimized_update=False)
    _train_on(first, ps, grads[:3])
    # torch.optim.Adam built with the other kind: the saved decoupled_weight_decay wins.
    theirs = torch.optim.Adam(ps, lr=0.1, weight_decay=0.5, decoupled_weight_decay=not decoupled)
    theirs.load_state_dict(first.state_dict())
    assert theirs.param_groups[0]["decoupled_weight_decay"] is decoupled
    _train_on(theirs, ps, grads[3:])
    torch.testing.assert_close(ps[0].detach(), ref[0].detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["auto", "rust", "torch"])
def test_one_state_dict_for_two_parameters_counts_twice_as_torchs_loop(backend):
    torch.manual_seed(0)
    p0 = [torch.randn(4), torch.randn(4)]
    grads = [[torch.randn(4), torch.randn(4)] for _ in range(4)]

    def run(make):
        ps = [nn.Parameter(p.clone()) for p in p0]
        opt = make(ps)
        _train_on(opt, ps, grads[:1])
        opt.state[ps[1]] = opt.state[ps[0]]  # both parameters now share moments and count
        _train_on(opt, ps, grads[1:])
        return ps, opt.state[ps[0]]["step"]

    ours, t = run(lambda ps: Adam(ps, lr=0.1, eps=1e-8, optimized_update=False, backend=backend))
    ref, t_ref = run(lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=False))
    assert t == int(t_ref) == 7
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)


def test_a_state_key_whose_comparison_raises_leaves_the_step_undone():
    class Collides:  # hashes as "step": reading and setting the count compare with it
        armed, calls = False, 0

        def __hash__(self):
            return hash("step")

        def __eq__(self, other):
            if Collides.armed:
                Collides.calls += 1
                if Collides.calls == 2:  # the first read passes; what comes next raises
                    raise RuntimeError("boom from __eq__")
            return False

    ps = [nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))]
    opt = Adam(ps, lr=0.1)
    for p in ps:
        p.grad = torch.randn(4)
    opt.step()
    state = {Collides(): "extra"}
    state.update(opt.state[ps[1]])
    opt.state[ps[1]] = state
    before = [(p.detach().clone(), opt.state[p]["exp_avg"].clone(), p._version) for p in ps]
    Collides.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    Collides.armed = False
    for p, (value, m, _) in zip(ps, before):
        torch.testing.assert_close(p.detach(), value, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=0, atol=0)
        assert opt.state[p]["step"] == 1


class _RefusesCounts(dict):
    """A state dict whose own __setitem__ refuses a new step count."""

    def __setitem__(self, key, value):
        if key == "step":
            raise RuntimeError("this state refuses a new step count")
        super().__setitem__(key, value)


class _Plain(torch.Tensor):  # any plain subclass: stepped with torch's foreach ops
    pass


@pytest.mark.parametrize("other", ["none", "meta", "subclass"])
def test_a_state_dict_subclass_that_refuses_the_count_leaves_the_step_undone(other):
    # Its __setitem__ runs when the count is set, after the writes: with a parameter on
    # another path beside it, the count was set in Python after the core had written.
    a = nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    ps = [a]
    if other == "meta":
        ps.append(nn.Parameter(torch.zeros(3, dtype=torch.float64, device="meta")))
    elif other == "subclass":
        ps.append(nn.Parameter(torch.zeros(3, dtype=torch.float64).as_subclass(_Plain)))
    opt = Adam(ps, lr=0.1)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.state[a] = _RefusesCounts(opt.state[a])
    before = (a.detach().clone(), opt.state[a]["exp_avg"].clone())
    with pytest.raises(RuntimeError, match="refuses a new step count"):
        opt.step()
    torch.testing.assert_close(a.detach(), before[0], rtol=0, atol=0)
    torch.testing.assert_close(opt.state[a]["exp_avg"], before[1], rtol=0, atol=0)
    assert opt.state[a]["step"] == 1
    # A dict subclass that accepts the count steps as a plain dict does.
    opt.state[a] = dict(opt.state[a])
    ref = Adam([nn.Parameter(before[0].clone())], lr=0.1)
    ref.state[ref.param_groups[0]["params"][0]] = {
        k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[a].items()
    }
    opt.state[a] = type("Accepting", (dict,), {})(opt.state[a])
    ref.param_groups[0]["params"][0].grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    ref.step()
    torch.testing.assert_close(a.detach(), ref.param_groups[0]["params"][0].detach())
    assert opt.state[a]["step"] == 2


@pytest.mark.parametrize("backend", ["auto", "rust", "torch"])
def test_a_parameter_of_overlapping_windows_is_refused_on_every_path(backend):
    # Three windows of three over five floats: element (i, j) and (i + 1, j - 1) are one.
    base = torch.randn(5)
    p = nn.Parameter(base.as_strided((3, 3), (1, 1)))
    p.grad = torch.randn(3, 3)
    opt = Adam([p], lr=0.1, backend=backend)
    before = base.clone()
    with pytest.raises(RuntimeError, match="elements that share memory"):
        opt.step()
    torch.testing.assert_close(base, before, rtol=0, atol=0)
    assert opt.state[p] == {} or opt.state[p].get("step", 0) == 0


def test_a_non_strided_gradient_is_named_for_what_it_is():
    p = nn.Parameter(torch.randn(4, 4).to_mkldnn())
    p.grad = torch.randn(4, 4).to_mkldnn()
    with pytest.raises(RuntimeError, match=r"does not support non-strided gradients .*_mkldnn"):
        Adam([p]).step()
    q = nn.Parameter(torch.randn(4, 4))
    q.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients .*SparseAdam"):
        Adam([q]).step()


def test_a_wrappers_own_group_keys_do_not_stop_the_step():
    # SAM-style wrappers build the base optimizer from their own groups, which carry their keys.
    torch.manual_seed(0)
    p0, g = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    a, b = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    sam_keys = {"rho": 0.05, "adaptive": True, "lambd": 0.5, "sigma": 1.0}
    ours = Adam([{"params": [a], **sam_keys}], lr=0.1, weight_decay=0.0)
    plain = Adam([b], lr=0.1, weight_decay=0.0)
    for _ in range(3):
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        plain.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("source", ["rustadam", "torch"])
def test_a_checkpoint_of_an_empty_channels_last_parameter_loads(source):
    # Empty and channels_last: strides (0, 1, 12, 4), a stride 0 over no elements at all.
    p = nn.Parameter(torch.zeros(2, 4, 0, 3).contiguous(memory_format=torch.channels_last))
    q = nn.Parameter(torch.randn(3))
    first = (Adam if source == "rustadam" else torch.optim.Adam)([p, q], lr=0.1)
    p.grad, q.grad = torch.zeros_like(p), torch.randn(3)
    first.step()
    second = Adam([p, q], lr=0.1)
    second.load_state_dict(first.state_dict())
    assert second.state[p]["step"] == 1 and second.state[q]["step"] == 1
    p.grad, q.grad = torch.zeros_like(p), torch.randn(3)
    second.step()
    assert second.state[q]["step"] == 2
