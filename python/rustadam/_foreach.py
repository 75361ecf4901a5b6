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

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch

from rustadam import _rounding

_HALF = (torch.float16, torch.bfloat16)
Tensors = Sequence[torch.Tensor]


def _real(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors as their pairs of reals; others unchanged."""
    if t.is_complex():
        return torch.view_as_real(t.resolve_conj())
    return t


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
    """θ's decoupled decay factor (float64), or None where there is no decoupled decay."""
    if not cfg.weight_decouple or cfg.weight_decay == 0:
        return None
    return 1.0 - cfg.weight_decay if cfg.absolute else 1.0 - cfg.lr * cfg.weight_decay


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
) -> None:
    """One Adam step of every parameter in the lists, in place (docs/NUMERICS.md, bit for bit).

    Lists are aligned per parameter. ``steps[i]`` is t after this update (>= 1);
    ``max_exp_avg_sqs`` is given iff ``cfg.amsgrad``; ``compensations`` iff
    ``cfg.rounding == "kahan"`` (None entries for parameters that are not 16-bit); ``seeds[i]``
    is parameter i's stochastic-rounding seed. ``cfg`` has ``lr, beta1, beta2, eps,
    weight_decay`` (floats), ``weight_decouple, absolute, optimized_update, maximize, amsgrad``
    (bools) and ``rounding`` ("nearest", "stochastic" or "kahan"). ``grad_scale``: gradients
    are divided by it first; ``found_inf`` nonzero: nothing changes. Gradients are never
    written.
    """
    n = len(params)
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("steps", steps), ("seeds", seeds)):  # fmt: skip
        if len(lst) != n:
            raise ValueError(f"foreach_adam: {name} has {len(lst)} entries, params {n}")
    if cfg.amsgrad and (max_exp_avg_sqs is None or len(max_exp_avg_sqs) != n):
        raise ValueError("foreach_adam: amsgrad needs one max_exp_avg_sq per parameter")
    if cfg.rounding not in ("nearest", "stochastic", "kahan"):
        raise ValueError(f"foreach_adam: unknown rounding {cfg.rounding!r}")
    if cfg.rounding == "kahan" and (compensations is None or len(compensations) != n):
        raise ValueError("foreach_adam: kahan rounding needs a compensation entry per parameter")
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        if steps[i] < 1:
            raise ValueError(f"foreach_adam: steps[{i}] = {steps[i]}; expected >= 1")
        groups.setdefault((p.device, _real(p).dtype), []).append(i)
    for (device, dtype), idx in groups.items():
        _step_group(
            device, dtype, idx, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
            compensations, steps, seeds, cfg, grad_scale, found_inf,
        )  # fmt: skip


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
) -> None:
    cd = _rounding.compute_dtype(dtype)
    half = dtype in _HALF
    fused = _rounding.fma_fused_by_torch(str(device), cd)

    def k(x: float) -> float:
        return round_to(x, cd)

    def load(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        # Always a new tensor: results are written back only at the end (found_inf).
        return [t.to(cd, copy=True) for t in ts]

    def through_e(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        # load(round_E(x)): the decay is its own step, rounded to the storage dtype.
        return [t.to(dtype).to(cd) for t in ts] if half else ts

    p_e = [_real(params[i]) for i in idx]
    m_e = [_real(exp_avgs[i]) for i in idx]
    v_e = [_real(exp_avg_sqs[i]) for i in idx]
    theta = load(p_e)
    g = load([_real(grads[i]) for i in idx])
    if grad_scale is not None:
        scale = grad_scale.to(device=device, dtype=cd).reshape(())
        torch._foreach_div_(g, scale)
    if cfg.maximize:
        torch._foreach_neg_(g)

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
        vmax_e = [_real(max_exp_avg_sqs[i]) for i in idx]
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
            if c is None:
                raise ValueError(f"foreach_adam: kahan rounding needs compensations[{i}]")
            c_e = _real(c)
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

    write(p_e, new_p)
    write(m_e, m)
    write(v_e, v)
    if cfg.amsgrad:
        write(vmax_e, vd)
    if rounding == "kahan":
        assert compensations is not None
        dst = [_real(c) for c in (compensations[i] for i in idx) if c is not None]
        write(dst, [c for c in comps if c is not None])


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
