"""fastq/_core.pyi is the contract: the stub, the extension and the twin name the same things."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from fastq import _core, _core_py

STUB = Path(_core_py.__file__).with_name("_core.pyi")


def _stub_names() -> dict[str, set[str]]:
    tree = ast.parse(STUB.read_text())
    names: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = {
                n.name if isinstance(n, ast.FunctionDef) else n.target.id  # type: ignore[union-attr]
                for n in node.body
                if isinstance(n, ast.FunctionDef | ast.AnnAssign)
            }
        elif isinstance(node, ast.Assign) and node.targets[0].id == "__all__":  # type: ignore[attr-defined]
            names["__all__"] = set(ast.literal_eval(node.value))
    return names


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_") or n in {"__enter__", "__exit__"}} - set(
        dir(tuple)
    )


@pytest.mark.cython
@pytest.mark.parametrize("module", [_core, _core_py], ids=["cython", "python"])
def test_stub_and_implementation_export_the_same_names(module):
    stub = _stub_names()
    assert set(module.__all__) == stub["__all__"]
    ring = _public(module.Ring) | ({"spin_seconds"} if module is _core_py else set())
    assert ring == stub["Ring"]
    assert set(module.RingStatistics._fields) == stub["RingStatistics"]
    assert _public(module.Dispatcher) == stub["Dispatcher"] - {"__init__"}
    assert set(module.DispatcherStatistics._fields) == stub["DispatcherStatistics"]
    assert _public(module.AckWindow) == stub["AckWindow"] - {"__init__"}


@pytest.mark.cython
def test_stub_signatures_match_the_twin():
    tree = ast.parse(STUB.read_text())
    for cls in ("Ring", "Dispatcher", "AckWindow"):
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        for fn in (n for n in node.body if isinstance(n, ast.FunctionDef) and not n.decorator_list):
            params = [a.arg for a in fn.args.args + fn.args.kwonlyargs]
            twin = inspect.signature(getattr(getattr(_core_py, cls), fn.name))
            assert params == [
                p
                for p in twin.parameters
                if twin.parameters[p].kind != inspect.Parameter.VAR_POSITIONAL
            ], fn.name


def _stub_of(pyi: str, cls: str) -> tuple[set[str], set[str]]:
    """A second extension's stub: its ``__all__``, and the members ``cls`` declares."""
    tree = ast.parse(STUB.with_name(pyi).read_text())
    stub_all = next(
        ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__all__"
    )
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    members = {
        n.name if isinstance(n, ast.FunctionDef) else n.target.id  # type: ignore[union-attr]
        for n in node.body
        if isinstance(n, ast.FunctionDef | ast.AnnAssign)
    } - {"__init__"}
    return set(stub_all), members


@pytest.mark.cython
@pytest.mark.parametrize(
    ("module", "cls", "args"),
    [
        ("fastq._amqp", "FrameReader", ()),
        ("fastq._amqp_py", "FrameReader", ()),
        ("fastq._hooks", "Tally", ((), ())),
        ("fastq._hooks_py", "Tally", ((), ())),
        ("fastq._hooks", "Processing", ("task", "id", "queue", 0)),
        ("fastq._hooks_py", "Processing", ("task", "id", "queue", 0)),
    ],
)
def test_the_other_extensions_stubs_and_both_implementations_name_the_same_things(
    module, cls, args
):
    stub_all, members = _stub_of(module.removesuffix("_py").split(".")[1] + ".pyi", cls)
    implementation = importlib.import_module(module)
    assert set(implementation.__all__) == stub_all
    assert _public(getattr(implementation, cls)(*args)) == members
