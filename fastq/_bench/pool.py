"""``python -m fastq bench pool``: ``fastq.Pool`` against the pools a user would otherwise take.

Four scenarios, each beside its baselines in the same run, medians of ``runs`` rounds: a tiny
function (``x * 2``) over 200,000 ints; 1 ms of pure Python over 4,000 items; a function over
50,000 arguments of 10 KiB (1,024 distinct blocks, cycled, so that no chunk repeats one and
pickle's memo saves nothing); an ``async def`` sleeping 5 ms over 20,000 items. Baselines:
``multiprocessing.Pool`` (``map`` and ``imap_unordered``, chunksize 256),
``concurrent.futures.ProcessPoolExecutor`` (chunksize 256) and a loop in this process; for
the async scenario, its ideal (processes x concurrency / 5 ms) and one asyncio process with
the same total concurrency.

Caveats: the pools are started and warm before anything is timed (start-up is not measured);
every pool has as many processes as fastq plans (one per usable core); the caller's own thread
shares those cores with the workers, in every method alike.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import fastq
from fastq._bench import _burn, _burn_iterations

CHUNK = 256
#: the one-process loop of the 1 ms scenario runs this many items (a second), not all 4,000
LOCAL_CPU_ITEMS = 1_000


def _run_one_loop(n: int, concurrency: int) -> None:
    asyncio.run(_one_loop(n, concurrency))


def _loop(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    return [fn(x) for x in items]


def double(x: int) -> int:
    return x * 2


def size(b: bytes) -> int:
    return len(b)


def burn(n: int) -> int:
    return _burn(n)


async def nap(x: int) -> int:
    await asyncio.sleep(0.005)
    return x


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _methods(
    pool: fastq.Pool,
    mp: Any,
    ppe: concurrent.futures.ProcessPoolExecutor,
    fn: Callable[[Any], Any],
    items: list[Any],
) -> dict[str, Callable[[], Any]]:
    return {
        "fastq map": lambda: pool.map(fn, items),
        "fastq imap_unordered": lambda: sum(1 for _ in pool.imap_unordered(fn, items)),
        "Pool.map": lambda: mp.map(fn, items, chunksize=CHUNK),
        "Pool.imap_unordered": lambda: sum(
            1 for _ in mp.imap_unordered(fn, items, chunksize=CHUNK)
        ),
        "ProcessPoolExecutor": lambda: sum(1 for _ in ppe.map(fn, items, chunksize=CHUNK)),
    }


async def _one_loop(n: int, concurrency: int) -> None:
    limit = asyncio.Semaphore(concurrency)

    async def one(x: int) -> None:
        async with limit:
            await nap(x)

    await asyncio.gather(*[one(x) for x in range(n)])


def measure(runs: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    iterations = _burn_iterations()
    blocks = [os.urandom(10 << 10) for _ in range(1024)]
    scenarios: dict[str, tuple[Callable[[Any], Any], list[Any]]] = {
        "tiny": (double, list(range(200_000))),
        "cpu 1 ms": (burn, [iterations] * 4_000),
        "10 KiB args": (size, [blocks[i % 1024] for i in range(50_000)]),
        "async 5 ms": (nap, list(range(20_000))),
    }
    rates: dict[str, dict[str, list[float]]] = {s: {} for s in scenarios}
    with fastq.Pool() as pool:
        processes = pool.processes
        with (
            multiprocessing.Pool(processes) as mp,
            concurrent.futures.ProcessPoolExecutor(processes) as ppe,
        ):
            # warm every pool: processes started, the functions imported
            for fn, _ in scenarios.values():
                if fn is not nap:
                    pool.map(fn, [1] * 64 if fn is not size else blocks[:64])
                    mp.map(fn, [1] * 64 if fn is not size else blocks[:64])
                    list(ppe.map(fn, [1] * 64 if fn is not size else blocks[:64]))
            pool.map(nap, range(64))
            for run in range(runs):
                for name, (fn, items) in scenarios.items():
                    methods: dict[str, Callable[[], Any]]
                    if fn is nap:
                        concurrency = pool.concurrency * processes
                        methods = {
                            "fastq map": functools.partial(pool.map, nap, items),
                            "one asyncio process": functools.partial(
                                _run_one_loop, len(items), concurrency
                            ),
                        }
                    else:
                        methods = _methods(pool, mp, ppe, fn, items)
                        local = items if fn is not burn else items[:LOCAL_CPU_ITEMS]
                        methods["one process loop"] = functools.partial(_loop, fn, local)
                    for method, call in methods.items():
                        n = (
                            LOCAL_CPU_ITEMS
                            if method == "one process loop" and fn is burn
                            else len(items)
                        )
                        rate = n / _timed(call)
                        rates[name].setdefault(method, []).append(rate)
                    log(
                        f"  run {run + 1}/{runs} {name}: "
                        + ", ".join(f"{m} {v[-1]:,.0f}/s" for m, v in rates[name].items())
                    )
        concurrency = pool.concurrency
    results = []
    for name, by_method in rates.items():
        medians = {m: statistics.median(v) for m, v in by_method.items()}
        fastq_rate = medians["fastq map"]
        r: dict[str, Any] = {
            "scenario": name,
            "items": len(scenarios[name][1]),
            "processes": processes,
            "rates": medians,
            "runs": by_method,
        }
        if name == "async 5 ms":
            r["ideal"] = processes * concurrency / 0.005
            r["of_ideal"] = fastq_rate / r["ideal"]
            r["target"] = "fastq map >= 50% of processes x concurrency / 5 ms"
        elif name == "cpu 1 ms":
            r["ideal"] = processes * medians["one process loop"]
            r["of_ideal"] = fastq_rate / r["ideal"]
            r["target"] = f"fastq map >= 97% of {processes} x one process"
        elif name == "tiny":
            r["vs"] = medians["fastq imap_unordered"] / medians["Pool.imap_unordered"]
            r["target"] = "fastq imap_unordered >= 2x Pool.imap_unordered"
        else:
            r["vs"] = fastq_rate / medians["Pool.map"]
            r["target"] = "fastq >= 2x Pool.map"
        results.append(r)
    return results


def render(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        rates = r["rates"]
        head = f"  {r['scenario']} ({r['items']:,} items, {r['processes']} processes)"
        if "of_ideal" in r:
            head += f": fastq map {r['of_ideal']:.1%} of the ideal {r['ideal']:,.0f}/s"
        elif r["scenario"] == "tiny":
            head += f": fastq imap_unordered {r['vs']:.2f}x Pool.imap_unordered"
        else:
            head += f": fastq map {r['vs']:.2f}x Pool.map"
        lines.append(head + f"   [target: {r['target']}]")
        best = rates["fastq map"]
        for method, rate in rates.items():
            lines.append(f"      {method:<22} {rate:>12,.0f}/s   fastq map is {best / rate:.2f}x")
    return "\n".join(lines)


def main(*, runs: int, json_path: str | None) -> int:
    from fastq._bench import log, write_json
    from fastq._bench.ring import machine

    info = machine()
    log(
        f"fastq bench pool: {info['cpu']}, {info['usable_cores']} usable cores, Python "
        f"{info['python']}, "
        f"ring implementation {info['implementation']}"
    )
    results = measure(runs, log)
    print(
        f"fastq bench (pool) on {info['cpu']} ({info['usable_cores']} cores), Python "
        f"{info['python']}, "
        f"ring {info['implementation']}; median of {runs} runs; pools started and warm before "
        "timing"
    )
    print(render(results))
    write_json(json_path, "pool", info, results)
    return 0
