r"""``rustadam.functional``: the Adam math over lists of tensors, dispatched per device and dtype.

:class:`rustadam.Adam` collects each group's parameters, gradients, states and step counts and
hands them here; the same function serves anyone who keeps their own state.

Per parameter with gradient g and update count t (after this update), with bc1 = 1 − β1^t and
bc2 = 1 − β2^t in float64::

    g ← −g if maximize;  weight decay (decoupled: θ ← θ·(1 − α·λ), absolute: θ ← θ·(1 − λ),
    L2: g ← g + λ·θ), rounded to the tensor's dtype
    m ← β1·m + (1 − β1)·g;   v ← β2·v + (1 − β2)·g²;   v_max ← max(v_max, v) with amsgrad
    θ ← θ − (α·√bc2 / bc1) · m / (√v + ε̂)           optimized_update=True
    θ ← θ − (α / bc1) · m / (√v / √bc2 + ε)          optimized_update=False

16-bit tensors compute in float32 and round once when stored (``rounding`` may make that
rounding stochastic or Kahan-compensated); complex tensors are pairs of reals.

Where each tensor goes (``backend="auto"``): exact ``torch.Tensor``/``nn.Parameter`` CPU tensors
of float32, float64, bfloat16, float16, complex64 and complex128 to the Rust core, in one checked
call for all groups; CUDA tensors to the Triton kernel where triton imports; everything else to
torch's foreach ops. ``"rust"``, ``"triton"`` and ``"foreach"`` force one path (``"rust"``
raises for a tensor the core cannot take).

>>> import torch
>>> from rustadam.functional import adam
>>> p, g = torch.ones(3), torch.full((3,), 0.5)
>>> m, v = torch.zeros(3), torch.zeros(3)
>>> adam([p], [g], [m], [v], [1], lr=0.1, betas=(0.9, 0.999), eps=1e-8)
>>> [round(x, 4) for x in p.tolist()]
[0.9, 0.9, 0.9]
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from rustadam import _core, _foreach

__all__ = ["GroupWork", "adam", "param_label", "run_groups"]

BACKENDS = ("auto", "rust", "triton", "foreach", "torch")
_EXACT = (torch.Tensor, torch.nn.Parameter)


@dataclass
class GroupWork:
    """One group's lists for a step; ``steps[k]`` is t after this update."""

    config: Any
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    steps: list[int]
    seeds: list[int]
    max_exp_avg_sqs: Optional[list[torch.Tensor]] = None
    compensations: Optional[list[Optional[torch.Tensor]]] = None
    #: Names parameter k in errors.
    label: Callable[[int], str] = field(default=lambda k: f"parameter {k}")

    def entry(self, k: int) -> tuple[Any, ...]:
        """Parameter k's buffers: (param, grad, m, v, v_max or None, compensation or None)."""
        return (
            self.params[k],
            self.grads[k],
            self.exp_avgs[k],
            self.exp_avg_sqs[k],
            None if self.max_exp_avg_sqs is None else self.max_exp_avg_sqs[k],
            None if self.compensations is None else self.compensations[k],
        )


