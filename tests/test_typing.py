"""The typed surface: ``_core.pyi`` matches the compiled module, ``py.typed`` ships, and the
public Python API is annotated and documented."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path
from typing import Any

import pytest
import torch

import rustadam
from rustadam import _core

PACKAGE = Path(rustadam.__file__).parent
STUB = ast.parse((PACKAGE / "_core.pyi").read_text())


def stub_functions() -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in STUB.body if isinstance(n, ast.FunctionDef)}


def stub_classes() -> set[str]:
    return {n.name for n in STUB.body if isinstance(n, ast.ClassDef)}


def stub_variables() -> set[str]:
    """Names the stub declares as module attributes (``name: type``); plain assignments are
    the stub's own type aliases."""
    return {
        n.target.id
        for n in STUB.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }


def runtime_names() -> set[str]:
    return {n for n in dir(_core) if not n.startswith("_")} | {"__version__"}


def test_stub_declares_exactly_the_module_names() -> None:
    declared = set(stub_functions()) | stub_variables() | stub_classes()
    missing, extra = runtime_names() - declared, declared - runtime_names()
    assert not missing, f"rustadam._core has {sorted(missing)}, which _core.pyi lacks"
    assert not extra, f"_core.pyi declares {sorted(extra)}, which rustadam._core lacks"
    assert isinstance(_core.__version__, str) and _core.__version__ == rustadam.__version__


def stub_parameters(fn: ast.FunctionDef) -> list[tuple[str, str, Any]]:
    """(name, kind, default) per parameter; default is inspect.Parameter.empty if none."""
    args = fn.args
    out: list[tuple[str, str, Any]] = []
    positional = args.posonlyargs + args.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults)) + [
        ast.literal_eval(d) for d in args.defaults
    ]
    for a, d in zip(args.posonlyargs, defaults):
        out.append((a.arg, "POSITIONAL_ONLY", d))
    for a, d in zip(args.args, defaults[len(args.posonlyargs) :]):
        out.append((a.arg, "POSITIONAL_OR_KEYWORD", d))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        default = inspect.Parameter.empty if d is None else ast.literal_eval(d)
        out.append((a.arg, "KEYWORD_ONLY", default))
    return out


@pytest.mark.parametrize("name", sorted(stub_functions()))
def test_stub_signature_matches_the_extension(name: str) -> None:
    fn = stub_functions()[name]
    runtime = inspect.signature(getattr(_core, name))
    got = [(p.name, p.kind.name, p.default) for p in runtime.parameters.values()]
    assert stub_parameters(fn) == got
    # Every parameter and the result are typed.
    assert all(a.annotation is not None for a in fn.args.args + fn.args.kwonlyargs)
    assert fn.returns is not None
    assert ast.get_docstring(fn)


def test_package_is_marked_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()


def public_methods(cls: type) -> dict[str, Any]:
    """Methods the class itself defines: public ones and __init__/__call__."""
    return {
        name: fn
        for name, fn in vars(cls).items()
        if inspect.isfunction(fn) and (not name.startswith("_") or name in {"__init__", "__call__"})
    }


@pytest.mark.parametrize("cls_name", ["Adam", "WeightDecay"])
def test_public_api_is_annotated_and_documented(cls_name: str) -> None:
    cls = getattr(rustadam, cls_name)
    assert inspect.getdoc(cls)
    methods = public_methods(cls)
    assert methods
    for name, fn in methods.items():
        # The annotations resolve (torch is imported for type checkers only in weight_decay.py).
        module_globals = inspect.unwrap(fn).__globals__
        hints = typing.get_type_hints(fn, globalns={**module_globals, "torch": torch})
        params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
        unannotated = [p.name for p in params if p.name not in hints]
        assert not unannotated, f"{cls_name}.{name}: {unannotated} have no annotation"
        assert "return" in hints, f"{cls_name}.{name} has no return annotation"
        if name != "__init__":
            assert inspect.getdoc(fn), f"{cls_name}.{name} has no docstring"
