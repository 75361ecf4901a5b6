"""Helpers for the soundness tests: snapshots that prove "nothing changed", and a runner that
executes an attack in a fresh interpreter, so that a crash, an abort or a hang fails one test
instead of killing pytest.

Used in-process by the tests and inside the subprocesses (``PRELUDE`` imports this module).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from typing import Any

import torch

TESTS = os.path.dirname(os.path.abspath(__file__))

# Prepended to every attack.
PRELUDE = f"""
import copy, gc, os, sys, threading, time, weakref
sys.path.insert(0, {TESTS!r})
import torch
from _attacks import snapshot, assert_unchanged, exc_name
"""


def run_case(code: str, *, timeout: float = 60, prelude: bool = True, env: Any = None) -> str:
    """Runs ``code`` in a new interpreter (in its own session, all of which is killed on timeout);
    fails the calling test on a non-zero exit or a timeout; returns stdout."""
    import pytest

    source = (PRELUDE if prelude else "") + textwrap.dedent(code)
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-c", source],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"hung: no exit within {timeout} s\n--- stdout\n{out[-3000:]}"
            f"\n--- stderr\n{err[-3000:]}"
        )
    if proc.returncode != 0:
        how = (
            f"killed by signal {-proc.returncode} ({signal.Signals(-proc.returncode).name})"
            if proc.returncode < 0
            else f"exit status {proc.returncode}"
        )
        pytest.fail(f"{how}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}")
    return out


def exc_name(e: BaseException) -> str:
    """``module.Name`` of an exception's type (a pyo3 PanicException shows as such)."""
    t = type(e)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


def _clone(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    try:
        return __import__("copy").deepcopy(v)
    except Exception:
        return v


def snapshot(opt: Any) -> dict[str, Any]:
    """Everything a step could change: every parameter (object, shape, values), every group's
    values, every state entry (object and value), step counts included."""
    groups = []
    for g in opt.param_groups:
        groups.append(
            {
                "params": [(p, p.data, p.detach().clone()) for p in g["params"]],
                "values": {
                    k: _clone(v) for k, v in g.items() if k not in ("params", "param_names")
                },
            }
        )
    state = {}
    for p, s in opt.state.items():
        state[p] = {k: (v, _clone(v)) for k, v in s.items()}
    return {"groups": groups, "state": state, "n_groups": len(opt.param_groups)}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN == NaN here
    try:
        return bool(a == b)
    except Exception:
        return a is b


def assert_unchanged(opt: Any, snap: dict[str, Any], where: str = "") -> None:
    """Asserts that ``opt`` is as ``snapshot`` saw it. A state created during the failed step
    is tolerated only if it is empty or a fresh one (step 0, zero moments)."""
    assert len(opt.param_groups) == snap["n_groups"], f"{where}: number of groups changed"
    for gi, (g, sg) in enumerate(zip(opt.param_groups, snap["groups"])):
        assert len(g["params"]) == len(sg["params"]), f"{where}: group {gi} params changed"
        for i, (p, (p0, _data0, val0)) in enumerate(zip(g["params"], sg["params"])):
            name = f"{where}: param_groups[{gi}]['params'][{i}]"
            assert p is p0, f"{name} was replaced"
            assert _same(p.detach(), val0), f"{name} changed: {p.detach()} != {val0}"
        for k, v in sg["values"].items():
            assert _same(g.get(k), v), f"{where}: param_groups[{gi}][{k!r}] changed"
    for p, entries in snap["state"].items():
        s = opt.state.get(p)
        assert s is not None, f"{where}: a parameter's state disappeared"
        assert set(s) == set(entries), f"{where}: state keys changed: {set(entries)} -> {set(s)}"
        for k, (obj, val) in entries.items():
            assert _same(s[k], val), f"{where}: state[{k!r}] changed: {s[k]!r} != {val!r}"
            if isinstance(obj, torch.Tensor):
                assert s[k] is obj, f"{where}: state[{k!r}] was replaced by another tensor"
    for p, s in opt.state.items():
        if p in snap["state"] or not s:
            continue
        step = s.get("step")
        step = int(step.item()) if isinstance(step, torch.Tensor) else step
        assert step == 0, f"{where}: a new state with step {step} after a refused step"
        for k, v in s.items():
            if isinstance(v, torch.Tensor) and k != "step":
                assert not v.any(), f"{where}: a new state's {k} is not zero"