def adam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
    weight_decouple: bool = True,
    absolute: bool = False,
    optimized_update: bool = True,
    maximize: bool = False,
    amsgrad: bool = False,
    max_exp_avg_sqs: Optional[list[torch.Tensor]] = None,
    rounding: str = "nearest",
    compensations: Optional[list[Optional[torch.Tensor]]] = None,
    seeds: Optional[list[int]] = None,
    backend: str = "auto",
    num_threads: Optional[int] = None,
) -> None:
    """One Adam step over lists of tensors, in place (see the module docstring for the math).

    ``steps[k]`` is t after this update (1 on the first). All-or-nothing: a tensor no path can
    step raises before anything is written.
    """
    config = _core.Config(
        lr=lr,
        betas=(betas[0], betas[1]),
        eps=eps,
        weight_decay=weight_decay,
        weight_decouple=weight_decouple,
        absolute=absolute,
        optimized_update=optimized_update,
        maximize=maximize,
        amsgrad=amsgrad,
        rounding=rounding,
    )
    params = list(params)
    n = len(params)
    if amsgrad != (max_exp_avg_sqs is not None):
        raise ValueError("adam: max_exp_avg_sqs must be given exactly when amsgrad is set")
    if compensations is not None and rounding != "kahan":
        raise ValueError("adam: compensations are taken only with rounding='kahan'")
    if rounding == "kahan" and compensations is None:
        compensations = [None] * n  # a 16-bit parameter without one is refused by name
    work = GroupWork(
        config,
        params,
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        [_count(t, k) for k, t in enumerate(steps)],
        [_seed(s, k) for k, s in enumerate(seeds)] if seeds is not None else [0] * n,
        None if max_exp_avg_sqs is None else list(max_exp_avg_sqs),
        None if compensations is None else list(compensations),
    )
    lists = {
        "grads": work.grads,
        "exp_avgs": work.exp_avgs,
        "exp_avg_sqs": work.exp_avg_sqs,
        "steps": work.steps,
        "seeds": work.seeds,
        "max_exp_avg_sqs": work.max_exp_avg_sqs,
        "compensations": work.compensations,
    }
    for name, lst in lists.items():
        if lst is not None and len(lst) != n:
            raise ValueError(f"adam: {name} has {len(lst)} entries for {n} parameters")
    # An optimizer's step writes leaf parameters that require grad, as Adam.step does.
    with torch.no_grad():
        run_groups([work], backend=backend, num_threads=num_threads)


def _seed(s: Any, k: int) -> int:
    """``seeds[k]`` as the int every path takes: from 0 below 2**64."""
    return _int_entry("seeds", k, s, 0, 2**64, "expected an int", "a seed is from 0 below 2**64")


def _count(t: Any, k: int) -> int:
    """``steps[k]`` as the int every path takes: t after this update, from 1 below 2**63."""
    return _int_entry(
        "steps", k, t, 1, 2**63,
        "expected an int count (t after this update, from 1)",
        "it counts updates from 1 and must fit in 63 bits",
    )  # fmt: skip


def _int_entry(lst: str, k: int, x: Any, lo: int, hi: int, kind: str, bounds: str) -> int:
    """``lst[k]`` as an int from ``lo`` below ``hi`` (an int, a numpy or 0-dim integer tensor
    one; never a bool): TypeError or ValueError naming the entry otherwise."""
    try:
        if isinstance(x, bool):
            raise TypeError
        value = operator.index(x)
    except TypeError:
        raise TypeError(f"adam: {lst}[{k}] is {x!r}; {kind}") from None
    if not lo <= value < hi:
        raise ValueError(f"adam: {lst}[{k}] is {value}; {bounds}")
    return value


def threads(num_threads: Optional[int]) -> int:
    """The core's thread count: the given one, else ``RUSTADAM_NUM_THREADS``, else torch's."""
    if num_threads is not None:
        return num_threads
    env = os.environ.get("RUSTADAM_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"RUSTADAM_NUM_THREADS must be an int >= 1, got {env!r}")
        return n
    return torch.get_num_threads()


_ROLES = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "compensation")


def _subclassed(entry: tuple[Any, ...]) -> Optional[tuple[str, torch.Tensor]]:
    """The first buffer of a parameter that is a tensor subclass, with its role; the core
    takes exact tensors only, so such a parameter goes to the torch ops, as torch steps it."""
    for role, t in zip(_ROLES, entry):
        if isinstance(t, torch.Tensor) and type(t) not in _EXACT:
            return role, t
    return None


