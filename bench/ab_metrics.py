"""A/B of the metrics' cost: the engine bench's memory:// noop with ``--metrics`` off and on,
alternating in one process, the same messages and settings (fastq._bench.engine.Bench).

    python bench/ab_metrics.py [rounds] [messages]

Caveats: two cores shared by producer, supervisor and workers (and by whatever else runs on the
machine); the rounds alternate so that drift hits both sides alike; medians are reported.
"""

from __future__ import annotations

import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from fastq._bench.engine import SCENARIOS, Bench


def worker_cpu(bench: Bench, variant: str, bodies: list[bytes]) -> float:
    """On-CPU seconds per message of a worker's executor (decode, middleware, handler), run
    in this process without rings; with metrics ("on": the compiled tally, "twin": its
    pure-Python twin), one tally report per 256 messages (a completion batch)."""
    import asyncio
    import time

    from fastq import wire
    from fastq.executors.app import AppExecutor

    class Runtime:
        spec = wire.WorkerSpec(
            index=0,
            parent=0,
            cpu=None,
            app=bench.spec,
            queues=(bench.module.noop.queue,),
            input_ring="",
            output_ring="",
            concurrency=1,
            executor="",
            metrics=variant != "off",
        )

    ex = AppExecutor(Runtime())  # type: ignore[arg-type]
    if variant == "twin":  # the same chain, with the twin in the compiled tally's place
        from fastq import _hooks_py, wire
        from fastq.middleware import Hooks

        ex.tally = _hooks_py.Tally(wire.HANDLER_BUCKETS, wire.LATENCY_BUCKETS)  # type: ignore[assignment]
        ex.hooks = Hooks([ex.tally, *ex.app.middleware])

    async def go() -> float:
        cpu = time.thread_time()
        for i, body in enumerate(bodies):
            await ex.run(memoryview(body), 0, 0)
            if i % 256 == 255:
                ex.reports()
        ex.reports()
        return (time.thread_time() - cpu) / len(bodies)

    try:
        return asyncio.run(go())
    finally:
        ex.close()


def _cpu() -> tuple[float, float]:
    """On-CPU seconds so far: this process's, and its reaped children's (the workers)."""
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def main(rounds: int = 5, n: int = 60_000) -> None:
    _, _, concurrency, prefetch = SCENARIOS["noop"]
    with tempfile.TemporaryDirectory() as d:
        bench = Bench("memory", Path(d), burn=0)
        plain = bench.supervisor
        rates: dict[str, list[float]] = {"off": [], "on": []}
        #: on-CPU microseconds per message: (this process: producer and supervisor, workers)
        spent: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
        for r in range(rounds * 2):
            side = "off" if r % 2 == 0 else "on"
            made: list[Any] = []

            def supervisor(*args: Any, side: str = side, made: list[Any] = made, **kw: Any) -> Any:
                sup = plain(*args, **kw)
                if side == "on":  # as --metrics 127.0.0.1:0 would make it
                    from fastq.metrics import Metrics

                    sup.config = msgspec.structs.replace(sup.config, metrics="127.0.0.1:0")
                    sup.metrics = Metrics("127.0.0.1:0")
                made.append(sup)
                return sup

            bench.supervisor = supervisor  # type: ignore[method-assign]
            before = _cpu()
            took, _ = bench.run("noop", n, concurrency, prefetch)
            after = _cpu()
            rates[side].append(n / took)
            spent[side].append(((after[0] - before[0]) * 1e6 / n, (after[1] - before[1]) * 1e6 / n))
            metrics = made[0].metrics
            counted = sum(metrics.messages.values()) if metrics is not None else 0
            print(
                f"round {r // 2 + 1} metrics {side}: {n / took:,.0f} msgs/s "
                f"(messages counted: {counted:,}); CPU per message: supervisor and producer "
                f"{spent[side][-1][0]:.2f} us, workers {spent[side][-1][1]:.2f} us",
                flush=True,
            )
        off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
        pairs = [100 * (b - a) / a for a, b in zip(rates["off"], rates["on"], strict=True)]
        tree = {k: statistics.median(sum(x) for x in v) for k, v in spent.items()}
        print(
            f"engine, median of the rounds' on/off change {statistics.median(pairs):+.1f}%; "
            f"whole-tree CPU per message, median off {tree['off']:.2f} us, on {tree['on']:.2f} "
            f"us: {100 * (tree['on'] - tree['off']) / tree['off']:+.1f}%"
        )
        change = 100 * (on - off) / off
        print(f"engine, median off {off:,.0f} msgs/s, on {on:,.0f} msgs/s: {change:+.1f}%")
        bodies = [bench.module.noop.message(0.0).body for _ in range(n)]
        cpu: dict[str, list[float]] = {"off": [], "on": [], "twin": []}
        for _ in range(rounds):
            for variant, seen in cpu.items():
                seen.append(worker_cpu(bench, variant, bodies))
        bench.close()
    off_us, on_us, twin_us = (statistics.median(cpu[k]) * 1e6 for k in ("off", "on", "twin"))
    print(
        f"worker executor CPU per message, median off {off_us:.2f} us, on {on_us:.2f} us: "
        f"+{on_us - off_us:.2f} us ({100 * (on_us - off_us) / off_us:+.1f}%); with the "
        f"pure-Python twin tally {twin_us:.2f} us: +{twin_us - off_us:.2f} us"
    )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
