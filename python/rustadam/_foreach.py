"""The multi-tensor torch path: docs/NUMERICS.md's Adam with ``torch._foreach_*`` ops, any device.

One call steps many parameters; tensors are grouped by (device, dtype) and every group runs a
fixed sequence of foreach ops, with per-tensor scalar lists where a value depends on the
parameter's step count. Per element, with C = float64 for float64 and float32 otherwise, the
hyper-parameters computed in float64 and rounded to C once (``k.x``)::

    g = load(grad) [/ grad_scale] [· −1 if maximize]
    decoupled:  θ = load(round_E(θ · k.factor))          factor = 1 − α·λ, or 1 − λ (absolute)
    L2 (λ ≠ 0): g = load(round_E(fma(θ, k.λ, g)))
    m = fma(g, k.omb1, m · k.b1);  v = fma(k.omb2 · g, g, v · k.b2)
    amsgrad:    v_max = max(v_max, v) (NaN-propagating); the denominator uses v_max
    optimized:  u = (k.step_size · m) / (√v + k.ε)            step_size = α·√bc2 / bc1
    textbook:   u = (k.step_size · m) / (√v / k.√bc2 + k.ε)   step_size = α / bc1
    θ = round_E(θ − u)   (or Kahan-compensated / stochastically rounded for 16-bit θ)

Exactness on every device: square roots go through :func:`rustadam._rounding.sqrt_rn`
(torch's CPU ``sqrt`` is not correctly rounded); divisions are tensor by tensor (CUDA divides by
a host scalar as a multiplication by its reciprocal); each fma is torch's ``add(alpha=)`` /
``addcmul(value=)`` where a probe shows they round once on that device and dtype, else the exact
emulation :func:`rustadam._rounding.fma`. 16-bit tensors are computed in float32 copies and
rounded once when written back; complex tensors as their ``view_as_real`` pairs.

With ``found_inf`` (nonzero = skip) every result is selected on the device with ``torch.where``
against the old values, so a skipped step changes nothing and the host never waits.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import operator
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch

from rustadam import _core, _rounding

_HALF = (torch.float16, torch.bfloat16)
_EXACT = (torch.Tensor, torch.nn.Parameter)
# The dtypes torch's arithmetic (and so every path) can step; float8 and the like cannot.
STEPPABLE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64,
                       torch.complex32, torch.complex64, torch.complex128})  # fmt: skip


def dtype_refusal(dtype: torch.dtype) -> Optional[str]:
    """Why Adam cannot step a parameter of ``dtype``, or None when it can."""
    if dtype in STEPPABLE:
        return None
    return (
        f"its dtype is {dtype}; Adam steps float16, bfloat16, float32, float64 and complex tensors"
    )


Tensors = Sequence[torch.Tensor]


def _real(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors as their pairs of reals; others unchanged."""
    if t.is_complex():
        return torch.view_as_real(t.resolve_conj())
    return t


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


_REAL_OF = {torch.complex32: torch.float16, torch.complex64: torch.float32,
            torch.complex128: torch.float64}  # fmt: skip


def round_to(x: float, dtype: torch.dtype) -> float:
    """The float64 ``x`` rounded once to ``dtype`` (C), as a Python float holding that value.

    Passing already-rounded scalars makes every torch kernel see exactly ``k.x``, whatever
    precision it converts scalars to.
    """
    if dtype == torch.float64:
        return float(x)
    return float(torch.tensor(x, dtype=torch.float64).to(dtype).item())


def hyper(cfg: Any, step: int) -> dict[str, float]:
    """The float64 per-step scalars of docs/NUMERICS.md: step_size and √bc2 of update ``step``."""
    bc1 = 1.0 - cfg.beta1**step
    bc2 = 1.0 - cfg.beta2**step
    sqrt_bc2 = math.sqrt(bc2)
    if cfg.optimized_update:
        step_size = cfg.lr * sqrt_bc2 / bc1
    else:
        step_size = cfg.lr / bc1
    return {"step_size": step_size, "sqrt_bc2": sqrt_bc2}