def check_entry(label: str, entry: tuple[Any, ...]) -> None:
    """The checks every path makes (the core makes them again on its own buffers)."""
    p, g = entry[0], entry[1]
    if g.dtype != p.dtype:
        raise RuntimeError(f"{label}: its gradient has dtype {g.dtype}, the parameter {p.dtype}")
    for name, t in zip(("gradient", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), entry[1:5]):
        if t is not None and t.shape != p.shape:
            raise RuntimeError(
                f"{label}: its {name} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}"
            )
    if p.is_complex() and p.is_conj():
        raise RuntimeError(
            f"{label}: it is a conjugate view (is_conj() is set); step a resolved tensor "
            "(param.resolve_conj()) instead"
        )
    present = [(n, t) for n, t in zip(_ROLES, entry) if t is not None]
    spans = [(n, _span(t)) for n, t in present]
    for a in range(len(spans)):
        for b in range(a + 1, len(spans)):
            (na, sa), (nb, sb) = spans[a], spans[b]
            if sa is None or sb is None or "grad" == na == nb:
                continue
            if sa[0] == sb[0] and sa[1] < sb[2] and sb[1] < sa[2]:
                raise RuntimeError(f"{label}: its {nb} shares memory with its {na}")


def _span(t: torch.Tensor) -> Optional[tuple[Any, int, int]]:
    """(device, first byte, end byte) of a tensor's memory, by address (two storages may share
    memory: ``torch.from_numpy`` of one array twice), None where it has none of its own
    (empty, on the meta device, or a wrapper)."""
    sp = _foreach.span(t)
    return None if sp is None else (str(t.device), *sp)


def opaque(t: Any) -> bool:
    """A tensor with elements but no memory this can see (a wrapper subclass that does not
    say what it wraps): nothing can tell what it overlaps."""
    return (
        isinstance(t, torch.Tensor)
        and t.layout == torch.strided  # others are refused by the checks, by name
        and t.numel() > 0
        and t.device.type != "meta"
        and any(
            x.numel() > 0 and x.device.type != "meta" and _span(x) is None
            for x in _foreach.inner_tensors(t)
        )
    )


def param_label(gi: int, group: dict[str, Any], i: int, param: torch.Tensor) -> str:
    """How errors name parameter ``i`` of group ``gi`` (by its name where the group has them)."""
    names = group.get("param_names")
    label = f"param_groups[{gi}]['params'][{i}]"
    if names is not None and i < len(names):
        label = f"parameter {names[i]!r} ({label})"
    return f"{label} (shape {tuple(param.shape)}, {param.dtype}, {param.device})"


def _triton_ok(p: torch.Tensor) -> bool:
    if p.device.type != "cuda":
        return False
    from rustadam import _triton

    return _triton.available()


