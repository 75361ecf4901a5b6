"""Hyper-parameter numbers (no torch import: the numpy API uses it too)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def is_real(x: Any) -> bool:
    """A real number as torch takes one for a hyper-parameter, tensors aside: a Python or numpy
    scalar (``numbers.Real``) or a 1-element real numpy array; not a bool, not a string."""
    if isinstance(x, np.ndarray):
        return x.size == 1 and x.dtype.kind in "fiu"
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def is_inf(x: Any) -> bool:
    """Whether ``x`` (a Python or numpy number, a 1-element array or tensor) is itself infinite,
    not merely beyond a float's range (``10**400``, numpy's long double ``1e400``)."""
    if isinstance(x, int):
        return False
    if isinstance(x, float):
        return math.isinf(x)
    isinf = getattr(x, "isinf", None)  # a tensor
    if callable(isinf):
        return bool(isinf().all())
    return bool(np.isinf(x).all())


def as_float(name: str, x: Any) -> float:
    """A number already checked to be real, as a float; ValueError naming ``name`` where it is
    beyond a float's range (Python converts a huge int with an error, numpy a long double to
    inf without one)."""
    try:
        value = float(x.item() if isinstance(x, np.ndarray) else x)
    except OverflowError:
        value = math.inf
    if math.isinf(value) and not is_inf(x):
        raise ValueError(f"{name} is {x!r}, beyond the range of a float")
    return value
