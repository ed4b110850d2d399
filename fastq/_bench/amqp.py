"""``python -m fastq bench --broker amqp://...``: the engine through RabbitMQ, beside what a
user would write without fastq, in the same run.

Scenarios: publishing with confirms (fastq ``send_many`` in batches of 1,000 against aio-pika
publishing one message at a time and awaiting each confirm, as its documentation shows, and
aio-pika with 1,000 publishes in flight at once); noop,
I/O (5 ms sleep) and CPU (1 ms of pure Python) handlers through ``fastq worker``'s engine on
queues filled first. References for noop: a hand-written aio-pika consumer in as many
processes as fastq has workers (prefetch 100, one ack per message), and a raw aiormq consumer
with ``no_ack=True`` in as many processes (the ceiling of this broker here; it acknowledges
nothing, so it is not at-least-once). Medians of ``runs``.

Caveats: RabbitMQ runs on the same two cores as everything measured; the queues are
``fastq-bench-*`` on the given vhost, purged before each run and deleted at the end.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastq._bench import _burn_iterations
from fastq._bench.engine import Bench

PREFIX = "fastq-bench-"
SCENARIOS: dict[str, tuple[str, int, int | None, int | None]] = {
    "noop": ("noop", 20_000, 100, 2_000),
    "io": ("io", 20_000, 100, 1_000),
    "cpu": ("cpu", 3_000, None, 6),
}
PUBLISH_N = 20_000
AIO_PIKA_PUBLISH_N = 5_000


def _purge(url: str, queues: list[str], delete: bool = False) -> None:
    async def run() -> None:
        import aiormq

        connection = await aiormq.connect(url)
        channel = await connection.channel()
        for q in queues:
            for name in (q, f"{q}.dlq"):
                try:
                    await channel.queue_declare(name, durable=True)
                    await (channel.queue_delete(name) if delete else channel.queue_purge(name))
                except Exception:  # noqa: BLE001, S110 - a queue of other arguments: leave it
                    pass
        await connection.close()

    asyncio.run(run())


def _aio_pika_publish(url: str, queue: str, n: int) -> float:
    async def run() -> float:
        import aio_pika

        connection = await aio_pika.connect(url)
        channel = await connection.channel()  # publisher confirms are on by default
        await channel.declare_queue(queue, durable=True)
        t = time.perf_counter()
        for i in range(n):
            await channel.default_exchange.publish(
                aio_pika.Message(b"%d" % i, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue,
            )
        took = time.perf_counter() - t
        await connection.close()
        return n / took

    return asyncio.run(run())


def _aio_pika_publish_pipelined(url: str, queue: str, n: int) -> float:
    """aio-pika with confirms, 1,000 publishes in flight at once (``asyncio.gather``)."""

    async def run() -> float:
        import aio_pika

        connection = await aio_pika.connect(url)
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        t = time.perf_counter()
        for start in range(0, n, 1000):
            await asyncio.gather(
                *[
                    channel.default_exchange.publish(
                        aio_pika.Message(b"%d" % i, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=queue,
                    )
                    for i in range(start, min(n, start + 1000))
                ]
            )
        took = time.perf_counter() - t
        await connection.close()
        return n / took

    return asyncio.run(run())


def _aio_pika_consumer(url: str, queue: str, n: int, counter: Any, done: Any) -> None:
    async def run() -> None:
        import aio_pika

        connection = await aio_pika.connect(url)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        q = await channel.declare_queue(queue, durable=True)

        async def on_message(message: Any) -> None:
            await message.ack()
            with counter.get_lock():
                counter.value += 1
                if counter.value >= n:
                    done.set()

        await q.consume(on_message)
        while not done.is_set():
            await asyncio.sleep(0.01)
        await connection.close()

    asyncio.run(run())


def _aiormq_no_ack_consumer(url: str, queue: str, n: int, counter: Any, done: Any) -> None:
    async def run() -> None:
        import aiormq

        connection = await aiormq.connect(url)
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=1000)

        async def on_message(message: Any) -> None:
            with counter.get_lock():
                counter.value += 1
                if counter.value >= n:
                    done.set()

        await channel.basic_consume(queue, on_message, no_ack=True)
        while not done.is_set():
            await asyncio.sleep(0.01)
        await connection.close()

    asyncio.run(run())


def _reference(url: str, queue: str, n: int, processes: int, target: Callable[..., None]) -> float:
    """Messages per second of ``target`` consumers in ``processes`` processes on a full queue."""
    ctx = multiprocessing.get_context("spawn")
    counter, done = ctx.Value("q", 0), ctx.Event()
    procs = [
        ctx.Process(target=target, args=(url, queue, n, counter, done)) for _ in range(processes)
    ]
    for p in procs:
        p.start()
    t = None
    deadline = time.monotonic() + 300
    while not done.is_set() and time.monotonic() < deadline:
        if t is None and counter.value > 0:  # connected and consuming: the clock starts
            t, start_count = time.perf_counter(), counter.value
        time.sleep(0.001)
    took = time.perf_counter() - (t or time.perf_counter())
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    return (n - start_count) / took if t and took > 0 else 0.0


def measure(url: str, runs: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    burn = _burn_iterations()
    queues = [PREFIX + s for s in SCENARIOS] + [PREFIX + "ref", PREFIX + "pika-publish"]
    processes = len(os.sched_getaffinity(0))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fastq-bench-amqp-") as tmp:
        bench = Bench("amqp", Path(tmp), burn, url=url, prefix=PREFIX)
        try:
            # publishing with confirms
            fastq_rates, pika_rates, piped_rates = [], [], []
            for r in range(runs):
                _purge(url, queues)
                t = time.perf_counter()
                for start in range(0, PUBLISH_N, 1000):
                    bench.module.noop.send_many((0.0,) for _ in range(1000))
                fastq_rates.append(PUBLISH_N / (time.perf_counter() - t))
                pika_rates.append(
                    _aio_pika_publish(url, PREFIX + "pika-publish", AIO_PIKA_PUBLISH_N)
                )
                piped_rates.append(
                    _aio_pika_publish_pipelined(url, PREFIX + "pika-publish", PUBLISH_N)
                )
                log(
                    f"amqp publish round {r + 1}/{runs}: fastq {fastq_rates[-1]:,.0f}/s, aio-pika "
                    f"{pika_rates[-1]:,.0f}/s one at a time, {piped_rates[-1]:,.0f}/s pipelined"
                )
            results.append(
                {
                    "scenario": "publish (confirmed)",
                    "msgs_per_s": statistics.median(fastq_rates),
                    "runs_msgs_per_s": fastq_rates,
                    "baselines": {
                        "aio-pika, one at a time": statistics.median(pika_rates),
                        "aio-pika, 1,000 in flight": statistics.median(piped_rates),
                    },
                }
            )
            for label, (scenario, n, concurrency, prefetch) in SCENARIOS.items():
                rates: list[float] = []
                base: dict[str, list[float]] = {}
                for r in range(runs):
                    _purge(url, queues)
                    took, _ = bench.run(scenario, n, concurrency, prefetch)
                    rates.append(n / took)
                    if scenario == "noop":
                        for name, target in (
                            ("aio-pika consumer, ack each, prefetch 100", _aio_pika_consumer),
                            ("aiormq consumer, no_ack (ceiling)", _aiormq_no_ack_consumer),
                        ):
                            _purge(url, queues)
                            for start in range(0, n, 1000):
                                bench.module.app.broker.publish_sync(
                                    PREFIX + "ref",
                                    [_raw(i) for i in range(start, min(n, start + 1000))],
                                )
                            base.setdefault(f"{name}, {processes} processes", []).append(
                                _reference(url, PREFIX + "ref", n, processes, target)
                            )
                    log(f"amqp {label} round {r + 1}/{runs}: {n / took:,.0f} msgs/s")
                results.append(
                    {
                        "scenario": label,
                        "messages": n,
                        "concurrency": concurrency,
                        "prefetch": prefetch,
                        "msgs_per_s": statistics.median(rates),
                        "runs_msgs_per_s": rates,
                        "baselines": {k: statistics.median(v) for k, v in base.items()},
                    }
                )
        finally:
            bench.close()
            _purge(url, queues, delete=True)
    return results


def _raw(i: int) -> Any:
    from fastq.broker.base import Message

    return Message(b"%d" % i, f"ref-{i}", headers={"content-type": "text/plain"})


TARGETS = {"publish (confirmed)": 9_000, "noop": 6_500, "io": 6_400, "cpu": 1_600}


def render(results: list[dict[str, Any]]) -> str:
    lines = [f"  {'scenario':<20} {'msgs/s':>9}  {'target':>7}  baselines in the same run"]
    for r in results:
        target = TARGETS.get(r["scenario"])
        met = "" if target is None else (" met" if r["msgs_per_s"] >= target else " MISSED")
        base = "; ".join(
            f"{k}: {v:,.0f}/s (fastq {r['msgs_per_s'] / v:.2f}x)"
            for k, v in r["baselines"].items()
            if v
        )
        lines.append(
            f"  {r['scenario']:<20} {r['msgs_per_s']:>9,.0f}  {target or '':>7}{met}  {base}"
        )
    return "\n".join(lines)


def main(*, url: str, runs: int, json_path: str | None) -> int:
    from fastq._bench import log, write_json
    from fastq._bench.ring import machine
    from fastq.broker.base import mask_url

    info = machine()
    log(
        f"fastq bench (amqp) on {mask_url(url)}: {info['cpu']}, {info['usable_cores']} usable cores"
    )
    results = measure(url, runs, log)
    print(
        f"fastq bench (RabbitMQ at {mask_url(url)}) on {info['cpu']} ({info['usable_cores']} "
        "cores), "
        f"Python {info['python']}; median of {runs} runs; RabbitMQ shares the cores"
    )
    print(render(results))
    write_json(json_path, "amqp", info, results)
    return 0
