"""``python -m fastq bench workflow``: (a) a fan-out of 1,000 steps of ~1 ms pure Python and its
fan-in, against the 2-core ideal (1,000 x 1 ms / usable cores); (b) 1,000 runs of a 4-step chain
of noop steps. memory:// and sqlite://, fastq's defaults (the plan for this machine, autosize
on), its supervisor and workers in this process tree: once every worker is ready the clock
starts, the runs are started, and the clock stops when the last step's message is settled.

Peers (Celery's chord and chain, Dramatiq's group and pipeline) are not measured here yet, and
workflows do not run on RabbitMQ yet: this suite takes no ``--broker``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

APP = """
import fastq

app = fastq.App("wfbench", broker={url!r})


def burn(n):
    x = 0
    for i in range(n):
        x += i * i
    return x


fan = app.workflow("fan")


@fan.step(queue="wf-fan")
def source(n: int) -> list[int]:
    return list(range(n))


@fan.step(depends_on=[source], fan_out=True, queue="wf-fan", kind="cpu")
def work(source: int) -> int:
    burn({burn})
    return source


@fan.step(depends_on=[work], queue="wf-fan")
def join(work: list[int]) -> int:
    return len(work)


chain = app.workflow("chain")


@chain.step(queue="wf-chain")
async def one(n: int) -> int:
    return n


@chain.step(depends_on=[one], queue="wf-chain")
async def two(one: int) -> int:
    return one


@chain.step(depends_on=[two], queue="wf-chain")
async def three(two: int) -> int:
    return two


@chain.step(depends_on=[three], queue="wf-chain")
async def four(three: int) -> int:
    return three
"""

FAN = 1_000
CHAINS = 1_000


class Bench:
    def __init__(self, label: str, url: str, workdir: Path, burn: int) -> None:
        module = f"fastq_wfbench_{label}"
        (workdir / f"{module}.py").write_text(textwrap.dedent(APP.format(url=url, burn=burn)))
        sys.path.insert(0, str(workdir))
        import importlib

        self.dir, self.module, self.spec = workdir, importlib.import_module(module), f"{module}:app"

    def timed(self, queue: str, settled: int, start: Any) -> float:
        """Seconds from ``start()`` (called once every worker is ready, off the loop) until
        ``settled`` messages of ``queue`` were settled."""
        from fastq._aio import run_loop
        from fastq.autosize import plan_app
        from fastq.engine.supervisor import Supervisor

        app = self.module.app
        sup = Supervisor(app, self.spec, plan_app(app, [queue]), app.config, [queue])

        async def main() -> float:
            runner = asyncio.get_running_loop().create_task(sup.run())
            await sup.wait_workers_ready(timeout=60)
            t0 = time.perf_counter()
            await asyncio.get_running_loop().run_in_executor(None, start)
            while sup.settled_by_queue[queue] < settled:
                await asyncio.sleep(0.002)
            took = time.perf_counter() - t0
            sup.stop()
            await runner
            return took

        return run_loop(main())

    def fan(self) -> float:
        ids: list[str] = []
        took = self.timed("wf-fan", FAN + 2, lambda: ids.append(self.module.fan.start(FAN)))
        assert self.module.fan.result(ids[0], timeout=10) == {"join": FAN}
        return took

    def chains(self) -> float:
        def start() -> None:
            for i in range(CHAINS):
                self.module.chain.start(i)

        return self.timed("wf-chain", 4 * CHAINS, start)

    def close(self) -> None:
        sys.path.remove(str(self.dir))


def measure(label: str, url: str, runs: int, cores: int) -> dict[str, Any]:
    from fastq._bench import _burn_iterations, log

    out: dict[str, Any] = {"system": f"fastq {label}"}
    with tempfile.TemporaryDirectory(prefix="fastq-wfbench-") as tmp:
        if url.startswith("sqlite"):
            url = f"sqlite:///{Path(tmp) / 'wf.db'}"
        b = Bench(label, url, Path(tmp), _burn_iterations())
        try:
            fans, chains = [], []
            for r in range(runs):
                fans.append(b.fan())
                ideal = FAN * 0.001 / cores
                share = ideal / fans[-1]
                log(
                    f"fastq {label} fan-out {r + 1}/{runs}: {fans[-1]:.3f} s ({share:.0%} of ideal)"
                )
                chains.append(CHAINS / b.chains())
                log(f"fastq {label} chain {r + 1}/{runs}: {chains[-1]:,.0f} runs/s")
            out["fan_out_s"] = statistics.median(fans)
            out["fan_out_of_ideal"] = FAN * 0.001 / cores / out["fan_out_s"]
            out["chain_runs_per_s"] = statistics.median(chains)
            out["fan_out_runs"], out["chain_runs"] = fans, chains
        finally:
            b.close()
    return out


def main(*, runs: int, json_path: str | None) -> int:
    from fastq._bench import write_json
    from fastq._bench.ring import machine

    info = machine()
    cores = int(info["usable_cores"])
    results = [
        measure("memory", "memory://wfbench", runs, cores),
        measure("sqlite", "sqlite:///", runs, cores),
    ]
    print(
        f"fastq bench workflow on {info['cpu']} ({cores} cores), median of {runs} runs: "
        f"(a) a fan-out of {FAN:,} steps of ~1 ms and its fan-in (ideal: {FAN * 0.001 / cores:.2f} "
        f"s); (b) {CHAINS:,} runs of a 4-step noop chain"
    )
    print(f"  {'system':<20} {'fan-out s':>10} {'of ideal':>9} {'chain runs/s':>13}")
    for r in results:
        print(
            f"  {r['system']:<20} {r['fan_out_s']:>10.3f} {r['fan_out_of_ideal']:>9.0%} "
            f"{r['chain_runs_per_s']:>13,.0f}"
        )
    write_json(json_path, "workflow", info, results)
    return 0
