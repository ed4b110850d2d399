"""pytest-benchmark wiring: machine facts and the ring implementation go into every result."""

from __future__ import annotations

import pytest

from fastq._bench.ring import machine


@pytest.fixture(autouse=True)
def _machine_info(benchmark):
    benchmark.extra_info.update(machine())
