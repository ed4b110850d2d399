"""The import direction of ../shared/STYLE.md, as a test (trio's test_exports, uvloop's test_sourcecode)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fastq

PACKAGE = Path(fastq.__file__).parent

#: module -> the fastq modules it may import (STYLE.md §2). `_bench` is the `fastq bench` suite:
#: it sits beside cli and may import what it measures.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_layout": {"errors"},
    "_segment": {"errors", "_layout"},
    "_core_py": {"errors", "_layout", "_segment"},
    "_core": {"errors", "_layout", "_segment"},
    "ring": {"_core", "_core_py", "_layout", "errors"},
    "config": {"errors"},
    "message": {"errors"},
    "autosize": {"autosize.controller", "autosize.plan", "autosize.share", "autosize.topology"},
    "autosize.topology": {"config", "errors"},
    "autosize.plan": {"autosize.topology", "config", "errors"},
    "autosize.share": {"autosize.plan"},
    "autosize.controller": {"autosize.plan", "config", "errors"},
    "broker": {"broker.base", "broker.memory", "broker.sqlite", "broker.amqp", "errors"},
    "broker.base": {"message", "errors", "_aio", "config"},
    "_aio": set(),
    "broker.memory": {"broker.base", "message", "errors"},
    "broker.sqlite": {"broker.base", "message", "errors"},
    # the ack window (ARCHITECTURE.md: one multiple-ack over the completed prefix) lives in the
    # Cython core, which only ``ring`` imports; RabbitMQ's delivery tags are the amqp broker's
    "broker.amqp": {"broker.base", "message", "errors", "config", "ring"},
    "worker": {"_aio", "wire", "codec", "ring", "message", "middleware", "config", "autosize.topology", "_load", "errors"},
    # the supervisor owns the broker connection (ARCHITECTURE.md), so it uses broker.base's values
    "supervisor": {"_aio", "wire", "worker", "ring", "autosize", "config", "logging", "broker.base", "errors"},
    "task": {"config", "message", "broker", "broker.base", "supervisor", "errors"},
    "app": {"config", "message", "middleware", "broker", "supervisor", "task", "errors"},
    "pool": {"worker", "wire", "codec", "ring", "autosize", "config", "message", "errors"},
    "wire": {"ring", "message", "errors"},
    "codec": {"ring", "message", "errors"},
    "middleware": {"message", "errors"},
    "executors": set(),
    "executors.app": {"wire", "codec", "ring", "message", "middleware", "config", "errors", "_aio", "_load"},
    "executors.pool": {"wire", "codec", "ring", "message", "middleware", "config", "errors", "_aio"},
    "logging": set(),
    "cli": {"app", "config", "autosize", "logging", "_bench", "_load", "supervisor", "errors"},
    "_load": {"errors"},
    "__main__": {"cli"},
    "__init__": {"errors", "app", "task", "pool", "config", "middleware"},
    # the `fastq bench` suite sits beside cli and drives what it measures
    "_bench": {"_aio", "ring", "errors", "_bench", "autosize", "config", "supervisor", "worker", "__init__", "broker.base"},
    "testing": {"app", "broker", "config", "errors"},
}
#: Third-party modules and the one fastq module allowed to import each.
#: (``_bench`` measures a raw aiormq consumer as the broker's ceiling: that baseline is aiormq's)
HEAVY = {"aiormq": {"broker.amqp", "_bench"}, "uvloop": {"_aio"}, "psutil": {"autosize.topology"}}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")) + sorted(PACKAGE.rglob("*.pyx")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
        yield ".".join(parts), path


def _imports(path: Path) -> set[str]:
    source = path.read_text()
    if path.suffix == ".pyx":  # only the Python-level imports of the extension matter here
        source = "\n".join(line for line in source.splitlines() if line.startswith(("import ", "from ")) and "cimport" not in line)
    tree = ast.parse(source)
    for node in ast.walk(tree):  # imports under `if TYPE_CHECKING:` never run: leave them out
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "fastq":
                found |= {a.name for a in node.names}
            elif node.module.startswith("fastq."):
                found.add(node.module[len("fastq."):])
            else:
                found.add("!" + node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                found.add(a.name[len("fastq."):] if a.name.startswith("fastq.") else "!" + a.name.split(".")[0])
    return found


def _group(name: str) -> str:
    return "_bench" if name.startswith("_bench") else name


def _allowed(key: str, imported: str) -> bool:
    target = _group(imported)
    return target in ALLOWED[key] or target == key


def test_fastq_modules_import_only_downward():
    wrong = []
    for name, path in _modules():
        key = _group(name)
        assert key in ALLOWED, f"{name} is not in the layer table: add it to ALLOWED and STYLE.md"
        for imported in _imports(path):
            if imported.startswith("!"):
                users = HEAVY.get(imported[1:])
                if users is not None and key not in users:
                    wrong.append(f"{name} imports {imported[1:]}, which only {sorted(users)} may")
            elif not _allowed(key, imported):
                wrong.append(f"{name} imports fastq.{imported}")
    assert wrong == []


def test_import_fastq_loads_no_heavy_dependency():
    code = "import fastq, sys; print(sorted({'aiormq', 'uvloop', 'psutil'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