def decay_factor(cfg: Any) -> Optional[float]:
    """θ's decoupled decay factor (float64), or None where there is none or it is exactly 1.

    As the spec's decay and the core, the factor is computed for λ = 0 too: 1 − α·0 is NaN
    for α = inf. Multiplying by exactly 1 changes no bit, so it is skipped."""
    if not cfg.weight_decouple:
        return None
    factor = 1.0 - cfg.weight_decay if cfg.absolute else 1.0 - cfg.lr * cfg.weight_decay
    return None if factor == 1.0 else factor


def writable(*lists: Optional[Sequence[Optional[torch.Tensor]]]) -> Any:
    """``torch.inference_mode()`` where a tensor to be written was made under it, else a no-op.

    torch refuses in-place writes to such a tensor outside inference mode, which would stop a
    step part way; the Rust core writes them as any kernel writing through ``data_ptr`` does.
    In inference mode, in-place ops on other tensors still bump their version counters."""
    if not torch.is_inference_mode_enabled():
        for lst in lists:
            if lst and any(t is not None and t.is_inference() for t in lst):
                return torch.inference_mode()
    return contextlib.nullcontext()


def foreach_adam(
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    max_exp_avg_sqs: Optional[Sequence[torch.Tensor]],
    compensations: Optional[Sequence[Optional[torch.Tensor]]],
    steps: Sequence[int],
    seeds: Sequence[int],
    cfg: Any,
    *,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    label: Optional[Callable[[int], str]] = None,
    alone: Optional[Sequence[int]] = None,
    defer: bool = False,
) -> Optional[Callable[[], None]]:
    """One Adam step of every parameter in the lists, in place (docs/NUMERICS.md, bit for bit).

    Lists are aligned per parameter. ``steps[i]`` is t after this update (>= 1);
    ``max_exp_avg_sqs`` is given iff ``cfg.amsgrad``; ``compensations`` iff
    ``cfg.rounding == "kahan"`` (None entries for parameters that are not 16-bit); ``seeds[i]``
    is parameter i's stochastic-rounding seed. ``cfg`` has ``lr, beta1, beta2, eps,
    weight_decay`` (floats), ``weight_decouple, absolute, optimized_update, maximize, amsgrad``
    (bools) and ``rounding`` ("nearest", "stochastic" or "kahan"). ``grad_scale``: gradients
    are divided by it first; ``found_inf`` nonzero: nothing changes. Gradients are never
    written.

    All or nothing: every buffer is checked by :func:`check` before anything is written, and a
    refusal raises ``RuntimeError`` naming ``label(i)`` (default ``params[i]``) and the reason.
    Parameters whose memory overlaps another's are stepped one at a time in list order, as
    torch's for-loop would. ``alone``: what :func:`check` returned for these very lists, when
    the caller has already run it (the checks are then not repeated).

    ``defer``: computes the new values of every parameter that overlaps no other now, writing
    nothing, and returns the function that writes them (then steps the overlapping ones, in
    order). A caller that steps other paths too runs them in between, so that an error of
    these ops (a tensor subclass's own code, say) leaves every path's tensors as they were.
    """
    # By the parameter's own dtype, so that a batch is all complex or all real.
    todo, together = batches("foreach_adam", lambda p: (p.device, p.dtype), params, grads,
                             exp_avgs, exp_avg_sqs, max_exp_avg_sqs, compensations, steps,
                             seeds, cfg, label, alone)  # fmt: skip
    written = (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, compensations)

    def compute(batch: tuple[Any, list[int]]) -> Callable[[], None]:
        (device, dtype), idx = batch
        return _step_group(
            device, dtype, idx, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
            compensations, steps, seeds, cfg, grad_scale, found_inf,
        )  # fmt: skip

    # The batches that overlap nothing are computed before any is written (also without
    # `defer`, so that both ways fail alike); an overlapping one sees the writes before it.
    with writable(*written):
        writes = [compute(batch) for batch in todo[:together]]

    def commit() -> None:
        with writable(*written):
            for write in writes:
                write()
            for batch in todo[together:]:
                compute(batch)()

    if defer:
        return commit
    commit()
    return None


