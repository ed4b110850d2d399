"""Scenarios of `python -m fastq bench`; bench/ wraps the same functions for pytest-benchmark."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def log(line: str) -> None:
    """Progress, on stderr, so that stdout holds only the table (or the JSON with --json -)."""
    print(line, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def timed_calls(call: Callable[[int], object], n: int, warmup: int = 0) -> list[float]:
    """Seconds of each of ``n`` sequential ``call(i)`` (after ``warmup`` not counted); each
    must return ``i``."""
    times = []
    for i in range(warmup + n):
        t = time.perf_counter()
        got = call(i)
        took = time.perf_counter() - t
        assert got == i, f"call({i}) returned {got!r}"
        if i >= warmup:
            times.append(took)
    return times


def chain_figures(scenario: str, rates: list[float]) -> dict[str, Any]:
    """The figures of a chain scenario: the median rate and every run's."""
    median = statistics.median(rates)
    return {f"chain_{scenario}_msgs_per_s": median, f"chain_{scenario}_runs": rates}


def call_figures(rounds: list[list[float]]) -> dict[str, float]:
    """Median over rounds of each round's p50 and p99 call time, in milliseconds."""
    return {
        "call_p50_ms": statistics.median(percentile(r, 0.5) for r in rounds) * 1e3,
        "call_p99_ms": statistics.median(percentile(r, 0.99) for r in rounds) * 1e3,
    }


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


def _burn_iterations() -> int:
    """Loop iterations of ``x += i * i`` that take about 1 ms of pure Python here, timed at the
    machine's best of five tries (a try slowed by a neighbour would make every task shorter)."""
    n, took = 20_000, 0.0
    while took < 0.05:
        t = time.perf_counter()
        _burn(n)
        took = time.perf_counter() - t
        if took < 0.05:
            n *= 2
    for _ in range(4):
        t = time.perf_counter()
        _burn(n)
        took = min(took, time.perf_counter() - t)
    return max(1, int(n * 0.001 / took))


def _burn(n: int) -> int:
    x = 0
    for i in range(n):
        x += i * i
    return x
