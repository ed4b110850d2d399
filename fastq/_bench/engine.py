"""``python -m fastq bench`` (engine): noop, I/O and CPU handlers through the whole engine.

For each broker (``memory://``, and the embedded ``sqlite://`` default) and each scenario, the queue
is filled, then the supervisor and its pinned workers run in this process tree until every message
is acked. Rates are messages per second over that run, timed from the moment every worker is ready;
for SQLite noop the time to enqueue is added (that figure includes the enqueue, the broker's whole
round trip), while SQLite I/O and CPU rates are the processing rate, which is what their baselines
measure too, with the enqueue rate beside them. A second, paced pass (producer at a quarter of the
measured rate) gives latency from enqueue to handler done, p50 and p99. On SQLite each round
runs, in turn with fastq's, the embedded queue users would pick instead: huey with its SQLite
storage and its process consumer (a worker per core), the same handlers and count, each
handler appending a byte to a file; huey's rate runs from its first completion to its last
(enqueue and start-up not charged), fastq's from its workers' start (and for noop from the
first enqueue). Medians of ``runs`` rounds.

Caveats: two cores are shared by producer, supervisor and workers; concurrency and prefetch are
set per scenario (printed in the table), not grown by load, which is the autosize issue's work.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import struct
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastq._bench import _burn_iterations

#: per scenario: its handler (and queue), messages, concurrency (host), prefetch (host). None is
#: the plan's formula (cpu: one handler per core, prefetch = cores x 2); "x3", the cpu formula's
#: upper bound, is measured by ``python -m fastq bench autosize`` beside the rest of its sweep.
SCENARIOS: dict[str, tuple[str, int, int | None, int | None]] = {
    "noop": ("noop", 60_000, 100, 2_000),
    "io": ("io", 12_000, 100, 1_000),
    "cpu": ("cpu", 2_000, None, None),
}

APP = """
import asyncio, os, struct, time
import fastq

