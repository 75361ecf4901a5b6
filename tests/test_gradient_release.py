"""``Adam(..., gradient_release=True)``: each parameter is stepped inside backward.

A training step is just ``loss.backward()``: as each parameter's gradient is complete the
optimizer steps it and sets ``p.grad = None``. ``step()`` only runs a closure (and returns its
loss), ``zero_grad()`` is harmless, and the results are bit for bit those of the usual
``backward(); step(); zero_grad()`` loop, with schedulers, per-group values, state dicts and
``add_param_group``.
"""

import copy
import gc
import inspect
import io
import weakref

import pytest
import torch
from torch import nn

from rustadam import Adam, WeightDecay

STEPS = 5
# (dtype, rounding): float32, and the two 16-bit modes whose state (the compensation) and
# randomness (keyed by the parameter's position and step) must not depend on the stepping order.
SETTINGS = [
    (torch.float32, "nearest"),
    (torch.bfloat16, "stochastic"),
    (torch.bfloat16, "kahan"),
]
BACKENDS = ["auto", "torch"]


class Net(nn.Module):
    """A small MLP with a layer that never gets a gradient and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)
        self.unused = nn.Linear(4, 4)  # not in forward: its .grad stays None
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.head(self.body(x)))


def _net(dtype: torch.dtype) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def _groups(model: Net) -> list[dict]:
    """Two groups with their own lr and weight decay."""
    return [
        {"params": list(model.body.parameters()), "lr": 1e-2},
        {"params": [*model.head.parameters(), *model.unused.parameters()], "weight_decay": 0.0},
        {"params": list(model.frozen.parameters())},
    ]


def _batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 8, generator=gen).to(dtype), torch.randint(0, 3, (16,), generator=gen)


def _loss(model: nn.Module, step: int, dtype: torch.dtype) -> torch.Tensor:
    x, y = _batch(step, dtype)
    return nn.functional.cross_entropy(model(x).float(), y)


def _opt(model_or_params, release: bool, **kwargs) -> Adam:
    params = _groups(model_or_params) if isinstance(model_or_params, Net) else model_or_params
    kwargs.setdefault("lr", 1e-3)
    kwargs.setdefault("weight_decay", WeightDecay(0.01))
    return Adam(params, gradient_release=release, seed=7, **kwargs)


def _usual_step(model: nn.Module, opt: Adam, step: int, dtype: torch.dtype) -> None:
    _loss(model, step, dtype).backward()
    opt.step()
    opt.zero_grad()


def _release_step(model: nn.Module, opt: Adam, step: int, dtype: torch.dtype) -> None:
    _loss(model, step, dtype).backward()  # that is all: backward steps every parameter


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(ints)


def _assert_same(model_a: nn.Module, opt_a: Adam, model_b: nn.Module, opt_b: Adam) -> None:
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(_bits(pa), _bits(pb)), name
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert sa.keys() == sb.keys(), name
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(_bits(value), _bits(sb[key])), (name, key)
            else:
                assert value == sb[key], (name, key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "rounding"), SETTINGS)
def test_backward_alone_gives_the_usual_loop_bit_for_bit(dtype, rounding, backend):
    usual_model, release_model = _net(dtype), _net(dtype)
    usual = _opt(usual_model, False, rounding=rounding, backend=backend)
    release = _opt(release_model, True, rounding=rounding, backend=backend)
    frozen_before = [p.detach().clone() for p in release_model.frozen.parameters()]
    for step in range(STEPS):
        _usual_step(usual_model, usual, step, dtype)
        _release_step(release_model, release, step, dtype)
        _assert_same(usual_model, usual, release_model, release)
    for p in release_model.parameters():
        assert p.grad is None
    for p in [*release_model.body.parameters(), *release_model.head.parameters()]:
        assert release.state[p]["step"] == STEPS
    # Never stepped: a parameter without a gradient (unused) or without requires_grad (frozen).
    for p in [*release_model.unused.parameters(), *release_model.frozen.parameters()]:
        assert p not in release.state or not release.state[p]
    for p, before in zip(release_model.frozen.parameters(), frozen_before):
        assert torch.equal(p, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_freed_and_step_and_zero_grad_change_nothing(backend):
    model = _net(torch.float32)
    opt = _opt(model, True, backend=backend)
    _loss(model, 0, torch.float32).backward()
    trained = [p for p in model.parameters() if p.requires_grad and p in opt.state]
    assert len(trained) == 6  # the body's and the head's weights and biases
    for p in model.parameters():
        assert p.grad is None
    after = copy.deepcopy(model)
    state = copy.deepcopy(opt.state_dict())
    assert opt.step() is None
    opt.zero_grad()
    opt.zero_grad(set_to_none=False)
    assert opt.step() is None
    for p, q in zip(model.parameters(), after.parameters()):
        assert torch.equal(p, q)
    for key, value in opt.state_dict()["state"].items():
        assert value["step"] == state["state"][key]["step"] == 1
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(value[moment], state["state"][key][moment])
    _loss(model, 1, torch.float32).backward()
    assert all(opt.state[p]["step"] == 2 for p in trained)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_with_a_closure_returns_its_loss(backend):
    usual_model, release_model = _net(torch.float32), _net(torch.float32)
    usual = _opt(usual_model, False, backend=backend)
    release = _opt(release_model, True, backend=backend)
    for step in range(3):
        # The same closure for both: zero_grad() is harmless with gradient release.
        expected = usual.step(_closure(usual_model, usual, step))
        got = release.step(_closure(release_model, release, step))
        assert torch.equal(got, expected)
        _assert_same(usual_model, usual, release_model, release)


def _closure(model: nn.Module, opt: Adam, step: int):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(model, step, torch.float32)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shared_weight_is_stepped_once_with_its_accumulated_gradient(backend):
    def model_and_forward():
        torch.manual_seed(1)
        lin = nn.Linear(6, 6)
        return lin, lambda x: lin(torch.tanh(lin(x))).pow(2).mean()  # lin used twice

    (a, fa), (b, fb) = model_and_forward(), model_and_forward()
    usual, release = _opt(list(a.parameters()), False), _opt(list(b.parameters()), True)
    for step in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        fa(x).backward()
        usual.step()
        usual.zero_grad()
        fb(x).backward()
        assert release.state[b.weight]["step"] == step + 1
        _assert_same(a, usual, b, release)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scheduler_changes_the_lr_as_in_the_usual_loop(backend):
    dtype = torch.float32
    usual_model, release_model = _net(dtype), _net(dtype)
    usual = _opt(usual_model, False, backend=backend)
    release = _opt(release_model, True, backend=backend)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1) for o in (usual, release)]
    for step in range(6):
        _usual_step(usual_model, usual, step, dtype)
        _release_step(release_model, release, step, dtype)
        release.step()  # a no-op; what a loop written for the usual optimizer calls anyway
        for s in scheds:
            s.step()
        _assert_same(usual_model, usual, release_model, release)
    assert release.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.1**3)
    assert release.param_groups[1]["lr"] == pytest.approx(1e-3 * 0.1**3)


def test_an_lr_of_zero_set_by_a_scheduler_stops_the_parameters():
    model = _net(torch.float32)
    opt = _opt(model, True, weight_decay=WeightDecay())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch < 2 else 0.0)
    for step in range(2):
        _release_step(model, opt, step, torch.float32)
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0, 0.0]
    before = [p.detach().clone() for p in model.parameters()]
    _release_step(model, opt, 2, torch.float32)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert opt.state[model.head.weight]["step"] == 3  # stepped, with α = 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "rounding"), SETTINGS[1:])
def test_state_dict_round_trip(dtype, rounding, backend):
    whole_model = _net(dtype)
    whole = _opt(whole_model, True, rounding=rounding, backend=backend)
    for step in range(2 * 3):
        _release_step(whole_model, whole, step, dtype)

    # Saved from the usual loop, resumed with gradient release, and the other way round.
    for first, second in [(True, True), (False, True), (True, False)]:
        model = _net(dtype)
        opt = _opt(model, first, rounding=rounding, backend=backend)
        for step in range(3):
            (_release_step if first else _usual_step)(model, opt, step, dtype)
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        if rounding == "kahan":
            assert all("compensation" in s for s in saved["opt"]["state"].values())
        resumed_model = _net(dtype)
        resumed_model.load_state_dict(saved["model"])
        resumed = _opt(resumed_model, second, rounding=rounding, backend=backend)
        resumed.load_state_dict(saved["opt"])
        for step in range(3, 6):
            (_release_step if second else _usual_step)(resumed_model, resumed, step, dtype)
        _assert_same(whole_model, whole, resumed_model, resumed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_is_stepped_in_backward(backend):
    dtype = torch.float32
    usual_model, release_model = _net(dtype), _net(dtype)
    usual = _opt(list(usual_model.body.parameters()), False, backend=backend)
    release = _opt(list(release_model.body.parameters()), True, backend=backend)
    for step in range(STEPS):
        if step == 2:
            usual.add_param_group({"params": list(usual_model.head.parameters()), "lr": 1e-2})
            release.add_param_group({"params": list(release_model.head.parameters()), "lr": 1e-2})
        _usual_step(usual_model, usual, step, dtype)
        if step < 2:
            usual_model.head.zero_grad(set_to_none=True)  # not yet optimized: no gradient kept
        _release_step(release_model, release, step, dtype)
        if step < 2:
            release_model.head.zero_grad(set_to_none=True)
        _assert_same(usual_model, usual, release_model, release)
    assert release.state[release_model.head.weight]["step"] == STEPS - 2
    for p in release_model.parameters():
        assert p.grad is None


def test_gradient_release_is_a_keyword_only_option_off_by_default():
    parameter = inspect.signature(Adam).parameters["gradient_release"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    assert parameter.default is False
    model = _net(torch.float32)
    opt = Adam(model.parameters())
    _loss(model, 0, torch.float32).backward()
    assert all(p.grad is not None for p in model.head.parameters())  # nothing stepped yet
    assert not opt.state


def test_grad_scaler_is_refused_clearly():
    # GradScaler must unscale (and skip on inf) before any parameter moves; with gradient
    # release the parameters moved during backward already.
    model = _net(torch.float32)
    opt = _opt(model, True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(_loss(model, 0, torch.float32)).backward()
    with pytest.raises(RuntimeError, match="gradient_release"):
        scaler.step(opt)


def test_grad_scaler_is_refused_after_a_manual_unscale_too():
    # unscale_ (before clipping) leaves GradScaler.step no scale to pass, only found_inf.
    model = _net(torch.float32)
    opt = _opt(model, True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(_loss(model, 0, torch.float32)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="gradient_release"):
        scaler.step(opt)


def test_a_compiled_train_step_with_backward_inside_steps_as_eager():
    # The hooks run inside the compiled function's backward: they step eagerly, as step()
    # does (traced, the step failed on fake tensors after stepping one parameter).
    models = [_net(torch.float64) for _ in range(3)]
    release = [_opt(models[0], True), _opt(models[1], True)]
    usual = _opt(models[2], False)

    def train_step(model, opt, step):
        _loss(model, step, torch.float64).backward()
        opt.step()

    compiled = torch.compile(train_step)
    for step in range(3):
        compiled(models[0], release[0], step)
        train_step(models[1], release[1], step)
        _usual_step(models[2], usual, step, torch.float64)
    for a, b, c in zip(*(m.parameters() for m in models)):
        # The compiled forward and backward round differently from the eager ones.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b, c, rtol=0, atol=0)
    assert all(release[0].state[p]["step"] == 3 for p in models[0].body.parameters())


def test_a_second_release_optimizer_over_the_same_parameters_takes_them_over():
    # The first one's hooks ran first, stepped the parameters with its own lr and consumed
    # their gradients: the second stepped nothing.
    models = [_net(torch.float64) for _ in range(2)]
    params = [list(models[0].body.parameters()), list(models[1].body.parameters())]
    first = _opt(params[0], True, lr=1e-2)
    usual_first = _opt(params[1], False, lr=1e-2)
    _loss(models[0], 0, torch.float64).backward()
    _usual_step(models[1], usual_first, 0, torch.float64)
    second = _opt(params[0], True, lr=1e-4)  # the first is still alive
    usual_second = _opt(params[1], False, lr=1e-4)
    for step in (1, 2):
        _loss(models[0], step, torch.float64).backward()
        _usual_step(models[1], usual_second, step, torch.float64)
    assert [first.state[p]["step"] for p in params[0]] == [1] * len(params[0])
    assert [second.state[p]["step"] for p in params[0]] == [2] * len(params[0])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Gone, the second leaves them to the first again.
    del second
    gc.collect()
    _loss(models[0], 3, torch.float64).backward()
    assert [first.state[p]["step"] for p in params[0]] == [2] * len(params[0])


def test_a_parameter_the_second_optimizer_no_longer_holds_goes_back_to_the_first():
    model = _net(torch.float64)
    params = list(model.body.parameters())
    first = _opt(params, True)
    second = _opt(params, True)
    second.param_groups[0]["params"] = params[1:]  # params[0] is no longer the second's
    _loss(model, 0, torch.float64).backward()  # the second lets it go (nobody steps it now)
    _loss(model, 1, torch.float64).backward()
    assert first.state[params[0]]["step"] == 1
    assert params[0] not in second.state
    assert all(second.state[p]["step"] == 2 for p in params[1:])
    # Taken into the second's groups again, it is the second's again.
    second.param_groups[0]["params"] = params
    for step in (2, 3):
        _loss(model, step, torch.float64).backward()
    assert first.state[params[0]]["step"] == 1
    assert second.state[params[0]]["step"] == 2


def test_step_hooks_run_at_step_after_backward_updated_the_parameters():
    model = _net(torch.float32)
    opt = _opt(model, True)
    seen = []
    start = [p.detach().clone() for p in model.parameters()]

    def hook(name):
        def record(optimizer, args, kwargs):
            moved = any(not torch.equal(p, q) for p, q in zip(model.parameters(), start))
            seen.append((name, moved))

        return record

    opt.register_step_pre_hook(hook("pre"))
    opt.register_step_post_hook(hook("post"))
    _loss(model, 0, torch.float32).backward()
    assert seen == []  # backward stepped the parameters without calling step()
    opt.step()
    assert seen == [("pre", True), ("post", True)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_the_hooks_missed_is_stepped_at_step(backend):
    """A parameter appended to a group's list (as torch.optim allows) and one given
    requires_grad after construction have no hook at their first backward: ``step()`` steps
    them, as the usual loop would, and hooks them for the next."""
    dtype = torch.float32
    usual_model, release_model = _net(dtype), _net(dtype)
    for m in (usual_model, release_model):
        m.frozen.requires_grad_(False)
    usual = _opt(usual_model, False, backend=backend)
    release = _opt(release_model, True, backend=backend)
    for step in range(STEPS):
        if step == 1:
            for m, o in ((usual_model, usual), (release_model, release)):
                o.param_groups[0]["params"].append(m.frozen.weight)  # was in group 2 too
                o.param_groups[2]["params"].remove(m.frozen.weight)
                m.frozen.requires_grad_(True)
        _usual_step(usual_model, usual, step, dtype)
        _loss(release_model, step, dtype).backward()
        release.step()
        _assert_same(usual_model, usual, release_model, release)
        for p in release_model.parameters():
            assert p.grad is None
    assert release.state[release_model.frozen.weight]["step"] == STEPS - 1


def test_a_new_parameter_with_a_freed_ones_id_is_hooked():
    """Hooks are known by the parameter itself, not its id(): a parameter that gets the id of
    one removed and freed is hooked (and stepped in backward) all the same."""
    keep = nn.Parameter(torch.ones(3))
    opt = Adam([keep], lr=0.1, gradient_release=True)
    old = nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [old]})
    old_id = id(old)
    opt.param_groups.pop()
    del old
    gc.collect()  # the hook's bound method makes a cycle through the optimizer
    spare = []
    for _ in range(20000):
        new = nn.Parameter(torch.ones(3))
        if id(new) == old_id:
            break
        spare.append(new)
    else:
        pytest.skip("Python gave no new parameter the freed one's id")
    opt.add_param_group({"params": [new]})
    ref = nn.Parameter(torch.ones(3))
    ref_opt = Adam([ref], lr=0.1)
    (new.sum() + keep.sum()).backward()
    ref.sum().backward()
    ref_opt.step()
    assert new.grad is None
    assert torch.equal(new.detach(), ref.detach())


def test_a_dropped_optimizer_stops_stepping():
    """The hooks hold the optimizer weakly and are removed with it: once it is gone, a
    backward leaves the parameter alone and its gradient where torch puts it."""
    p = nn.Parameter(torch.ones(3))
    opt = Adam([p], lr=0.1, gradient_release=True)
    (p * 2).sum().backward()
    assert p.grad is None and not torch.equal(p.detach(), torch.ones(3))
    alive = weakref.ref(opt)
    del opt
    gc.collect()
    assert alive() is None
    before = p.detach().clone()
    (p * 2).sum().backward()
    assert torch.equal(p.detach(), before)
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert not p._post_accumulate_grad_hooks


def test_a_parameter_listed_twice_is_refused_by_name():
    """As the usual step refuses it (torch would step it twice): the backward that reaches it
    raises, naming both places, and leaves it as it was."""
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = Adam([q, p, p], lr=0.1, gradient_release=True)
    twice = r"\['params'\]\[2\].*same tensor as .*\['params'\]\[1\]"
    with pytest.raises(RuntimeError, match=twice):
        (p.sum() + q.sum()).backward()
    assert torch.equal(p.detach(), torch.ones(3)) and p not in opt.state


def test_a_parameter_appended_twice_after_the_hooks_is_refused_at_once():
    """The hooks' record follows the groups' lists: a duplicate appended later is refused at
    the very next backward, not stepped once first."""
    p, q = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = Adam([q, p], lr=0.1, gradient_release=True)
    opt.param_groups[0]["params"].append(p)
    with pytest.raises(RuntimeError, match="same tensor as"):
        (p.sum() + q.sum()).backward()
    assert torch.equal(p.detach(), torch.ones(2)) and p not in opt.state


def test_a_duplicate_made_by_replacing_an_entry_is_refused_at_step():
    """Replacing an entry keeps the lists' lengths, which the hooks watch: the next step()
    refuses the duplicate by name (the backward before it stepped it once)."""
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = Adam([a, b], lr=0.1, gradient_release=True)
    opt.param_groups[0]["params"][1] = a
    a.sum().backward()
    twice = r"\['params'\]\[1\].*same tensor as .*\['params'\]\[0\]"
    with pytest.raises(RuntimeError, match=twice):
        opt.step()
