"""One step at a time per optimizer (no torch import: the numpy API uses it too)."""

from __future__ import annotations

import os
import threading
from typing import Any, Callable


def run_alone(owner: Any, name: str, fn: Callable[..., None], *args: Any) -> None:
    """Runs ``fn(*args)`` as ``owner``'s only step in progress; RuntimeError naming ``name`` if
    one runs (in another thread, or re-entered from code the step runs)."""
    pid = os.getpid()
    held = owner.__dict__.get("_step_lock")
    if held is None:
        held = owner.__dict__.setdefault("_step_lock", (pid, threading.Lock()))
    if held[0] != pid:
        # A child made by fork() while another thread of the parent stepped inherits the held
        # lock, not the thread that would release it.
        held = owner.__dict__["_step_lock"] = (pid, threading.Lock())
    lock = held[1]
    if not lock.acquire(blocking=False):
        raise RuntimeError(
            f"{name}.step() is already running on this optimizer (in another thread, or called "
            "again from within); step one optimizer at a time"
        )
    try:
        fn(*args)
    finally:
        lock.release()