app = fastq.App("bench", broker={url!r})
_LAT = {lat!r}
# Only the paced pass records latency (one 8-byte append per message); the throughput pass does
# nothing but its work, so that recording does not weigh on the rate.
_fd = None
if os.environ.get("FASTQ_BENCH_RECORD"):
    _fd = os.open(_LAT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

def _record(t):
    if _fd is not None:
        os.write(_fd, struct.pack("d", time.time() - t))

def burn():
    x = 0
    for i in range({burn}):
        x += i * i
    return x

@app.task(queue="{prefix}noop", kind="io")
async def noop(t: float) -> None:
    _record(t)

@app.task(queue="{prefix}io", kind="io")
async def io(t: float) -> None:
    await asyncio.sleep(0.005)
    _record(t)

@app.task(queue="{prefix}cpu", kind="cpu")
def cpu(t: float) -> None:
    burn()
    _record(t)
"""


class Bench:
    def __init__(
        self, broker: str, workdir: Path, burn: int, url: str | None = None, prefix: str = ""
    ) -> None:
        self.dir = workdir
        self.lat = workdir / f"lat-{broker}.bin"
        if url is None:
            url = "memory://bench" if broker == "memory" else f"sqlite:///{workdir / 'bench.db'}"
        self.prefix = prefix
        module = f"fastq_bench_{broker}"
        (workdir / f"{module}.py").write_text(
            textwrap.dedent(APP.format(url=url, lat=str(self.lat), burn=burn, prefix=prefix))
        )
        sys.path.insert(0, str(workdir))
        import importlib

        self.module = importlib.import_module(module)
        self.spec = f"{module}:app"
        self.broker = broker

    def supervisor(
        self,
        scenario: str,
        concurrency: int | None,
        prefetch: int | None,
        *,
        autosize: bool = False,
    ) -> Any:
        """A supervisor for one scenario's queue, planned on this machine with these settings."""
        from fastq.autosize import Topology, plan
        from fastq.config import Config
        from fastq.engine.supervisor import Supervisor

        app = self.module.app
        task = getattr(self.module, scenario)
        config = Config(
            broker_url=app.config.broker_url,
            concurrency=concurrency,
            prefetch=prefetch,
            autosize=autosize,
        )
        the_plan = plan(Topology.detect(), [task.options], config)
        return Supervisor(app, self.spec, the_plan, config, [task.queue])

    def run(
        self,
        scenario: str,
        n: int,
        concurrency: int | None,
        prefetch: int | None,
        pace: float | None = None,
        autosize: bool = False,
    ) -> tuple[float, float]:
        """Seconds to process ``n`` messages (enqueue included for noop on the SQL brokers),
        and enqueue seconds."""
        task = getattr(self.module, scenario)
        # The settings in the table, held unless asked: the controller (autosize) is measured on
        # its own.
        sup = self.supervisor(scenario, concurrency, prefetch, autosize=autosize)
        enqueue = 0.0
        if pace is None:  # fill the queue first
            t = time.perf_counter()
            for start in range(0, n, 2_000):
                task.send_many((time.time(),) for _ in range(min(2_000, n - start)))
            enqueue = time.perf_counter() - t

        async def main() -> float:
            if pace is not None:
                os.environ["FASTQ_BENCH_RECORD"] = "1"  # the workers about to be spawned record
            runner = asyncio.get_running_loop().create_task(sup.run())
            await sup.wait_workers_ready(timeout=60)  # started, app imported: the clock starts
            os.environ.pop("FASTQ_BENCH_RECORD", None)
            t0 = time.perf_counter()
            if pace is not None:
                threading.Thread(target=self._paced, args=(task, n, pace), daemon=True).start()
            await sup.wait_settled(n)
            took = time.perf_counter() - t0
            sup.stop()
            await runner
            return took

        from fastq._aio import run_loop

        took = run_loop(main())
        charged = self.broker in ("sqlite", "postgres") and scenario == "noop"
        return took + (enqueue if charged else 0.0), enqueue

    @staticmethod
    def _paced(task: Any, n: int, rate: float) -> None:
        batch = max(1, int(rate / 200))  # 200 batches a second
        start = time.perf_counter()
        for sent in range(0, n, batch):
            delay = start + sent / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            task.send_many((time.time(),) for _ in range(min(batch, n - sent)))

    def latencies(self) -> list[float]:
        data = self.lat.read_bytes() if self.lat.exists() else b""
        self.lat.unlink(missing_ok=True)
        return list(struct.unpack(f"{len(data) // 8}d", data))

    def close(self) -> None:
        sys.path.remove(str(self.dir))


def _huey(work: Path, burn: int, log: Callable[[str], None]) -> Any:
    """A callable giving huey's msgs/s for (handler, n) in this run, or None if absent."""
    from fastq._bench.workers import Run, huey_system

    cores = len(os.sched_getaffinity(0))
    system = huey_system(cores)
    if not system.installed():
        log("huey is not installed (pip install 'fastq-engine[bench]'): its column is skipped")
        return None
    db = work / "huey.db"
    run = Run(work, str(db), "", burn)

    def rate(handler: str, n: int) -> float:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        return run.measure(system, handler, n)[0]

    return rate


def measure(brokers: list[str], runs: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    burn = _burn_iterations()
    results = []
    cores = len(os.sched_getaffinity(0))
    peer = f"huey (SQLite storage, process consumer, {cores} workers)"
    with tempfile.TemporaryDirectory(prefix="fastq-bench-") as tmp:
        huey = _huey(Path(tmp), burn, log)
        for broker in brokers:
            bench = Bench(broker, Path(tmp), burn)
            try:
                for label, (scenario, n, concurrency, prefetch) in SCENARIOS.items():
                    rates: list[float] = []
                    enqueues: list[float] = []
                    base: dict[str, list[float]] = {}
                    for r in range(runs):
                        took, enq = bench.run(scenario, n, concurrency, prefetch)
                        rates.append(n / took)
                        enqueues.append(enq)
                        line = f"{broker} {label} round {r + 1}/{runs}: {n / took:,.0f} msgs/s"
                        if broker == "sqlite" and huey is not None:  # the embedded peer, in turn
                            base.setdefault(peer, []).append(huey(scenario, n))
                            line += f"; huey {base[peer][-1]:,.0f} msgs/s"
                        log(line)
                    rate = statistics.median(rates)
                    # ~1 s
                    bench.run(
                        scenario, max(200, int(rate / 4)), concurrency, prefetch, pace=rate / 4
                    )
                    lat = sorted(bench.latencies())
                    results.append(
                        {
                            "broker": broker,
                            "scenario": label,
                            "messages": n,
                            "concurrency": concurrency,
                            "prefetch": prefetch,
                            "msgs_per_s": rate,
                            "runs_msgs_per_s": rates,
                            "enqueue_msgs_per_s": n / statistics.median(enqueues)
                            if any(enqueues)
                            else None,
                            "p50_ms": lat[len(lat) // 2] * 1e3 if lat else None,
                            "p99_ms": lat[int(len(lat) * 0.99)] * 1e3 if lat else None,
                            "baselines": {k: statistics.median(v) for k, v in base.items()},
                        }
                    )
            finally:
                bench.close()
    return results


def render(results: list[dict[str, Any]]) -> str:
    lines = [
        (
            f"  {'broker':<7} {'scenario':<9} {'msgs/s':>10} {'enqueue/s':>10} {'p50 ms':>8} "
            f"{'p99 ms':>8}   {'concurrency/prefetch':<20} baseline in the same run"
        )
    ]
    for r in results:
        setting = f"{r['concurrency'] or 'cores'}/{r['prefetch'] or 'x2'}"
        base = "; ".join(
            f"{k}: {v:,.0f}/s, fastq {r['msgs_per_s'] / v:.2f}x" for k, v in r["baselines"].items()
        )
        if r["scenario"] == "io" and r["concurrency"]:
            base += (
                f"; {r['msgs_per_s'] / (r['concurrency'] / 0.005):.1%} of {r['concurrency']} / 5 ms"
            )
        enqueue = f"{r['enqueue_msgs_per_s']:,.0f}" if r["enqueue_msgs_per_s"] else "-"
        p50 = f"{r['p50_ms']:.1f}" if r["p50_ms"] is not None else "-"
        p99 = f"{r['p99_ms']:.1f}" if r["p99_ms"] is not None else "-"
        lines.append(
            f"  {r['broker']:<7} {r['scenario']:<9} {r['msgs_per_s']:>10,.0f} {enqueue:>10} "
            f"{p50:>8} "
            f"{p99:>8}   {setting:<20} {base}"
        )
    return "\n".join(lines)


def main(*, runs: int, json_path: str | None) -> int:
    from fastq._bench import log, write_json
    from fastq._bench.ring import machine

    info = machine()
    log(
        f"fastq bench: {info['cpu']}, {info['usable_cores']} usable cores, Python "
        f"{info['python']}, "
        f"ring implementation {info['implementation']}"
    )
    results = measure(["memory", "sqlite"], runs, log)
    print(
        f"fastq bench (engine) on {info['cpu']} ({info['usable_cores']} cores), Python "
        f"{info['python']}, "
        f"ring {info['implementation']}; median of {runs} runs; sqlite noop msgs/s include the "
        "enqueue; "
        "latency from a paced pass at 1/4 of that rate"
    )
    print(render(results))
    write_json(json_path, "engine", info, results)
    return 0
