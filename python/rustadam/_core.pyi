"""Type stub of ``rustadam._core``, the compiled extension (PyO3, abi3).

Kept in step with ``crates/rustadam-py/src`` by tests/test_typing.py: every public name of the
module appears here with the same parameters, and nothing else does. Sections:

- module metadata;
- the torch entry points (``lib.rs``): torch tensors in, updated in place;
- SIMD introspection;
- the numpy entry points (``numpy_api.rs``).
"""

from collections.abc import Sequence
from typing import Literal, Optional, Union

import numpy as np
import numpy.typing as npt
import torch

# ---- module metadata ---------------------------------------------------------------------------

__version__: str
"""The version of the rustadam crates this extension was built from."""

# ---- torch entry points ------------------------------------------------------------------------

RejectionKind = Literal["layout", "unsupported", "fatal"]
"""Why ``adam_step`` left a parameter alone, and what its caller does about it:

- ``"layout"``: not dense as it is; step a dense copy and write it back;
- ``"unsupported"``: another device or dtype, or memory shared with another parameter of the
  call; step it with torch ops;
- ``"fatal"``: no backend gives a meaningful result (a parameter's own buffers share memory, a
  gradient of another dtype, a state of another shape); raise.
"""

Rejection = tuple[int, str, RejectionKind]
"""``(index into the argument lists, reason in words, kind)``."""

class TensorCache:
    """Metadata of the parameters and states a group passed to :func:`adam_step` last time.

    Pass the same cache for the same group at every step: a tensor seen before (the same object
    with the same data pointer) is not read again attribute by attribute. A parameter whose
    checks fail on remembered metadata is read again before anything is decided; tensors a call
    does not pass are forgotten. Gradients are never remembered.
    """

    def __init__(self) -> None: ...
    def __len__(self) -> int: ...

def adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    weight_decouple: bool,
    absolute: bool,
    optimized_update: bool,
    num_threads: int,
    strict: bool = False,
    simd: Optional[Literal["portable", "avx2", "avx512"]] = None,
    cache: Optional[TensorCache] = None,
    pool: Optional[Literal["openmp", "rayon"]] = None,
) -> tuple[bool, list[Rejection]]:
    """One fused Adam step over the CPU tensors of a parameter group, in place.

    Entry ``i`` of the four tensor lists belongs to one parameter; ``steps[i]`` is its count t
    after this update (≥ 1). Hyper-parameters as in SPEC.md; ``weight_decay``,
    ``weight_decouple`` and ``absolute`` select the decay like ``WeightDecay``. The GIL is
    released while the kernel runs on ``num_threads`` threads of ``pool``: ``"openmp"`` (the
    OpenMP runtime torch loaded, whose threads are still spinning after torch's last parallel
    region) or ``"rayon"`` (the core's own); by default OpenMP where loaded, else rayon.
    ``simd`` forces a SIMD level (default: the best of :func:`simd_levels`).

    Returns ``(ran, rejected)``: the parameters it left untouched, with why. When any is
    ``"fatal"``, or ``strict`` is set and any is ``"unsupported"``, nothing is written, ``ran``
    is False and ``rejected`` holds just those.

    Raises:
        ValueError: lists of different lengths, invalid hyper-parameters, an unknown or
            unavailable ``simd`` level.
    """

def roofline(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    num_threads: int,
) -> None:
    """The machine's limit for :func:`adam_step` on the same tensors, for benchmarks.

    The same loads and stores, chunks and threads with trivial arithmetic: it overwrites the
    buffers meaninglessly.

    Raises:
        ValueError: a tensor :func:`adam_step` would not take as it is.
    """

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
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    weight_decouple: bool,
    absolute: bool,
    optimized_update: bool,
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
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    weight_decouple: bool,
    absolute: bool,
    optimized_update: bool,
    num_threads: Optional[int] = None,
) -> None:
    """One Adam step of many parameters' numpy arrays in one call.

    Lists of equal length; a parameter's four arrays share a dtype, parameters may differ.

    Raises:
        TypeError, ValueError: naming the argument at fault; nothing is written unless every
            entry passes its checks.
    """
