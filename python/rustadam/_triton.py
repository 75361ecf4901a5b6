# ruff: noqa: ANN001  (triton reads annotations of @triton.jit arguments as their types)
"""The Triton path: docs/NUMERICS.md's Adam, one kernel launch per (device, dtype) for all tensors.

Design:

- A device-side **pointer table** (int64, one row per tensor): the data pointers of θ, g, m, v,
  v_max and the Kahan compensation, the element count and the stochastic-rounding key
  ``key(seed, t)``; a **scalar table** in the compute type C (float32, or float64 for float64):
  the global hyper-parameters rounded once to C, then per tensor ``step_size`` and ``√bc2``
  (computed in float64 on the host, once per distinct step count); and a prefix sum of each
  tensor's block count. The three are packed into one int64 host tensor and reach the device
  in one copy (:func:`build_tables`).
- Host work per call does not grow with per-tensor Python arithmetic: per tensor only its
  pointers, element count and layout are read (contiguous lists without a Python loop); step
  sizes come from the distinct step counts, keys from vectorised int64 hashing, and every
  scalar is rounded to C in one conversion.
- A 1-D grid over the blocks of all tensors; a program finds its tensor by binary search in the
  prefix sum, casts the table's int64 addresses to typed pointers and makes one pass over its
  ``BLOCK`` elements: reads θ, g, m, v once and writes θ, m, v once.
- Math in C with one rounding to the storage dtype E, ``tl.sqrt_rn``/``tl.div_rn`` for the
  square root and divisions and ``tl.fma`` exactly where docs/NUMERICS.md has an fma; the kernel is
  compiled with ``enable_fp_fusion=False`` so that no other multiply-add is contracted.
- ``grad_scale`` and ``found_inf`` are read from device memory by the kernel (no host sync): a
  nonzero ``found_inf`` masks every store.
- The element index i of stochastic rounding is the element's memory offset, which is what
  :func:`rustadam._rounding.element_index` gives for dense tensors. Tensors that are not dense,
  or whose gradient/state is laid out differently from the parameter, are stepped on dense
  copies (in the parameter's layout when it is dense, else row-major) written back afterwards.

Under ``TRITON_INTERPRET=1`` (CPU tensors) the same table design works: the interpreter runs
kernels on host memory and implements the int64→pointer cast as a bitcast of the address, so
the pointer table is the real addresses of the CPU tensors. (Under the interpreter with CUDA
tensors it would not: the interpreter copies only kernel *arguments* to the host.)

``import rustadam._triton`` does not import triton; :func:`available` says whether it can run.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from rustadam import _rounding
from rustadam._foreach import batches, decay_factor, hyper, writable

_HALF = (torch.float16, torch.bfloat16)
# The real dtype a complex tensor is stepped as (its view_as_real pairs).
_REAL_OF = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}
_E_KIND = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
# Table columns (int64): θ, g, m, v, v_max, compensation pointers, numel, key.
_COLS = 8
# Scalar table: global scalars first, then (step_size, √bc2) per tensor.
_GLOBALS = ("factor", "wd", "b1", "omb1", "b2", "omb2", "eps", "unused")
BLOCK = 1024
_MASK32 = 0xFFFFFFFF

__all__ = ["BLOCK", "Tables", "available", "build_tables", "interpreted", "triton_adam"]


def available() -> bool:
    """Whether triton is importable here (it may still lack a GPU: see :func:`interpreted`)."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether triton runs kernels in its interpreter (``TRITON_INTERPRET=1``), on CPU tensors."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_JIT_MODULE = "rustadam._triton_jit"


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, built on first use.

    Triton needs ``@triton.jit`` functions at module level with their source in a file, and
    ``import rustadam._triton`` must not import triton (``TRITON_INTERPRET`` is read when
    triton is first imported, and triton may be missing). So this file is loaded a second time
    under the name ``rustadam._triton_jit``, whose guarded block at the end defines the kernel.
    """
    mod = sys.modules.get(_JIT_MODULE)
    if mod is None:
        spec = importlib.util.spec_from_file_location(_JIT_MODULE, __file__)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[_JIT_MODULE] = mod
        spec.loader.exec_module(mod)
    return mod._adam_kernel


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


def _dense_like(target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` itself where it is laid out like ``target``, else a copy in ``target``'s strides.
    A negative view is always copied: its memory holds −x, which the kernel would read as x."""
    if (t.stride() == target.stride() or t.numel() <= 1) and not t.is_neg():
        return t
    out = torch.empty_strided(target.shape, target.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def triton_adam(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
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
) -> None:
    """One Adam step of every parameter, in place, with one Triton launch per (device, dtype).

    The arguments are those of :func:`rustadam._foreach.foreach_adam`, and the results equal
    its results bit for bit. Tensors must be on a device triton runs on (CPU tensors only
    under ``TRITON_INTERPRET=1``).

    All or nothing, with the foreach path's checks (:func:`rustadam._foreach.check`, run here
    unless the caller passes what it returned as ``alone``): a refusal raises
    ``RuntimeError("{label(i)}: {reason}")`` before any launch, and parameters whose memory
    overlaps another's get a launch each, in list order, after the others.
    """
    todo, _ = batches("triton_adam", lambda p: (p.device, _REAL_OF.get(p.dtype, p.dtype)), params,
                   grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, compensations, steps, seeds,
                   cfg, label, alone)  # fmt: skip
    # The kernel writes through pointers; write-backs of work copies are torch ops.
    with writable(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, compensations):
        for (device, dtype), idx in todo:
            idx = [i for i in idx if params[i].numel()]  # an empty grid is not launched
            if not idx:
                continue
            _launch(device, dtype, idx, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                    compensations, steps, seeds, cfg, grad_scale, found_inf)  # fmt: skip


def _launch(
    device: torch.device,
    dtype: torch.dtype,
    idx: list[int],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Optional[Sequence[torch.Tensor]],
    compensations: Optional[Sequence[Optional[torch.Tensor]]],
    steps: Sequence[int],
    seeds: Sequence[int],
    cfg: Any,
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
) -> None:
    if dtype not in _E_KIND:
        raise TypeError(f"triton_adam: unsupported dtype {dtype}")
    cd = _rounding.compute_dtype(dtype)
    half = dtype in _HALF
    rounding = cfg.rounding if half else "nearest"
    tables = build_tables(device, dtype, idx, params, grads, exp_avgs, exp_avg_sqs,
                          max_exp_avg_sqs, compensations, steps, seeds, cfg)  # fmt: skip
    factor = decay_factor(cfg)
    l2 = not cfg.weight_decouple and cfg.weight_decay != 0
    gs = (
        grad_scale.to(device=device, dtype=cd).reshape(1)
        if grad_scale is not None
        else tables.scalars  # unused dummy
    )
    fi = (
        found_inf.to(device=device, dtype=torch.float32).reshape(1)
        if found_inf is not None
        else tables.scalars
    )
    kernel = _kernel()
    kernel[(tables.blocks,)](
        tables.table, tables.scalars, tables.starts, len(idx), gs, fi,
        E_KIND=_E_KIND[dtype],
        DECAY=1 if factor is not None else 2 if l2 else 0,
        OPTIMIZED=bool(cfg.optimized_update),
        MAXIMIZE=bool(cfg.maximize),
        AMSGRAD=bool(cfg.amsgrad),
        ROUND={"nearest": 0, "stochastic": 1, "kahan": 2}[rounding],
        HAS_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        SEARCH_STEPS=max(1, math.ceil(math.log2(len(idx) + 1))),
        BLOCK=BLOCK,
        enable_fp_fusion=False,
    )  # fmt: skip
    for orig, w in tables.write_back:
        orig.copy_(w)
    del tables


class Tables(NamedTuple):
    """One launch's device-side tables, all views of one tensor (one host-to-device copy)."""

    #: int64 [n, 8]: θ, g, m, v, v_max, compensation pointers, numel, key(seed, t).
    table: torch.Tensor
    #: C [8 + 2n]: the global scalars (``_GLOBALS``), then (step_size, √bc2) per tensor.
    scalars: torch.Tensor
    #: int64 [n + 1]: prefix sum of the tensors' block counts.
    starts: torch.Tensor
    #: The grid size (total block count).
    blocks: int
    #: Work copies the table points into, alive until the kernel has run.
    keep: list[torch.Tensor]
    #: (original, work copy) pairs to copy back after the kernel.
    write_back: list[tuple[torch.Tensor, torch.Tensor]]


def build_tables(
    device: torch.device,
    dtype: torch.dtype,
    idx: list[int],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Optional[Sequence[torch.Tensor]],
    compensations: Optional[Sequence[Optional[torch.Tensor]]],
    steps: Sequence[int],
    seeds: Sequence[int],
    cfg: Any,
) -> Tables:
    """The host part of a launch: pointer, scalar and block tables for tensors ``idx``.

    Per tensor only what needs the tensor itself runs in Python: its pointers, element count
    and a layout check (contiguous buffers take a fast path; others go through dense work
    copies). Everything that depends only on the step counts and seeds is vectorised: the
    float64 hyper-parameters of :func:`rustadam._foreach.hyper` once per *distinct* step count,
    rounded to C in one conversion, and the stochastic-rounding keys with
    :func:`rustadam._rounding.mix` on int64 tensors. The three tables are packed into one int64
    host tensor and copied to ``device`` once.
    """
    cd = _rounding.compute_dtype(dtype)
    half = dtype in _HALF
    rounding = cfg.rounding if half else "nearest"
    amsgrad = bool(cfg.amsgrad)
    kahan = rounding == "kahan"
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("triton_adam: amsgrad needs one max_exp_avg_sq per parameter")
    n = len(idx)
    lists = [
        [params[i] for i in idx], [grads[i] for i in idx],
        [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx],
    ]  # fmt: skip
    if amsgrad:
        lists.append([max_exp_avg_sqs[i] for i in idx])  # type: ignore[index]
    if kahan:
        comps = [compensations[i] if compensations is not None else None for i in idx]
        for i, c in zip(idx, comps):
            if c is None:
                raise ValueError(f"triton_adam: kahan rounding needs compensations[{i}]")
        lists.append(comps)
    tensor = torch.Tensor
    cplx = list(map(tensor.is_complex, lists[0]))
    numel = list(map(tensor.numel, lists[0]))
    keep: list[torch.Tensor] = []
    write_back: list[tuple[torch.Tensor, torch.Tensor]] = []
    if (
        all(all(map(tensor.is_contiguous, lst)) for lst in lists)
        and not any(any(map(tensor.is_neg, lst)) for lst in lists)
        and not (any(cplx) and any(any(map(tensor.is_conj, lst)) for lst in lists))
    ):
        # The common case, without a Python loop over tensors: one row-major layout for all,
        # so memory offsets are the flat indices (a complex tensor's real view has the same
        # address and twice the elements).
        cols = [list(map(tensor.data_ptr, lst)) for lst in lists]
        if any(cplx):
            numel = [k * 2 if c else k for k, c in zip(numel, cplx)]
    else:
        rows = [_row(*bufs, keep=keep, write_back=write_back) for bufs in zip(*lists)]
        cols = [list(col) for col in zip(*rows)] if rows else [[] for _ in lists]
        numel = cols.pop()
    zeros = [0] * n
    while len(cols) < 6:
        cols.append(zeros)
    if not amsgrad and kahan:
        cols[4], cols[5] = zeros, cols[4]
    table = torch.from_numpy(np.array([*cols, numel, zeros], dtype=np.int64).T.copy())
    numel = table[:, 6]
    starts = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum((numel + (BLOCK - 1)) // BLOCK, 0, out=starts[1:])
    blocks = int(starts[-1])
    # Per-step scalars once per distinct step count (Python float64, as the other paths), one
    # vectorised rounding to C for all of them.
    step_t = torch.from_numpy(np.fromiter((steps[i] for i in idx), np.int64, n))
    distinct, inverse = torch.unique(step_t, return_inverse=True)
    per_step = [hyper(cfg, t) for t in distinct.tolist()]
    per_step_t = torch.tensor(
        [[h["step_size"], h["sqrt_bc2"]] for h in per_step], dtype=torch.float64
    )
    factor = decay_factor(cfg)
    glob = torch.tensor(
        [factor if factor is not None else 1.0, cfg.weight_decay, cfg.beta1, 1.0 - cfg.beta1,
         cfg.beta2, 1.0 - cfg.beta2, cfg.eps, 0.0],
        dtype=torch.float64,
    )  # fmt: skip
    # 8 + 2n values: an even count, so float32 scalars fill whole int64 words of the packing.
    scal64 = torch.cat([glob, per_step_t[inverse].reshape(-1)])
    scalars = scal64.to(cd)  # each value rounded to nearest once, as _foreach.round_to does
    if rounding == "stochastic":
        seed_lo = torch.tensor([seeds[i] & _MASK32 for i in idx], dtype=torch.int64)
        seed_hi = torch.tensor([(seeds[i] >> 32) & _MASK32 for i in idx], dtype=torch.int64)
        mix = _rounding.mix
        table[:, 7] = mix(mix(mix(seed_lo) ^ seed_hi) ^ (step_t & _MASK32))
    packed = torch.cat([table.view(-1), starts, scalars.view(torch.int64)])
    packed = packed.to(device, non_blocking=True)
    a, b = _COLS * n, _COLS * n + n + 1
    return Tables(
        table=packed[:a].view(n, _COLS),
        scalars=packed[b:].view(cd),
        starts=packed[a:b],
        blocks=blocks,
        keep=keep,
        write_back=write_back,
    )


def _row(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *extra: torch.Tensor,
    keep: list[torch.Tensor],
    write_back: list[tuple[torch.Tensor, torch.Tensor]],
) -> list[int]:
    """One tensor's pointers (θ, g, m, v[, v_max][, compensation]) and element count.

    Contiguous buffers are used as they are. Otherwise the parameter's own layout is kept when
    it is dense (offsets are memory offsets, as :func:`rustadam._rounding.element_index`
    gives), else row-major; every buffer not laid out like it is stepped on a copy in that
    layout, written back after the kernel.
    """
    bufs = [p, g, m, v, *extra]
    if all(x.is_contiguous() and not x.is_conj() and not x.is_neg() for x in bufs):
        return [*(x.data_ptr() for x in bufs), p.numel() * (2 if p.is_complex() else 1)]
    real = [_real(x) for x in bufs]
    rp = real[0]
    target = rp if _rounding.is_dense(rp) else rp.contiguous()
    work = [_dense_like(target, x) for x in real]
    for k, (orig, w) in enumerate(zip(real, work)):
        if w is not orig:
            keep.append(w)
            if k != 1:  # gradients are read only
                write_back.append((orig, w))
    return [*(w.data_ptr() for w in work), rp.numel()]


# ---- the kernel (only in the copy _kernel() loads) ----------------------------------------------

if __name__ == _JIT_MODULE:
    import triton
    import triton.language as tl

    @triton.jit
    def _mix(x):
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x2C1B3C6D
        return x ^ (x >> 16)

    @triton.jit
    def _sqrt_rn(x, F64: tl.constexpr):
        # fp64 sqrt and division lower to sqrt.rn.f64 / div.rn.f64 (IEEE); the *_rn intrinsics
        # exist for fp32 only.
        if F64:
            return tl.sqrt(x)
        else:
            return tl.sqrt_rn(x)

    @triton.jit
    def _div_rn(x, y, F64: tl.constexpr):
        if F64:
            return x / y
        else:
            return tl.div_rn(x, y)

    @triton.jit
    def _to_e(x, E_KIND: tl.constexpr):
        """Rounds the C value x to E to nearest-even with integer ops on its bits.

        Written out because the interpreter's float narrowing truncates (and mishandles float16
        subnormals); the same code runs compiled, so both give IEEE round-to-nearest-even.
        """
        if E_KIND == 0 or E_KIND == 1:
            return x
        b = x.to(tl.uint32, bitcast=True)
        sign = (b >> 16) & 0x8000
        a = b & 0x7FFFFFFF
        if E_KIND == 2:
            h = (a + 0x7FFF + ((a >> 16) & 1)) >> 16
            h = tl.where(a > 0x7F800000, 0x7FC0, h)
            return (h | sign).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            # normal range: rebias the exponent (127 - 15 = 112) and round 13 mantissa bits
            normal = ((a + 0xFFF + ((a >> 13) & 1)) >> 13) - (112 << 10)
            # subnormal range: the integer n = RNE(|x|·2**24) is the float16 bit pattern
            e = (a >> 23).to(tl.int32)
            sh = tl.minimum(tl.maximum(126 - e, 1), 31).to(tl.uint32)
            mm = (a & 0x7FFFFF) | 0x800000
            n = mm >> sh
            rem = mm - (n << sh)
            half = (mm * 0 + 1) << (sh - 1)
            n = n + ((rem > half) | ((rem == half) & ((n & 1) == 1))).to(tl.uint32)
            n = tl.where(e < 102, 0, n)
            h = tl.where(a >= 0x38800000, normal, n)
            h = tl.where(a >= 0x477FF000, 0x7C00, h)
            h = tl.where(a > 0x7F800000, 0x7E00, h)
            return (h | sign).to(tl.uint16).to(tl.float16, bitcast=True)

    @triton.jit
    def _widen(x, E_KIND: tl.constexpr):
        """E to C exactly: bfloat16 by its bits, the high half of a float32 (the interpreter's
        own conversion loses bfloat16 subnormals); the same code runs compiled."""
        if E_KIND == 2:
            return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        elif E_KIND == 3:
            return x.to(tl.float32)
        else:
            return x

    @triton.jit
    def _adam_kernel(
        table,  # int64 [n, 8]
        scalars,  # C [8 + 2n]
        starts,  # int64 [n + 1], prefix sum of block counts
        n_tensors,
        grad_scale,  # C [1] (dummy when not HAS_SCALE)
        found_inf,  # float32 [1] (dummy when not HAS_FOUND_INF)
        E_KIND: tl.constexpr,
        DECAY: tl.constexpr,  # 0 none, 1 decoupled/absolute (factor), 2 L2
        OPTIMIZED: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        AMSGRAD: tl.constexpr,
        ROUND: tl.constexpr,  # 0 nearest, 1 stochastic, 2 kahan
        HAS_SCALE: tl.constexpr,
        HAS_FOUND_INF: tl.constexpr,
        SEARCH_STEPS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # (Computed in float32 for the 16-bit types: `_widen` gives their values.)
        if E_KIND == 0:
            ety = tl.float32
        elif E_KIND == 1:
            ety = tl.float64
        elif E_KIND == 2:
            ety = tl.bfloat16
        else:
            ety = tl.float16
        pid = tl.program_id(0)
        # Binary search: the last tensor whose first block is <= pid.
        lo = pid * 0
        hi = lo + n_tensors
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            go = tl.load(starts + mid) <= pid
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        row = table + lo.to(tl.int64) * 8
        p_ptr = tl.load(row + 0).to(tl.pointer_type(ety))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(ety))
        m_ptr = tl.load(row + 2).to(tl.pointer_type(ety))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(ety))
        numel = tl.load(row + 6)
        offs = (pid - tl.load(starts + lo)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        if HAS_FOUND_INF:
            mask = mask & ((tl.zeros_like(offs).to(tl.float32) + tl.load(found_inf)) == 0)

        step_size = tl.load(scalars + 8 + 2 * lo)
        g = _widen(tl.load(g_ptr + offs, mask=mask, other=0.0), E_KIND)
        if HAS_SCALE:
            g = _div_rn(g, tl.load(grad_scale), E_KIND == 1)
        if MAXIMIZE:
            g = -g
        theta = _widen(tl.load(p_ptr + offs, mask=mask, other=0.0), E_KIND)
        if DECAY == 1:
            theta = _widen(_to_e(theta * tl.load(scalars + 0), E_KIND), E_KIND)
        if DECAY == 2:
            g = _widen(_to_e(tl.fma(theta, tl.load(scalars + 1), g), E_KIND), E_KIND)
        m = _widen(tl.load(m_ptr + offs, mask=mask, other=0.0), E_KIND)
        v = _widen(tl.load(v_ptr + offs, mask=mask, other=0.0), E_KIND)
        m = tl.fma(g, tl.load(scalars + 3), m * tl.load(scalars + 2))
        v = tl.fma(tl.load(scalars + 5) * g, g, v * tl.load(scalars + 4))
        vd = v
        if AMSGRAD:
            vmax_ptr = tl.load(row + 4).to(tl.pointer_type(ety))
            vmax = _widen(tl.load(vmax_ptr + offs, mask=mask, other=0.0), E_KIND)
            vd = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
            tl.store(vmax_ptr + offs, _to_e(vd, E_KIND), mask=mask)
        denom = _sqrt_rn(vd, E_KIND == 1)
        if not OPTIMIZED:
            denom = _div_rn(denom, tl.load(scalars + 9 + 2 * lo), E_KIND == 1)
        denom = denom + tl.load(scalars + 6)
        u = _div_rn(step_size * m, denom, E_KIND == 1)
        if ROUND == 0:
            new_p = _to_e(theta - u, E_KIND)
        elif ROUND == 1:
            x = theta - u
            k = tl.load(row + 7).to(tl.uint32)
            r = _mix(k ^ _mix(offs.to(tl.uint32)))
            a = tl.abs(x)
            bits = a.to(tl.uint32, bitcast=True)
            if E_KIND == 2:
                y = (((bits + (r & 0xFFFF)) >> 16) << 16).to(tl.float32, bitcast=True)
            else:
                normal = (((bits + (r & 0x1FFF)) >> 13) << 13).to(tl.float32, bitcast=True)
                s = a * 16777216.0
                nf = tl.floor(s)
                up = (r & 0xFFFF).to(tl.float32) < (s - nf) * 65536.0
                sub = (nf + up.to(tl.float32)) * 5.9604644775390625e-08
                y = tl.where(a >= 6.103515625e-05, normal, sub)
            y = tl.where((x.to(tl.uint32, bitcast=True) >> 31) != 0, -y, y)
            finite = tl.abs(x) < float("inf")
            new_p = _to_e(tl.where(finite, y, x), E_KIND)
        else:
            c_ptr = tl.load(row + 5).to(tl.pointer_type(ety))
            c = _widen(tl.load(c_ptr + offs, mask=mask, other=0.0), E_KIND)
            yk = c - u
            sk = theta + yk
            new_p = _to_e(sk, E_KIND)
            tl.store(c_ptr + offs, _to_e(yk - (_widen(new_p, E_KIND) - theta), E_KIND), mask=mask)
        tl.store(p_ptr + offs, new_p, mask=mask)
        tl.store(m_ptr + offs, _to_e(m, E_KIND), mask=mask)
        tl.store(v_ptr + offs, _to_e(v, E_KIND), mask=mask)
