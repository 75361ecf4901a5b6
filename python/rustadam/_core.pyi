"""Type stub of ``rustadam._core``, the compiled extension (PyO3, abi3).

Kept in step with ``crates/rustadam-py/src`` by tests/test_typing.py: every public name of the
module appears here with the same parameters, and nothing else does. Sections:

- module metadata;
- the torch entry points: the typed config, the checked plan of a step;
- SIMD introspection;
- the numpy entry points (``numpy_api.rs``).
"""

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, SupportsFloat, Union

import numpy as np
import numpy.typing as npt
import torch

# ---- module metadata ---------------------------------------------------------------------------

__version__: str
"""The version of the rustadam crates this extension was built from."""

# ---- torch entry points (config.rs, plan.rs, lib.rs) -------------------------------------------

Rounding = Literal["nearest", "stochastic", "kahan"]

class Config:
    """One parameter group's hyper-parameters, validated by the core's rules.

    The numbers may be any objects Python converts to float (a 1-element tensor). Invalid values
    raise ValueError with torch's messages, each value as given (``Invalid learning rate: -1``).
    """

    def __init__(
        self,
        *,
        lr: SupportsFloat = 1e-3,
        betas: tuple[SupportsFloat, SupportsFloat] = (0.9, 0.999),
        eps: SupportsFloat = 1e-16,
        weight_decay: SupportsFloat = 0.0,
        weight_decouple: bool = True,
        absolute: bool = False,
        optimized_update: bool = True,
        maximize: bool = False,
        amsgrad: bool = False,
        rounding: Rounding = "nearest",
    ) -> None: ...
    @property
    def lr(self) -> float: ...
    @property
    def beta1(self) -> float: ...
    @property
    def beta2(self) -> float: ...
    @property
    def eps(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def weight_decouple(self) -> bool: ...
    @property
    def absolute(self) -> bool: ...
    @property
    def optimized_update(self) -> bool: ...
    @property
    def maximize(self) -> bool: ...
    @property
    def amsgrad(self) -> bool: ...
    @property
    def rounding(self) -> Rounding: ...

class StepError(RuntimeError):
    """A parameter the step cannot take; ``args`` are ``(group, index, kind, reason)`` with kind
    ``"fatal"`` (no backend may step it) or ``"unsupported"`` (the core does not take it)."""

GroupInput = tuple[
    Config,
    Sequence[torch.Tensor],  # params
    Sequence[torch.Tensor],  # grads
    Sequence[torch.Tensor],  # exp_avgs
    Sequence[torch.Tensor],  # exp_avg_sqs
    Optional[Sequence[torch.Tensor]],  # max_exp_avg_sqs (exactly with amsgrad)
    Optional[Sequence[Optional[torch.Tensor]]],  # compensations (rounding="kahan")
    Sequence[int],  # steps: t after this update
    Sequence[int],  # seeds (stochastic rounding)
]

class Plan:
    """One step's buffers, read and checked, their storages held. Run once by ``execute``."""

    deferred: list[tuple[int, int, str]]
    """``(group, index, reason)`` of parameters the core leaves to torch's ops."""

    def __len__(self) -> int: ...
    def execute(
        self,
        *,
        num_threads: int,
        pool: Optional[Literal["openmp", "rayon"]] = None,
        simd: Optional[Literal["portable", "avx2", "avx512"]] = None,
        states: Optional[Sequence[dict[str, Any]]] = None,
        steps: Optional[Sequence[Any]] = None,
        written: Optional[list[torch.Tensor]] = None,
        grad_scale: Optional[float] = None,
    ) -> None:
        """Runs the step with the GIL released: first every parameter that shares no memory
        with another (one kernel call per group), then the others one at a time, in order.
        ``pool`` and ``simd`` default to ``RUSTADAM_THREAD_POOL`` and ``RUSTADAM_SIMD``. With
        ``grad_scale`` every gradient is first divided by it in place, rounded as
        ``grad.div_(grad_scale)`` rounds (a gradient whose elements share memory is refused
        before anything is written). Then, inside the call, sets ``states[i]["step"] =
        steps[i]`` and bumps the autograd version of every tensor of ``written``."""
    def roofline(self, *, num_threads: int) -> None:
        """The same loads, stores, chunks and threads as ``execute`` with trivial arithmetic
        (for benchmarks: it overwrites the buffers)."""

def plan(groups: Sequence[GroupInput], *, strict: bool = False) -> Plan:
    """Reads and checks every buffer of every group before anything is written.

    Every tensor must be exactly a ``torch.Tensor`` or ``torch.nn.Parameter`` (TypeError
    otherwise; no attribute of any other object is read). Raises :class:`StepError` for a
    parameter no backend may step (buffers of another dtype or shape, buffers of one parameter
    sharing memory, an expanded written buffer, a view outside its storage), or with ``strict``
    for one the core does not take (another device or dtype, a negative or conjugate view).
    """

def non_overlapping(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether no two elements of the view share memory, proven as the core proves it before
    writing a buffer in place (a view it cannot prove counts as overlapping)."""

def param_seed(seed: int, group: int, index: int) -> int:
    """A parameter's stochastic-rounding seed: ``seed ^ (mix(group) << 32) ^ mix(index)`` with
    the 32-bit hash of docs/NUMERICS.md (each position taken mod 2**32)."""

def step_plain(
    groups: Sequence[tuple[Config, list[torch.Tensor]]],
    state: Mapping[torch.Tensor, dict[str, Any]],
    *,
    seed: int,
    num_threads: int,
) -> Optional[list[torch.Tensor]]:
    """One step of ``rustadam.Adam`` when every parameter is plain: exact tensors, each with a
    gradient already has its state (an int ``step`` and the moments; ``max_exp_avg_sq`` with
    amsgrad), and the core takes every buffer. Gathers every group's lists from the
    parameters' ``.grad`` and ``state``, plans, steps, advances the step counts and bumps the
    version counters of the tensors it wrote (all before returning); returns those tensors.
    Returns None having changed nothing otherwise."""

def adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[int],
    config: Config,
    *,
    max_exp_avg_sqs: Optional[Sequence[torch.Tensor]] = None,
    compensations: Optional[Sequence[Optional[torch.Tensor]]] = None,
    seeds: Optional[Sequence[int]] = None,
    num_threads: Optional[int] = None,
    pool: Optional[Literal["openmp", "rayon"]] = None,
    simd: Optional[Literal["portable", "avx2", "avx512"]] = None,
) -> None:
    """One Adam step over one group's CPU tensors, in place: :func:`plan` with ``strict`` and
    :meth:`Plan.execute` in one call. ``steps[i]`` is t after this update (≥ 1);
    ``num_threads`` is 1 to 1024 (None: one thread)."""

# ---- SIMD introspection ------------------------------------------------------------------------

def simd_levels() -> tuple[str, ...]:
    """The SIMD levels this CPU runs, from the slowest; the last is used by default.

    A subset of ``("portable", "avx2", "avx512")``; ``"portable"`` is always there.
    """

# ---- numpy entry points (numpy_api.rs) ---------------------------------------------------------

FloatArray = npt.NDArray[Union[np.float32, np.float64]]
"""A C-contiguous float32 or float64 array."""

def numpy_adam_step(
    param: FloatArray,
    grad: FloatArray,
    exp_avg: FloatArray,
    exp_avg_sq: FloatArray,
    step: int,
    config: Config,
    *,
    num_threads: Optional[int] = None,
) -> None:
    """One Adam step of one parameter's numpy arrays, in place.

    ``param``, ``exp_avg`` and ``exp_avg_sq`` are updated; ``grad`` is only read. All four are
    C-contiguous float32 or float64 arrays of one dtype and shape. ``step`` is t after this
    update (1 on the first). The GIL is released while the kernel runs.

    Raises:
        TypeError, ValueError: naming the argument at fault, before anything is written.
    """

def numpy_adam_step_many(
    params: Sequence[FloatArray],
    grads: Sequence[FloatArray],
    exp_avgs: Sequence[FloatArray],
    exp_avg_sqs: Sequence[FloatArray],
    steps: Sequence[int],
    config: Config,
    *,
    num_threads: Optional[int] = None,
    states: Optional[Sequence[dict[str, Any]]] = None,
    indices: Optional[Sequence[int]] = None,
) -> None:
    """One Adam step of many parameters' numpy arrays in one call.

    Lists of equal length; a parameter's four arrays share a dtype, parameters may differ.
    With ``states``, ``states[i]["step"]`` is set to ``steps[i]`` once the arrays are written,
    inside the call; ``indices[i]`` is entry ``i``'s index in messages (``params[indices[i]]``).

    Raises:
        TypeError, ValueError: naming the argument at fault; nothing is written unless every
            entry passes its checks.
    """