def run_groups(
    works: list[GroupWork],
    *,
    backend: str = "auto",
    num_threads: Optional[int] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    commit: Optional[tuple[list[dict[str, Any]], list[int]]] = None,
) -> list[torch.Tensor]:
    """Steps every group, all or nothing; returns the tensors the Rust core wrote in place.

    Order: route and check everything (the core reads and checks its buffers into one plan),
    compute the foreach ops' results (writing nothing), then the core, the Triton kernel, and
    the foreach results written. An error in the checks or the foreach ops leaves every tensor
    as it was. With ``commit`` = (state dicts, step counts), each ``state["step"]`` is
    set and the core's tensors get their autograd version bumps once the step is written:
    inside the core's call where it steps everything (so that no interrupt can land between
    the writes and the counts).
    """
    if backend not in BACKENDS or backend == "torch":
        raise ValueError(f"Invalid backend: {backend!r}")
    core_in: list[tuple[Any, ...]] = []
    core_pos: list[list[int]] = []
    other: list[tuple[int, int, str]] = []  # (group, position, path)
    use_core = backend in ("auto", "rust")
    for gi, w in enumerate(works):
        pos = []
        for k, p in enumerate(w.params):
            odd = _subclassed(w.entry(k))
            if use_core and odd is None:
                pos.append(k)
            elif backend == "rust":
                role, t = odd or ("param", p)
                what = "it" if role == "param" else f"its {role}"
                raise RuntimeError(
                    f"rustadam.Adam cannot step {w.label(k)} on the Rust core: {what} is a "
                    f"{type(t).__name__}, not exactly a torch.Tensor or nn.Parameter"
                )
            else:
                path = (
                    "triton"
                    if backend == "triton" or (backend == "auto" and _triton_ok(p))
                    else "foreach"
                )
                other.append((gi, k, path))
        core_pos.append(pos)
        core_in.append(_lists(w, pos))
    # Checked before the plan: a subclass's Python code may run here, and must not run between
    # the core's checks and its writes.
    for gi, k, _ in other:
        check_entry(works[gi].label(k), works[gi].entry(k))
    _refuse_duplicates(works)
    if other and any(core_pos):
        core = [(gi, k) for gi, pos in enumerate(core_pos) for k in pos]
        _refuse_shared_with_core(works, core, [(gi, k) for gi, k, _ in other])
    plan = None
    alone: dict[tuple[int, str], Any] = {}
    if not any(core_pos):
        alone = _check_paths(works, other)
    else:
        plan = _plan(works, core_in, core_pos, backend)
        deferred = [(gi, core_pos[gi][k]) for gi, k, _ in plan.deferred]
        for gi, k in deferred:
            w = works[gi]
            check_entry(w.label(k), w.entry(k))
            other.append((gi, k, "triton" if _triton_ok(w.params[k]) else "foreach"))
        if deferred:
            taken = set(deferred)
            core = [(gi, k) for gi, pos in enumerate(core_pos) for k in pos if (gi, k) not in taken]
            _refuse_shared_with_core(works, core, deferred)
        alone = _check_paths(works, other)
        if grad_scale is not None and found_inf is not None and bool(found_inf.item()):
            return []
    # The foreach ops compute every new value first, writing nothing, and write after the core
    # and the Triton kernel: an error of theirs (a tensor subclass's own code) changes nothing.
    writes = [
        _run_path("foreach", w, ks, grad_scale, found_inf, alone.get((gi, "foreach")))
        for gi, w in enumerate(works)
        if (ks := _path_ks(other, gi, "foreach"))
    ]
    if plan is not None and (deferred or other):
        # Python code ran since the plan read the buffers (torch calls that a mode or a
        # subclass may answer): read and check them again, so that nothing runs between the
        # checks the core relies on and its writes.
        plan = _plan(works, core_in, core_pos, backend)
        again = [(gi, core_pos[gi][k]) for gi, k, _ in plan.deferred]
        if again != deferred:
            raise RuntimeError(
                "the parameters changed while rustadam.Adam checked them (did a "
                "__torch_function__ or a mode change them?); nothing was written"
            )
    written: list[torch.Tensor] = []
    inside = False
    if plan is not None and len(plan):
        # What the core writes: parameters and states, and with GradScaler's scale the
        # gradients, which it divides in place (as torch's fused Adam leaves them) inside its
        # call, so that a refused step leaves them scaled.
        # Not those it left to the paths, which bump their own.
        taken = set(deferred)
        for gi, pos in enumerate(core_pos):
            for k in pos:
                if (gi, k) not in taken:
                    p, g, *states = works[gi].entry(k)
                    written += [p, *(t for t in states if t is not None)]
                    if grad_scale is not None:
                        written.append(g)
        options: dict[str, Any] = {"num_threads": threads(num_threads)}
        if grad_scale is not None:
            options["grad_scale"] = float(grad_scale)
        # Where the core steps everything, the step counts and version bumps are recorded
        # inside its call (no interrupt can land between the writes and them).
        inside = commit is not None and not other
        if inside:
            options.update(states=commit[0], steps=commit[1], written=written)
        try:
            plan.execute(**options)
        except _core.StepError as e:
            raise _step_error(works, core_pos, e) from None
    for gi, w in enumerate(works):
        if ks := _path_ks(other, gi, "triton"):
            _run_path("triton", w, ks, grad_scale, found_inf, alone.get((gi, "triton")))
    for write in writes:
        if write is not None:
            write()
    if commit is not None and not inside:
        for state, t in zip(*commit):
            state["step"] = t
        if written:
            torch._C._increment_version(written)
    return written


