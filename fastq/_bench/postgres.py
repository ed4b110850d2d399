"""``python -m fastq bench --broker postgresql://...``: the engine suite on PostgreSQL.

Noop (the time to enqueue included), I/O (5 ms sleep) and CPU (~1 ms of pure Python) through
fastq with its defaults (autosize on, nothing set by hand) on a schema of its own, and in the same
run, in turn: the same scenarios on the embedded SQLite default (defaults too), and procrastinate,
the PostgreSQL task queue Python users pick, on a database of its own on the same server: one
worker process per core (``procrastinate worker``, concurrency 100 for the async noop and I/O
handlers, 1 for the CPU one), the same handlers, each appending a byte to a file; its rate runs
from its first completion to its last (its enqueue and start-up are not charged, fastq's noop
enqueue is). Beside them: ``send_many_async(..., connection=conn)`` inside the caller's
transactions (1,000 a transaction) and the latency from an idle supervisor's enqueue to the
handler (a message every 20 ms, p50 / p99). Medians of ``runs`` rounds.

Caveats: PostgreSQL runs on the same two cores as producer, supervisor and workers.
procrastinate gets fewer messages (its rate is what is compared; at its speed fastq's counts
would take minutes).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from fastq._bench import _burn_iterations, log

#: scenario -> (fastq's messages, procrastinate's messages)
SCENARIOS: dict[str, tuple[int, int]] = {
    "noop": (60_000, 5_000),
    "io": (12_000, 5_000),
    "cpu": (2_000, 2_000),
}
#: messages enqueued inside the caller's transactions, 1,000 a transaction
TX_MESSAGES = 20_000
#: the idle-to-handler latency pass: this many messages, one every 20 ms, from a producer process
IDLE_MESSAGES = 200

PROCRASTINATE = """
import asyncio
import time

import procrastinate

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo={url!r}))


@app.task(queue="noop")
async def noop(n):
    done()


@app.task(queue="io")
async def io(n):
    await asyncio.sleep(0.005)
    done()


@app.task(queue="cpu")
def cpu(n):
    burn()
    done()


def fill(scenario, n):
    task = globals()[scenario]
    with app.open():
        for start in range(0, n, 1000):
            task.batch_defer(*({{"n": i}} for i in range(start, min(n, start + 1000))))
"""


def _with_database(url: str, database: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{database}", query=""))


async def _admin(url: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_with_database(url, urllib.parse.urlsplit(url).path.strip("/")))
    try:
        for s in statements:
            await conn.execute(s)
    finally:
        await conn.close()


def _procrastinate(work: Path, url: str, burn: int, cores: int) -> Any:
    """A callable giving procrastinate's msgs/s for (scenario, n), or None if absent."""
    from fastq._bench.workers import Run, System

    command = [sys.executable, "-m", "procrastinate", "--app", "peer_procrastinate.app"]
    system = System("procrastinate", PROCRASTINATE, [], ("procrastinate", "psycopg"), procs=cores)
    if not system.installed():
        log("procrastinate is not installed (pip install 'fastq-engine[bench]'): skipped")
        return None
    database = f"fastq_bench_procrastinate_{uuid.uuid4().hex[:8]}"
    dsn = _with_database(url, database)

    def rate(scenario: str, n: int) -> float:
        asyncio.run(
            _admin(url, f"DROP DATABASE IF EXISTS {database}", f"CREATE DATABASE {database}")
        )
        run = Run(work, dsn, "", burn)
        run.module(system)  # the app module, so that the schema command can import it
        import subprocess

        subprocess.run(
            [*command, "schema", "--apply"], cwd=work, check=True, capture_output=True, timeout=120
        )
        concurrency = "1" if scenario == "cpu" else "100"
        system.command = [*command, "worker", "--queues", scenario, "--concurrency", concurrency]
        return run.measure(system, scenario, n)[0]

    rate.drop = lambda: asyncio.run(_admin(url, f"DROP DATABASE IF EXISTS {database}"))  # type: ignore[attr-defined]
    return rate


def _fastq_round(bench: Any, scenario: str, n: int) -> float:
    took, _ = bench.run(scenario, n, None, None, autosize=True)
    return n / float(took)


async def _tx_enqueue(bench: Any, url: str, n: int) -> float:
    """``send_many_async(..., connection=conn)`` in the caller's transactions: msgs/s."""
    import asyncpg

    task = bench.module.noop
    conn = await asyncpg.connect(url.partition("?")[0])
    try:
        start = time.perf_counter()
        for first in range(0, n, 1000):
            async with conn.transaction():
                await task.send_many_async(
                    [(time.time(),) for _ in range(min(1000, n - first))], connection=conn
                )
        return n / (time.perf_counter() - start)
    finally:
        await conn.execute(f"DELETE FROM {bench.schema}.messages WHERE queue = $1", task.queue)
        await conn.close()


def _produce_paced(workdir: str, module: str, n: int, interval: float) -> None:
    """A producer process of its own: one noop message every ``interval`` seconds."""
    import importlib

    sys.path.insert(0, workdir)
    task = importlib.import_module(module).noop
    start = time.perf_counter()
    for i in range(n):
        pause = start + i * interval - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        task.send(time.time())


