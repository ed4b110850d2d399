"""Ring benchmarks for pytest-benchmark (``pytest bench --benchmark-only``).

In-process put_many/get_many cost per batch on both implementations, and the two-process scenario
of ``python -m fastq bench ring`` for the extension and the stdlib queue, whose msgs/s (timed
inside the processes, spawn excluded) go into extra_info.
"""

from __future__ import annotations

import importlib
import os

import pytest

from fastq._bench import ring as scenario

SIZES = {"64B": 64, "1KiB": 1024, "64KiB": 65536}
FRAMES = 256


@pytest.mark.parametrize("impl", ["fastq._core", "fastq._core_py"])
@pytest.mark.parametrize("size", list(SIZES))
def bench_put_many_get_many_in_one_process(benchmark, impl, size):
    benchmark.group = f"ring-put_many+get_many-{size}"
    mod = importlib.import_module(impl)
    frames = [os.urandom(SIZES[size]) for _ in range(FRAMES)]
    with mod.Ring.create(32 << 20) as ring:

        def round_trip():
            ring.put_many(frames)
            return ring.get_many(FRAMES)

        assert len(benchmark(round_trip)) == FRAMES
    benchmark.extra_info["frames_per_round"] = FRAMES


@pytest.mark.parametrize("method", ["fastq ring", "mp.Queue, lists of 256"])
@pytest.mark.parametrize("size", list(SIZES))
def bench_two_processes(benchmark, method, size):
    benchmark.group = f"ring-two-processes-{size}"
    count = max(2_000, (64 << 20) // SIZES[size])
    rates = []

    def run():
        elapsed, _ = scenario.run_once(method, SIZES[size], count)
        rates.append(count / elapsed)

    benchmark.pedantic(run, rounds=3)
    benchmark.extra_info["msgs_per_s"] = sorted(rates)[len(rates) // 2]