def batches(
    fn: str,
    key: Callable[[torch.Tensor], Any],
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    max_exp_avg_sqs: Optional[Sequence[torch.Tensor]],
    compensations: Optional[Sequence[Optional[torch.Tensor]]],
    steps: Sequence[int],
    seeds: Sequence[int],
    cfg: Any,
    label: Optional[Callable[[int], str]],
    alone: Optional[Sequence[int]],
) -> tuple[list[tuple[Any, list[int]]], int]:
    """The batches a step of these lists runs, in order, after checking them all (unless
    ``alone`` is what :func:`check` returned for them): the parameters by ``key``, then each
    parameter that overlaps another on its own, in list order; and how many of them come
    first, overlapping nothing."""
    n = len(params)
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("steps", steps), ("seeds", seeds)):  # fmt: skip
        if len(lst) != n:
            raise ValueError(f"{fn}: {name} has {len(lst)} entries, params {n}")
    if alone is None:
        alone = check(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, compensations, steps, cfg,
            label=label,
        )  # fmt: skip
    seq = set(alone)
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        if i not in seq:
            groups.setdefault(key(p), []).append(i)
    # Memory-disjoint from every buffer the others write, so their order does not matter.
    return list(groups.items()) + [(key(params[i]), [i]) for i in sorted(seq)], len(groups)


_ROLES = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "compensation")
_GRAD = 1  # the one role that is only read


def check(
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    max_exp_avg_sqs: Optional[Sequence[torch.Tensor]],
    compensations: Optional[Sequence[Optional[torch.Tensor]]],
    steps: Sequence[int],
    cfg: Any,
    *,
    label: Optional[Callable[[int], str]] = None,
) -> list[int]:
    """Checks every buffer :func:`foreach_adam` would read or write; writes nothing.

    Raises ``RuntimeError("{label(i)}: {reason}")`` for what torch's Adam refuses or what these
    ops cannot write faithfully (the Rust core's wording where it has the same refusal): a
    parameter that is not floating-point or complex, a buffer that is not a strided tensor on
    the parameter's device with its dtype and shape, a written buffer that is a conjugate view
    or overlaps itself, a 16-bit parameter without its compensation under
    ``rounding="kahan"``, two buffers of one parameter sharing memory. Returns, in order, the
    parameters to step one at a time: those whose memory overlaps another parameter's where
    one of them writes it.
    """
    n = len(params)
    name = label if label is not None else (lambda i: f"params[{i}]")
    if cfg.rounding not in ("nearest", "stochastic", "kahan"):
        raise ValueError(f"foreach_adam: unknown rounding {cfg.rounding!r}")
    amsgrad, kahan = cfg.amsgrad, cfg.rounding == "kahan"
    if amsgrad and (max_exp_avg_sqs is None or len(max_exp_avg_sqs) != n):
        raise ValueError("foreach_adam: amsgrad needs one max_exp_avg_sq per parameter")
    if kahan and (compensations is None or len(compensations) != n):
        raise ValueError("foreach_adam: kahan rounding needs a compensation entry per parameter")
    # Per device (-1 for the CPU, the index for CUDA, else the device): the first and end
    # bytes of every buffer with memory, and the parameters on it.
    los: dict[Any, list[int]] = {}
    his: dict[Any, list[int]] = {}
    owners: dict[Any, list[int]] = {}
    exact = _EXACT
    for i, p in enumerate(params):
        if steps[i] < 1:
            raise ValueError(f"foreach_adam: steps[{i}] = {steps[i]}; expected >= 1")
        if not isinstance(p, torch.Tensor):
            raise RuntimeError(f"{name(i)}: it is a {type(p).__name__}, not a tensor")
        dtype = p.dtype
        if dtype not in STEPPABLE:
            # Integers would truncate the moments; float8 and the like have no arithmetic, so
            # they would fail part way through the step.
            raise RuntimeError(f"{name(i)}: {dtype_refusal(dtype)}")
        if kahan and compensations[i] is None and dtype in _rounding.SIXTEEN_BIT:  # type: ignore[index]
            raise RuntimeError(
                f"{name(i)}: rounding='kahan' needs a compensation buffer for a 16-bit parameter"
            )
        if p.is_cpu:
            key: Any = -1
            cuda: Optional[bool] = False
        elif p.is_cuda:
            key, cuda = p.get_device(), True
        else:
            key, cuda = p.device, None
        # The usual buffer (an exact dense real tensor like its parameter, on the CPU or a CUDA
        # device) is checked with a few cheap calls; anything else by _refusal.
        fast = cuda is not None and not dtype.is_complex and type(p) in exact
        shape = p.shape
        lo = los.get(key)
        if lo is None:
            lo, hi, own = los[key], his[key], owners[key] = [], [], []
        else:
            hi, own = his[key], owners[key]
        own.append(i)
        bufs = _buffers(i, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, compensations)
        for r, t in bufs:
            if fast and (
                r == 0
                or (
                    type(t) in exact
                    and t.dtype is dtype
                    and (t.is_cuda and t.get_device() == key if cuda else t.is_cpu)
                    and t.shape == shape
                )
            ):
                if t.is_contiguous():
                    nbytes = t.nbytes
                    if nbytes:
                        ptr = t.data_ptr()
                        lo.append(ptr)
                        hi.append(ptr + nbytes)
                    continue
            why = _refusal(r, t, dtype, p.device, shape)
            if why is not None:
                raise RuntimeError(f"{name(i)}: {why}")
            for x in inner_tensors(t):  # a wrapper subclass: the memory it wraps
                sp = span(x)
                if sp is not None:
                    lo.append(sp[0])
                    hi.append(sp[1])
    alone: set[int] = set()
    for key, lo in los.items():
        # Nonempty spans are pairwise disjoint iff, with their first and end bytes sorted
        # apart, the k-th smallest end is at most the (k+1)-th smallest first byte: one sort
        # each and a comparison at C speed in the usual case.
        lo.sort()
        hi = his[key]
        hi.sort()
        if not all(map(operator.le, hi, itertools.islice(lo, 1, None))):
            _overlaps(owners[key], params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                      compensations, alone, name)  # fmt: skip
    return sorted(alone)