def _idle_latencies(bench: Any) -> list[float]:
    """Seconds from each send (by another process) to its handler, the supervisor idle before
    each: a message every 20 ms."""
    import multiprocessing

    from fastq._aio import run_loop

    sup = bench.supervisor("noop", None, None, autosize=True)
    module = bench.spec.partition(":")[0]

    async def main() -> None:
        os.environ["FASTQ_BENCH_RECORD"] = "1"  # the workers about to be spawned record
        runner = asyncio.get_running_loop().create_task(sup.run())
        await sup.wait_workers_ready(timeout=60)
        os.environ.pop("FASTQ_BENCH_RECORD", None)
        producer = multiprocessing.get_context("spawn").Process(
            target=_produce_paced, args=(str(bench.dir), module, IDLE_MESSAGES, 0.02)
        )
        producer.start()
        await sup.wait_settled(IDLE_MESSAGES)
        producer.join(30)
        sup.stop()
        await runner

    run_loop(main())
    return sorted(bench.latencies())


def measure(url: str, runs: int) -> dict[str, Any]:
    from fastq._bench.engine import Bench

    burn = _burn_iterations()
    cores = len(os.sched_getaffinity(0))
    schema = f"fastq_bench_{uuid.uuid4().hex[:8]}"
    base = url.partition("?")[0]
    figures: dict[str, dict[str, list[float]]] = {s: {} for s in SCENARIOS}
    tx: list[float] = []
    idle: list[list[float]] = []
    with tempfile.TemporaryDirectory(prefix="fastq-bench-pg-") as tmp:
        work = Path(tmp)
        pg = Bench("postgres", work, burn, url=f"{base}?schema={schema}")
        pg.schema = schema  # type: ignore[attr-defined]
        sqlite = Bench("sqlite", work, burn)
        peer = _procrastinate(work, base, burn, cores)
        try:
            for r in range(runs):
                for scenario, (n, n_peer) in SCENARIOS.items():
                    got = figures[scenario]
                    got.setdefault("fastq postgres", []).append(_fastq_round(pg, scenario, n))
                    got.setdefault("fastq sqlite", []).append(_fastq_round(sqlite, scenario, n))
                    pg_rate, sqlite_rate = got["fastq postgres"][-1], got["fastq sqlite"][-1]
                    line = (
                        f"round {r + 1}/{runs} {scenario}: postgres {pg_rate:,.0f}/s, "
                        f"sqlite {sqlite_rate:,.0f}/s"
                    )
                    if peer is not None:
                        got.setdefault("procrastinate", []).append(peer(scenario, n_peer))
                        line += f", procrastinate {got['procrastinate'][-1]:,.0f}/s"
                    log(line)
                tx.append(asyncio.run(_tx_enqueue(pg, url, TX_MESSAGES)))
                idle.append(_idle_latencies(pg))
                log(
                    f"round {r + 1}/{runs}: enqueue in the caller's transaction {tx[-1]:,.0f}/s; "
                    f"idle-to-handler p50 {idle[-1][len(idle[-1]) // 2] * 1e3:.2f} ms"
                )
        finally:
            pg.close()
            sqlite.close()
            if peer is not None:
                peer.drop()
            asyncio.run(_admin(base, f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    return {
        "scenarios": {
            s: {k: statistics.median(v) for k, v in got.items()} for s, got in figures.items()
        },
        "runs": figures,
        "tx_enqueue_msgs_per_s": statistics.median(tx),
        "idle_p50_ms": statistics.median(r[len(r) // 2] for r in idle) * 1e3,
        "idle_p99_ms": statistics.median(r[int(len(r) * 0.99)] for r in idle) * 1e3,
    }


def main(*, url: str, runs: int, json_path: str | None) -> int:
    from fastq._bench import write_json
    from fastq._bench.ring import machine
    from fastq.broker.base import mask_url

    info = machine()
    log(f"fastq bench on {mask_url(url)}: {info['cpu']}, {info['usable_cores']} usable cores")
    result = measure(url, runs)
    print(
        f"fastq bench (engine on PostgreSQL) on {info['cpu']} ({info['usable_cores']} cores), "
        f"Python {info['python']}; defaults (autosize on); median of {runs} runs; noop includes "
        "fastq's enqueue, not procrastinate's"
    )
    print(f"  {'scenario':<9} {'postgres':>10} {'sqlite':>10} {'procrastinate':>14}  fastq pg is")
    for scenario, got in result["scenarios"].items():
        peer = got.get("procrastinate")
        ratio = f"{got['fastq postgres'] / peer:.1f}x procrastinate" if peer else "-"
        print(
            f"  {scenario:<9} {got['fastq postgres']:>10,.0f} {got['fastq sqlite']:>10,.0f} "
            f"{peer or 0:>14,.0f}  {ratio}"
        )
    print(
        f"  send_many_async(connection=conn), 1,000 a transaction: "
        f"{result['tx_enqueue_msgs_per_s']:,.0f} msgs/s"
    )
    print(
        f"  idle supervisor, enqueue to handler: p50 {result['idle_p50_ms']:.2f} ms, "
        f"p99 {result['idle_p99_ms']:.2f} ms"
    )
    write_json(json_path, "engine-postgres", info, [result])
    return 0
