"""Hyper-parameter numbers (no torch import: the numpy API uses it too)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


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
