"""``python -m fastq bench pipeline``: a three-stage chain (``a -> b -> c`` by ``publish_to``) of
noop and of ~1 ms CPU stages, and ``call`` round trips, p50 and p99.

fastq runs with the defaults a user gets (the plan for this machine, autosize on), its
supervisor and workers in this process tree: the queue of stage ``a`` is filled, the clock
starts when every worker is ready and stops when stage ``c`` acked the last message. ``call``
latency: one caller, one call at a time, against an idle supervisor; the caller is a process of
its own (a thread of the supervisor's on memory://, which no other process reaches). On
``--broker amqp://`` the same, through RabbitMQ (the chain and ``call`` over direct reply-to),
beside the pipelines that users write today on the same RabbitMQ, each with its own worker:
Celery's ``chain`` and Dramatiq's ``pipeline`` (skipped, with a line that says so, when not
installed: the ``bench`` extra installs them), and for ``call``, Celery's ``.delay().get()``
with a Redis result backend (``fastq._bench.peers``), and RabbitMQ's own floor for a call: an
RPC over direct reply-to written by hand with aiormq (``fastq._bench.rpcfloor``). Medians of
``runs`` rounds.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

APP = """
import fastq

app = fastq.App("pipeline", broker={url!r})


def burn(n):
    x = 0
    for i in range(n):
        x += i * i
    return x


@app.task(queue="{p}noop-c")
async def noop_c(n: int) -> None:
    pass


@app.task(queue="{p}noop-b", publish_to=noop_c)
async def noop_b(n: int) -> int:
    return n


@app.task(queue="{p}noop-a", publish_to=noop_b)
async def noop_a(n: int) -> int:
    return n


@app.task(queue="{p}cpu-c", kind="cpu")
def cpu_c(n: int) -> None:
    burn({burn})


@app.task(queue="{p}cpu-b", kind="cpu", publish_to=cpu_c)
def cpu_b(n: int) -> int:
    burn({burn})
    return n


@app.task(queue="{p}cpu-a", kind="cpu", publish_to=cpu_b)
def cpu_a(n: int) -> int:
    burn({burn})
    return n


@app.task(queue="{p}echo")
async def echo(n: int) -> int:
    return n
"""

#: the caller of ``call``, a process of its own: it prints each call's seconds (JSON)
CALLER = """
import json

import {module} as m
from fastq._bench import timed_calls

