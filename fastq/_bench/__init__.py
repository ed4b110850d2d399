"""Scenarios of `python -m fastq bench`; bench/ wraps the same functions for pytest-benchmark."""

from __future__ import annotations

import json
import sys
from typing import Any


def log(line: str) -> None:
    """Progress, on stderr, so that stdout holds only the table (or the JSON with --json -)."""
    print(line, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def write_json(
    path: str | None, suite: str, machine: dict[str, Any], results: list[dict[str, Any]]
) -> None:
    """The figures of a run, with the machine, to ``path`` (``-``: stdout; None: nowhere)."""
    if not path:
        return
    doc = json.dumps({"suite": suite, "machine": machine, "results": results}, indent=2)
    if path == "-":
        print(doc)
    else:
        with open(path, "w") as f:
            f.write(doc + "\n")