def _buffers(
    i: int,
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    max_exp_avg_sqs: Optional[Sequence[torch.Tensor]],
    compensations: Optional[Sequence[Optional[torch.Tensor]]],
) -> list[tuple[int, Any]]:
    """Parameter i's buffers as (role, buffer); ``_ROLES[role]`` names them."""
    bufs = [(0, params[i]), (1, grads[i]), (2, exp_avgs[i]), (3, exp_avg_sqs[i])]
    if max_exp_avg_sqs is not None:
        bufs.append((4, max_exp_avg_sqs[i]))
    if compensations is not None and compensations[i] is not None:
        bufs.append((5, compensations[i]))
    return bufs


def _refusal(
    r: int, t: Any, dtype: torch.dtype, device: torch.device, shape: torch.Size
) -> Optional[str]:
    """Why buffer ``t`` (role ``_ROLES[r]``) of a parameter of ``dtype``, ``device`` and
    ``shape`` cannot be stepped, or None."""
    role = _ROLES[r]
    if not isinstance(t, torch.Tensor):
        return f"its {role} is {type(t).__name__}, not a tensor"
    if t.layout != torch.strided:
        return f"its {role}'s layout is {t.layout}, not torch.strided"
    if t.device != device:
        return f"its {role} is on device {t.device}, the parameter on {device}"
    if t.dtype != dtype:
        return f"its {role} has another dtype than it ({t.dtype}, the parameter {dtype})"
    if t.shape != shape:
        return f"its {role} has shape {tuple(t.shape)} but the parameter has {tuple(shape)}"
    if r == _GRAD:
        return None
    # Written buffers: a conjugate view would be written through a resolved copy and the
    # result lost; an expanded view's elements would each be written many times.
    if t.is_conj():
        return (
            f"its {role} is a conjugate view (is_conj() is set); it is written in place, "
            "so resolve it (resolve_conj()) first"
        )
    if not t.is_contiguous() and self_overlaps(t):
        return (
            f"its {role} has elements that share memory (an expanded view?); it is written in place"
        )
    return None