def _run_path(
    path: str,
    w: GroupWork,
    ks: list[int],
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
    alone: Any,
) -> Optional[Callable[[], None]]:
    """Steps positions ``ks`` of a group on ``path``: the Triton kernel at once; the foreach
    ops computed now, returning the function that writes their results."""
    lists = _lists(w, ks)
    args = (*lists[1:5], lists[5], lists[6], lists[7], lists[8], w.config)
    kw: dict[str, Any] = dict(
        grad_scale=grad_scale, found_inf=found_inf, label=_labels(w, ks), alone=alone
    )
    if path == "triton":
        from rustadam import _triton

        _triton.triton_adam(*args, **kw)
        return None
    return _foreach.foreach_adam(*args, **kw, defer=True)


def _labels(w: GroupWork, ks: list[int]) -> Callable[[int], str]:
    return lambda i: w.label(ks[i])


def _path_ks(other: list[tuple[int, int, str]], gi: int, path: str) -> list[int]:
    """Group ``gi``'s positions on ``path``, in index order (the order overlapping ones step)."""
    return sorted(k for g2, k, pth in other if g2 == gi and pth == path)


def _check_paths(
    works: list[GroupWork], other: list[tuple[int, int, str]]
) -> dict[tuple[int, str], Any]:
    """Checks what the Triton kernel and the foreach ops will step, group by group, before
    anything is written: one check over both paths' parameters, so that overlaps between
    them are found too. Parameters that overlap another are moved to the foreach path
    (``other`` is updated), which steps them one at a time in index order; returns, per
    (group, path), those positions in that path's list."""
    alone: dict[tuple[int, str], Any] = {}
    for gi, w in enumerate(works):
        ks = sorted(k for g2, k, _ in other if g2 == gi)
        if not ks:
            continue
        lists = _lists(w, ks)
        seq = {ks[i] for i in _foreach.check(*lists[1:8], w.config, label=_labels(w, ks))}
        if seq:
            other[:] = [(g2, k, "foreach" if g2 == gi and k in seq else pth)
                        for g2, k, pth in other]  # fmt: skip
        alone[gi, "foreach"] = seq
    # The paths compute each group's results before writing any: a parameter that meets one of
    # another group (or whose memory cannot be seen) is stepped alone, after the groups before
    # it were written, as torch's for-loop would.
    late = _across_groups(works, other)
    other[:] = [(g, k, "foreach" if (g, k) in late else pth) for g, k, pth in other]
    for gi in range(len(works)):
        if (gi, "foreach") in alone:
            seq = alone[gi, "foreach"] | {k for g, k in late if g == gi}
            fe = _path_ks(other, gi, "foreach")
            alone[gi, "foreach"] = [i for i, k in enumerate(fe) if k in seq]
            alone[gi, "triton"] = []
    return alone


def _across_groups(works: list[GroupWork], other: list[tuple[int, int, str]]) -> set:
    """The (group, position)s of ``other`` whose memory meets that of another group's where
    one writes it, or cannot be seen."""
    late = {(gi, k) for gi, k, _ in other if any(opaque(t) for t in works[gi].entry(k))}
    owners = [(0, gi, k) for gi, k, _ in other]
    for a, b in _meetings(works, owners, lambda a, b: a[1] != b[1]):
        late.update({a[1:], b[1:]})
    return late


def _step_error(works: list[GroupWork], core_pos: list[list[int]], e: Any) -> RuntimeError:
    """The core's refusal of its ``k``-th buffer of group ``gi``, naming the parameter."""
    gi, k, kind, reason = e.args
    label = works[gi].label(core_pos[gi][k])
    if kind == "fatal":
        return RuntimeError(f"{label}: {reason}")
    return RuntimeError(f"rustadam.Adam cannot step {label} on the Rust core: {reason}")


