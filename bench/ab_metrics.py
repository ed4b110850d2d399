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


def _round(bench: Bench, side: str, n: int) -> tuple[float, float, float, int]:
    """One engine run of ``n`` noop messages, metrics ``side``: msgs/s, this process's on-CPU
    seconds from the supervisor's start (the enqueue before it not counted), the workers'
    on-CPU seconds (their start-up included), and the messages the metrics counted."""
    _, _, concurrency, prefetch = SCENARIOS["noop"]
    plain = bench.supervisor
    made: list[Any] = []
    marks: list[float] = []

    def supervisor(*args: Any, **kw: Any) -> Any:
        sup = plain(*args, **kw)
        if side == "on":  # as --metrics 127.0.0.1:0 would make it
            from fastq.metrics import Metrics

            sup.config = msgspec.structs.replace(sup.config, metrics="127.0.0.1:0")
            sup.metrics = Metrics("127.0.0.1:0")
        run = sup.run

        async def timed() -> None:  # after the enqueue: the drain's CPU starts here
            marks.append(_cpu()[0])
            await run()

        sup.run = timed
        made.append(sup)
        return sup

    bench.supervisor = supervisor  # type: ignore[method-assign]
    try:
        kids = _cpu()[1]
        took, _ = bench.run("noop", n, concurrency, prefetch)
        me, kids_after = _cpu()
    finally:
        bench.supervisor = plain  # type: ignore[method-assign]
    metrics = made[0].metrics
    counted = sum(metrics.messages.values()) if metrics is not None else 0
    return n / took, me - marks[0], kids_after - kids, counted


def main(rounds: int = 5, n: int = 60_000) -> None:
    """Alternating rounds; a first short round per side (2,000 messages) measures the fixed
    costs (the workers' start-up: importing the app), which the CPU per message leaves out."""
    with tempfile.TemporaryDirectory() as d:
        bench = Bench("memory", Path(d), burn=0)
        fixed = {side: _round(bench, side, 2_000) for side in ("off", "on")}
        rates: dict[str, list[float]] = {"off": [], "on": []}
        #: on-CPU microseconds per drained message, the whole tree (start-up left out)
        spent: dict[str, list[float]] = {"off": [], "on": []}
        for r in range(rounds * 2):
            side = "off" if r % 2 == 0 else "on"
            rate, me, kids, counted = _round(bench, side, n)
            _, me0, kids0, _ = fixed[side]
            per = ((me - me0) + (kids - kids0)) * 1e6 / (n - 2_000)
            rates[side].append(rate)
            spent[side].append(per)
            print(
                f"round {r // 2 + 1} metrics {side}: {rate:,.0f} msgs/s (messages counted: "
                f"{counted:,}); drain CPU per message, whole tree: {per:.2f} us",
                flush=True,
            )
        off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
        pairs = [100 * (b - a) / a for a, b in zip(rates["off"], rates["on"], strict=True)]
        cpu_off, cpu_on = statistics.median(spent["off"]), statistics.median(spent["on"])
        print(
            f"engine, median off {off:,.0f} msgs/s, on {on:,.0f} msgs/s: "
            f"{100 * (on - off) / off:+.1f}% (median of the rounds' own changes "
            f"{statistics.median(pairs):+.1f}%)"
        )
        print(
            f"drain CPU per message, whole tree, median off {cpu_off:.2f} us, on {cpu_on:.2f} us:"
            f" {100 * (cpu_on - cpu_off) / cpu_off:+.1f}%"
        )
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