def self_overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory, by the core's own proof
    (``_core.non_overlapping``: strides sorted, each must pass the reach of the smaller ones),
    so that every path refuses the same written views."""
    return t.numel() > 1 and not _core.non_overlapping(tuple(t.shape), t.stride())


def span(t: torch.Tensor) -> Optional[tuple[int, int]]:
    """The bytes ``[lo, hi)`` a tensor's view reaches, or None where it has no memory of its own
    to reach (empty, or a wrapper subclass without storage)."""
    try:
        ptr = t.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if t.nbytes == 0 or ptr == 0:
        return None
    return extent(t, ptr)


def inner_tensors(t: Any, depth: int = 0) -> list[torch.Tensor]:
    """The tensors holding ``t``'s memory: itself where it has memory of its own, and for a
    subclass that says what it wraps (``__tensor_flatten__``) those tensors, recursively; a
    wrapper that does not say is itself (with no memory to see)."""
    if not isinstance(t, torch.Tensor):
        return []
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or depth > 8:
        return [t]
    try:
        names, _ctx = flatten()
        inner = [getattr(t, name) for name in names]
    except Exception:  # a subclass whose flattening fails: its own memory, if any
        return [t]
    own = [t] if span(t) is not None else []
    return own + [x for i in inner for x in inner_tensors(i, depth + 1)]


def extent(t: torch.Tensor, ptr: int) -> tuple[int, int]:
    """The bytes ``[lo, hi)`` a non-empty view whose first element is at ``ptr`` reaches."""
    if t.is_contiguous():
        return ptr, ptr + t.nbytes
    size = t.element_size()
    lo = hi = ptr
    for d, s in zip(t.shape, t.stride()):
        if s < 0:
            lo += (d - 1) * s * size
        else:
            hi += (d - 1) * s * size
    return lo, hi + size


def _overlaps(
    owners: list[int],
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    max_exp_avg_sqs: Optional[Sequence[torch.Tensor]],
    compensations: Optional[Sequence[Optional[torch.Tensor]]],
    alone: set[int],
    name: Callable[[int], str],
) -> None:
    """Adds to ``alone`` each of ``owners`` whose buffers meet another parameter's where one of
    the two is written; raises where two buffers of one parameter meet."""
    spans = []
    for i in owners:
        for r, t in _buffers(i, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                             compensations):  # fmt: skip
            for x in inner_tensors(t):
                sp = span(x)
                if sp is not None:
                    spans.append((sp[0], sp[1], i, r))
    spans.sort()
    active: list[tuple[int, int, int, int]] = []
    for cur in spans:
        lo, _, i, r = cur
        active = [a for a in active if a[1] > lo]
        for _, _, j, q in active:
            if r == q == _GRAD or (i, r) == (j, q):
                continue  # both only read, or two tensors one wrapper subclass wraps
            if i == j:
                raise RuntimeError(f"{name(i)}: its {_ROLES[r]} shares memory with its {_ROLES[q]}")
            alone.add(i)
            alone.add(j)
        active.append(cur)


def _step_group(
    device: torch.device,
    dtype: torch.dtype,
    idx: list[int],
    params: Tensors,
    grads: Tensors,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    max_exp_avg_sqs: Optional[Sequence[torch.Tensor]],
    compensations: Optional[Sequence[Optional[torch.Tensor]]],
    steps: Sequence[int],
    seeds: Sequence[int],
    cfg: Any,
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
) -> Callable[[], None]:
    """Computes the batch's new values (writing nothing); returns the function that writes
    them."""
    # Complex tensors step as their pairs of reals, of this dtype.
    cplx = dtype.is_complex
    if cplx:
        dtype = _REAL_OF[dtype]
    real = _real if cplx else _same
    cd = _rounding.compute_dtype(dtype)
    half = dtype in _HALF
    fused = _rounding.fma_fused_by_torch(str(device), cd)

    def k(x: float) -> float:
        return round_to(x, cd)

    def load(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        # Loaded values are only read: every op below makes a new tensor, written back at the
        # end (found_inf), so tensors already in C need no copy.
        return [t.to(cd) for t in ts] if half else ts

    def through_e(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        # load(round_E(x)): the decay is its own step, rounded to the storage dtype.
        return [t.to(dtype).to(cd) for t in ts] if half else ts

    p_e = [real(params[i]) for i in idx]
    m_e = [real(exp_avgs[i]) for i in idx]
    v_e = [real(exp_avg_sqs[i]) for i in idx]
    theta = load(p_e)
    g = load([real(grads[i]) for i in idx])
    if grad_scale is not None:
        scale = grad_scale.to(device=device, dtype=cd).reshape(())
        g = torch._foreach_div(g, scale)
    if cfg.maximize:
        g = torch._foreach_neg(g)

    factor = decay_factor(cfg)
    if factor is not None:
        theta = through_e(torch._foreach_mul(theta, k(factor)))
    elif not cfg.weight_decouple and cfg.weight_decay != 0:
        wd = k(cfg.weight_decay)
        if fused:
            g = torch._foreach_add(g, theta, alpha=wd)
        else:
            g = [_rounding.fma_scalar(p, wd, x) for p, x in zip(theta, g)]
        g = through_e(g)

    m = torch._foreach_mul(load(m_e), k(cfg.beta1))
    v = torch._foreach_mul(load(v_e), k(cfg.beta2))
    omb1, omb2 = k(1.0 - cfg.beta1), k(1.0 - cfg.beta2)
    if fused:
        torch._foreach_add_(m, g, alpha=omb1)  # fma(g, omb1, m·b1), measured
        torch._foreach_addcmul_(v, g, g, value=omb2)  # fma(RN(omb2·g), g, v·b2), measured
    else:
        m = [_rounding.fma_scalar(x, omb1, y) for x, y in zip(g, m)]
        v = [_rounding.fma_square(x, omb2, y) for x, y in zip(g, v)]

    vd = v
    vmax_e: list[torch.Tensor] = []
    if cfg.amsgrad:
        assert max_exp_avg_sqs is not None
        vmax_e = [real(max_exp_avg_sqs[i]) for i in idx]
        vd = torch._foreach_maximum(load(vmax_e), v)  # torch.maximum propagates NaN

    hyp = [hyper(cfg, steps[i]) for i in idx]
    denom = [_rounding.sqrt_rn(x) for x in vd]
    if not cfg.optimized_update:
        # Tensor divisors: CUDA divides by a host scalar as a product with its reciprocal.
        divisors = _scalar_tensors([h["sqrt_bc2"] for h in hyp], cd, device)
        for d, s in zip(denom, divisors):
            d.div_(s)
    torch._foreach_add_(denom, k(cfg.eps))
    u = torch._foreach_mul(m, [k(h["step_size"]) for h in hyp])
    torch._foreach_div_(u, denom)

    rounding = cfg.rounding if half else "nearest"
    comps: list[Optional[torch.Tensor]] = [None] * len(idx)
    if rounding == "nearest":
        new_p = [x.to(dtype) for x in torch._foreach_sub(theta, u)]
    elif rounding == "stochastic":
        new_p = [
            _rounding.stochastic_round(
                th - uu, dtype, seeds[i], steps[i], _rounding.element_index(pe)
            )
            for i, th, uu, pe in zip(idx, theta, u, p_e)
        ]
    else:
        assert compensations is not None
        new_p = []
        for j, (i, th, uu) in enumerate(zip(idx, theta, u)):
            c = compensations[i]
            assert c is not None  # check() refuses a 16-bit parameter without one
            c_e = real(c)
            np_, nc = _rounding.kahan_update(th, uu, c_e, dtype)
            new_p.append(np_)
            comps[j] = nc

    skip = None
    if found_inf is not None:
        skip = found_inf.to(device=device).reshape(()) != 0

    def write(dst: list[torch.Tensor], new: list[torch.Tensor]) -> None:
        for d, x in zip(dst, new):
            if skip is not None:
                x = torch.where(skip, d, x.to(d.dtype))
            d.copy_(x)

    def write_all() -> None:
        write(p_e, new_p)
        write(m_e, m)
        write(v_e, v)
        if cfg.amsgrad:
            write(vmax_e, vd)
        if rounding == "kahan":
            assert compensations is not None
            dst = [real(c) for c in (compensations[i] for i in idx) if c is not None]
            write(dst, [c for c in comps if c is not None])

    return write_all


_SCALAR_CACHE: dict[tuple[float, torch.dtype, str], torch.Tensor] = {}


def _scalar_tensors(
    values: list[float], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """0-dim tensors on ``device`` holding each value rounded to ``dtype`` (one copy per value).

    Cached per (value, dtype, device): a step count's √bc2 is the same at every step, so the
    host-to-device copies happen once per distinct count.
    """
    out = []
    for x in values:
        key = (x, dtype, str(device))
        t = _SCALAR_CACHE.get(key)
        if t is None:
            if len(_SCALAR_CACHE) > 4096:
                _SCALAR_CACHE.clear()
            t = torch.tensor(x, dtype=torch.float64).to(dtype).to(device, non_blocking=True)
            _SCALAR_CACHE[key] = t
        out.append(t)
    return out