print(json.dumps(timed_calls(lambda i: m.echo.call(i, timeout=60), {n}, warmup=20)))
"""

#: per scenario: messages through the chain
CHAINS = {"noop": 20_000, "cpu": 1_000}
CALLS = 500


class Pipeline:
    """fastq's side: the app in a module of its own, a supervisor per run."""

    def __init__(self, label: str, url: str, workdir: Path, burn: int, prefix: str = "") -> None:
        module = f"fastq_pipeline_{label}"
        (workdir / f"{module}.py").write_text(
            textwrap.dedent(APP.format(url=url, burn=burn, p=prefix))
        )
        sys.path.insert(0, str(workdir))
        import importlib

        self.dir, self.module, self.spec = workdir, importlib.import_module(module), f"{module}:app"

    def supervisor(self, queues: list[str]) -> Any:
        from fastq.autosize import plan_app
        from fastq.engine.supervisor import Supervisor

        app = self.module.app
        return Supervisor(app, self.spec, plan_app(app, queues), app.config, queues)

    def chain(self, scenario: str, n: int) -> float:
        """Seconds for ``n`` messages through the three stages (stage a filled first)."""
        first = getattr(self.module, f"{scenario}_a")
        queues = [getattr(self.module, f"{scenario}_{s}").queue for s in "abc"]
        for start in range(0, n, 2_000):
            first.send_many((i,) for i in range(start, min(n, start + 2_000)))
        sup = self.supervisor(queues)

        async def main() -> float:
            runner = asyncio.get_running_loop().create_task(sup.run())
            await sup.wait_workers_ready(timeout=60)
            t0 = time.perf_counter()
            while sup.settled_by_queue[queues[2]] < n:
                await asyncio.sleep(0.005)
            took = time.perf_counter() - t0
            sup.stop()
            await runner
            return took

        from fastq._aio import run_loop

        return run_loop(main())

    def calls(self, n: int, in_process: bool = False) -> list[float]:
        """Seconds of each of ``n`` sequential calls (after 20 not counted), made by a process
        of their own (as Celery's caller is apart from its workers), or on memory://, which
        only this process reaches, by a thread of the supervisor's (``in_process``: that
        thread whatever the broker)."""
        from fastq._bench import timed_calls

        echo = self.module.echo
        sup = self.supervisor([echo.queue])
        times: list[float] = []
        failed: list[str] = []

        def caller() -> None:
            if in_process or self.module.app.broker.url.startswith("memory"):
                times.extend(timed_calls(lambda i: echo.call(i, timeout=60), n, warmup=20))
                return
            script = CALLER.format(module=self.module.__name__, n=n)
            done = subprocess.run(
                [sys.executable, "-c", script],
                check=False,
                cwd=self.dir,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                failed.append(done.stderr[-2000:])
                return
            times.extend(json.loads(done.stdout))

        async def main() -> None:
            runner = asyncio.get_running_loop().create_task(sup.run())
            await sup.wait_workers_ready(timeout=60)
            thread = threading.Thread(target=caller, daemon=True)
            thread.start()
            while thread.is_alive():
                await asyncio.sleep(0.01)
            sup.stop()
            await runner

        from fastq._aio import run_loop

        run_loop(main())
        if failed:
            raise RuntimeError(f"the bench's caller process failed: {failed[0]}")
        return times

    def close(self) -> None:
        sys.path.remove(str(self.dir))


def measure_fastq(
    label: str, url: str, runs: int, log: Callable[[str], None], prefix: str = ""
) -> dict[str, Any]:
    from fastq._bench import _burn_iterations, call_figures, chain_figures

    burn = _burn_iterations()
    out: dict[str, Any] = {"system": f"fastq {label}"}
    with tempfile.TemporaryDirectory(prefix="fastq-pipeline-") as tmp:
        if url.startswith("sqlite"):
            url = f"sqlite:///{Path(tmp) / 'pipeline.db'}"
        p = Pipeline(label, url, Path(tmp), burn, prefix)
        try:
            for scenario, n in CHAINS.items():
                rates = []
                for r in range(runs):
                    rates.append(n / p.chain(scenario, n))
                    log(f"fastq {label} chain {scenario} {r + 1}/{runs}: {rates[-1]:,.0f} msgs/s")
                out.update(chain_figures(scenario, rates))
            rounds = []
            for r in range(runs):
                rounds.append(p.calls(CALLS))
                figures = call_figures(rounds[-1:])
                log(f"fastq {label} call {r + 1}/{runs}: {figures}")
            out.update(call_figures(rounds))
        finally:
            p.close()
    return out


def render(results: list[dict[str, Any]]) -> str:
    def num(r: dict[str, Any], key: str, fmt: str) -> str:
        v = r.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    head = (
        f"  {'system':<40} {'chain noop/s':>13} {'chain cpu/s':>12} {'call p50 ms':>12} "
        f"{'call p99 ms':>12}"
    )
    lines = [head]
    for r in results:
        lines.append(
            f"  {r['system']:<40} {num(r, 'chain_noop_msgs_per_s', ',.0f'):>13} "
            f"{num(r, 'chain_cpu_msgs_per_s', ',.0f'):>12} {num(r, 'call_p50_ms', '.2f'):>12} "
            f"{num(r, 'call_p99_ms', '.2f'):>12}"
        )
    return "\n".join(lines)


def main(*, runs: int, url: str | None, json_path: str | None) -> int:
    from fastq._bench import log, write_json
    from fastq._bench.ring import machine

    info = machine()
    log(f"fastq bench pipeline: {info['cpu']}, {info['usable_cores']} usable cores")
    results: list[dict[str, Any]] = []
    if url is None:
        results.append(measure_fastq("memory", "memory://pipeline", runs, log))
        results.append(measure_fastq("sqlite", "sqlite:///", runs, log))
    else:
        from fastq._bench import peers, rpcfloor

        prefix = f"fq-pipe-{int(time.time())}-"
        try:
            results.append(measure_fastq("amqp", url, runs, log, prefix))
        finally:
            peers.purge(url, prefix)
        results.extend(peers.measure(url, runs, CHAINS, CALLS, log))
        try:
            results.append(rpcfloor.measure(url, runs, CALLS, log))
        except RuntimeError as e:  # the rows measured so far are printed all the same
            log(f"{rpcfloor.NAME}: skipped: {e}")
    print(
        f"fastq bench pipeline on {info['cpu']} ({info['usable_cores']} cores), median of {runs} "
        f"runs: {CHAINS['noop']:,} noop / {CHAINS['cpu']:,} ~1 ms CPU messages through 3 stages "
        f"(msgs/s = messages through all three); {CALLS} sequential calls"
    )
    print(render(results))
    write_json(json_path, "pipeline", info, results)
    return 0
