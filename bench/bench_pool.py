"""fastq.Pool benchmarks for pytest-benchmark (``pytest bench --benchmark-only -k pool``).

The scenarios of ``python -m fastq bench pool`` (code: ``fastq/_bench/pool.py``), each method in
its own benchmark group so that pytest-benchmark prints them side by side: a tiny function over
200,000 ints, 1 ms of pure Python over 4,000 items, a function over 50,000 arguments of 10 KiB,
and an ``async def`` sleeping 5 ms over 20,000 items (fastq only: no stdlib pool runs it). Pools
are started and warm before timing; items per second go into ``extra_info``.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os

import pytest

import fastq
from fastq._bench import pool as scenarios


@pytest.fixture(scope="module")
def pools():
    with (
        fastq.Pool() as pool,
        multiprocessing.Pool(pool.processes) as mp,
        concurrent.futures.ProcessPoolExecutor(pool.processes) as ppe,
    ):
        for p in (pool, mp):
            p.map(scenarios.double, range(64))
        list(ppe.map(scenarios.double, range(64)))
        pool.map(scenarios.nap, range(64))
        yield pool, mp, ppe


def _items(scenario: str) -> tuple[object, list[object]]:
    if scenario == "tiny":
        return scenarios.double, list(range(200_000))
    if scenario == "cpu 1 ms":
        return scenarios.burn, [scenarios._burn_iterations()] * 4_000
    blocks = [os.urandom(10 << 10) for _ in range(1024)]
    return scenarios.size, [blocks[i % 1024] for i in range(50_000)]


@pytest.mark.parametrize("scenario", ["tiny", "cpu 1 ms", "10 KiB args"])
@pytest.mark.parametrize(
    "method",
    ["fastq map", "fastq imap_unordered", "Pool.map", "Pool.imap_unordered", "ProcessPoolExecutor"],
)
def bench_pool(benchmark, pools, scenario, method):
    pool, mp, ppe = pools
    fn, items = _items(scenario)
    call = scenarios._methods(pool, mp, ppe, fn, items)[method]
    benchmark.group = f"pool {scenario}"
    benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1 if scenario == "tiny" else 0)
    benchmark.extra_info["items_per_s"] = len(items) / benchmark.stats.stats.median


def bench_pool_async(benchmark, pools):
    pool = pools[0]
    benchmark.group = "pool async 5 ms"
    benchmark.pedantic(pool.map, args=(scenarios.nap, list(range(20_000))), rounds=3, iterations=1)
    benchmark.extra_info["items_per_s"] = 20_000 / benchmark.stats.stats.median
    benchmark.extra_info["ideal_per_s"] = pool.processes * pool.concurrency / 0.005