def _plan(
    works: list[GroupWork], core_in: list[tuple[Any, ...]], core_pos: list[list[int]], backend: str
) -> Any:
    try:
        return _core.plan(core_in, strict=backend == "rust")
    except _core.StepError as e:
        raise _step_error(works, core_pos, e) from None


def _refuse_duplicates(works: list[GroupWork]) -> None:
    """A parameter listed twice: torch.optim's for-loop steps it twice (t + 1, then t + 2, a
    use torch deprecates); the batched paths would apply both updates with one count."""
    seen: dict[int, tuple[int, int]] = {}
    for gi, w in enumerate(works):
        for k, p in enumerate(w.params):
            first = seen.setdefault(id(p), (gi, k))
            if first != (gi, k):
                raise RuntimeError(
                    f"{w.label(k)}: it is the same tensor as {works[first[0]].label(first[1])}; "
                    "list each parameter once (backend='torch' steps a repeated parameter once "
                    "per listing, as torch.optim does)"
                )


def _refuse_shared_with_core(
    works: list[GroupWork], core: list[tuple[int, int]], others: list[tuple[int, int]]
) -> None:
    """The core and the other paths each step their parameters in one go, the other paths'
    results computed before the core writes and written after it: one of those sharing memory
    with a core parameter (a wrapper subclass through the tensors it wraps) would not be
    stepped in the parameters' order, as torch's for-loop steps them."""
    owners = [(0, gi, k) for gi, k in core] + [(1, gi, k) for gi, k in others]
    for a, b in _meetings(works, owners, lambda a, b: a[0] != b[0]):
        other, in_core = (b, a) if b[0] == 1 else (a, b)
        raise RuntimeError(
            f"{works[other[1]].label(other[2])}: it shares memory with "
            f"{works[in_core[1]].label(in_core[2])}, "
            "which the Rust core steps while this one takes torch's ops, so that "
            "their order cannot be kept; step them with backend='torch'"
        )


def _meetings(
    works: list[GroupWork], owners: list[tuple[int, int, int]], apart: Callable[[Any, Any], bool]
) -> list[tuple[Any, Any]]:
    """The pairs of ``owners`` (tag, group, position) for which ``apart`` holds whose buffers'
    memory meets where one of them writes it (gradients are only read: the core divides its own
    by GradScaler's scale after the other paths have read theirs). A wrapper subclass is seen
    through the tensors it wraps."""
    # One sweep over the spans sorted by device and first byte (not every pair: groups of
    # thousands of parameters stay linear), keeping those still open.
    spans = []
    for owner in owners:
        for role, t in enumerate(works[owner[1]].entry(owner[2])):
            for inner in _foreach.inner_tensors(t):
                sp = _span(inner)
                if sp is not None:
                    spans.append((sp, owner, role != 1))
    spans.sort(key=lambda s: (s[0][0], s[0][1]))
    found = []
    open_: list[tuple[Any, ...]] = []
    for cur in spans:
        (device, lo, _hi), owner, writes = cur
        open_ = [o for o in open_ if o[0][0] == device and o[0][2] > lo]
        found += [(o[1], owner) for o in open_ if (o[2] or writes) and apart(o[1], owner)]
        open_.append(cur)
    return found


def _lists(w: GroupWork, ks: list[int]) -> tuple[Any, ...]:
    """The core's and the paths' argument tuple for positions ``ks`` of a group."""
    if ks == list(range(len(w.params))):  # every position in order: the lists themselves
        pick = lambda xs: xs  # noqa: E731
    else:
        pick = lambda xs: [xs[k] for k in ks]  # noqa: E731
    return (
        w.config,
        pick(w.params),
        pick(w.grads),
        pick(w.exp_avgs),
        pick(w.exp_avg_sqs),
        None if w.max_exp_avg_sqs is None else pick(w.max_exp_avg_sqs),
        None if w.compensations is None else pick(w.compensations),
        pick(w.steps),
        pick(w.seeds),
    )
