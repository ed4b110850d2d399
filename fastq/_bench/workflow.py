"""``python -m fastq bench workflow``: (a) a fan-out of 1,000 steps of ~1 ms pure Python and its
fan-in, against the 2-core ideal (1,000 x 1 ms / usable cores); (b) 1,000 runs of a 4-step chain
of noop steps. memory:// and sqlite:// (with ``--broker amqp://...``: RabbitMQ, its runs in a
sqlite:// result store in the bench's temporary folder), fastq's defaults (the plan for this
machine, autosize on), its supervisor and workers in this process tree: once every worker is
ready the clock starts, the runs are started, and the clock stops when the last step's message
is settled. Each fan-out also reports its elements' mean handler time, from the run's own step
times: the "1 ms" the ideal assumes, as it came out in this run (a busy neighbour stretches it).

In the same run, rounds interleaved: Celery's chord and chain, Dramatiq's group and pipeline
(``fastq._bench.wfpeers``), on RabbitMQ with Redis result backends, where installed.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

APP = """
import fastq

app = fastq.App("wfbench", broker={url!r}, result_store={store!r})


def burn(n):
    x = 0
    for i in range(n):
        x += i * i
    return x


fan = app.workflow("fan")


@fan.step(queue={fan_q!r})
def source(n: int) -> list[int]:
    return list(range(n))


@fan.step(depends_on=[source], fan_out=True, queue={fan_q!r}, kind="cpu")
def work(source: int) -> int:
    burn({burn})
    return source


@fan.step(depends_on=[work], queue={fan_q!r})
def join(work: list[int]) -> int:
    return len(work)


chain = app.workflow("chain")


@chain.step(queue={chain_q!r})
async def one(n: int) -> int:
    return n


@chain.step(depends_on=[one], queue={chain_q!r})
async def two(one: int) -> int:
    return one


@chain.step(depends_on=[two], queue={chain_q!r})
async def three(two: int) -> int:
    return two


@chain.step(depends_on=[three], queue={chain_q!r})
async def four(three: int) -> int:
    return three
"""

FAN = 1_000
CHAINS = 1_000

#: the producer of the brokers other processes reach (the peers' producers are the bench
#: process, apart from their workers; so is this one, apart from fastq's supervisor): started
#: with the bench, it imports the app, then starts what each line of its input says
PRODUCER = """
import sys

import {module} as m

for line in sys.stdin:
    what, n = line.split()
    if what == "fan":
        print(m.fan.start(int(n)), flush=True)
    else:
        for i in range(int(n)):
            m.chain.start(i)
        print("started", flush=True)
"""


class Bench:
    def __init__(
        self, label: str, url: str, workdir: Path, burn: int, store: str | None = None
    ) -> None:
        module = f"fastq_wfbench_{label}"
        # queues of their own on a shared RabbitMQ: nothing left by another run is counted
        self.fan_q, self.chain_q = (f"wf-{k}-{int(time.time() * 1000)}" for k in ("fan", "chain"))
        source = APP.format(url=url, burn=burn, store=store, fan_q=self.fan_q, chain_q=self.chain_q)
        (workdir / f"{module}.py").write_text(textwrap.dedent(source))
        sys.path.insert(0, str(workdir))
        import importlib

        self.dir, self.module, self.spec = workdir, importlib.import_module(module), f"{module}:app"
        self.url = url
        #: each fan-out's elements' mean handler seconds, from the run's step times
        self.handler_s: list[float] = []
        #: memory:// is reached from this process only: its runs start from a thread here
        self.producer: subprocess.Popen[str] | None = None
        self.answer = ""
        if not url.startswith("memory"):
            self.producer = subprocess.Popen(
                [sys.executable, "-c", PRODUCER.format(module=module)],
                cwd=workdir,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )

    def produce(self, what: str, n: int) -> Callable[[], None]:
        """What starts ``n`` runs (``what``: fan, chain), in the producer process if there is
        one: it returns at once, and ``produced`` reads the producer's answer."""
        if self.producer is None:

            def start() -> None:
                if what == "fan":
                    self.answer = self.module.fan.start(n)
                    return
                for i in range(n):
                    self.module.chain.start(i)
                self.answer = "started"

            return start
        stdin = self.producer.stdin
        assert stdin is not None

        def send() -> None:
            stdin.write(f"{what} {n}\n")
            stdin.flush()

        return send

    def produced(self) -> str:
        if self.producer is None:
            return self.answer
        assert self.producer.stdout is not None
        return self.producer.stdout.readline().strip()

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
        took = self.timed(self.fan_q, FAN + 2, self.produce("fan", FAN))
        run_id = self.produced()
        assert self.module.fan.result(run_id, timeout=10) == {"join": FAN}
        elements = self.module.fan.status(run_id).steps["work"].elements
        assert len(elements) == FAN
        self.handler_s.append(sum(e.finished_at - e.started_at for e in elements) / FAN)
        return took

    def chains(self) -> float:
        took = self.timed(self.chain_q, 4 * CHAINS, self.produce("chain", CHAINS))
        assert self.produced() == "started"
        return took

    def close(self) -> None:
        sys.path.remove(str(self.dir))
        if self.producer is not None:
            assert self.producer.stdin is not None
            self.producer.stdin.close()
            try:
                self.producer.wait(30)  # it ends at the end of its input
            except subprocess.TimeoutExpired:
                self.producer.kill()
                self.producer.wait()
        if self.url.startswith("amqp"):
            from fastq._bench.wfpeers import delete_queues

            queues = (self.fan_q, self.chain_q)
            delete_queues(self.url, [q + s for q in queues for s in ("", ".dlq")])


def _figures(name: str, fans: list[float], chains: list[float], cores: int) -> dict[str, Any]:
    ideal = FAN * 0.001 / cores
    return {
        "system": name,
        "fan_out_s": statistics.median(fans),
        "fan_out_of_ideal": ideal / statistics.median(fans),
        "chain_runs_per_s": statistics.median(chains),
        "fan_out_runs": fans,
        "chain_runs": chains,
    }


def measure(
    runs: int, cores: int, broker: str | None, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """fastq's rows and the peers', rounds interleaved (a noisy minute hits everyone)."""
    from fastq._bench import _burn_iterations, wfpeers

    burn = _burn_iterations()
    amqp = broker or wfpeers.AMQP
    ideal = FAN * 0.001 / cores
    figures: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fastq-wfbench-") as tmp:
        work = Path(tmp)
        targets: list[tuple[str, str, str | None]] = [
            ("memory", "memory://wfbench", None),
            ("sqlite", f"sqlite:///{work / 'wf.db'}", None),
        ]
        if broker:
            targets.append(("amqp", broker, f"sqlite:///{work / 'results.db'}"))
        benches: list[Bench] = []
        handler: dict[str, list[float]] = {}
        try:
            for label, url, store in targets:  # each made in the try: a failure closes the rest
                benches.append(Bench(label, url, work, burn, store))
            peers = wfpeers.present(cores, amqp, log)
            for r in range(runs):
                for label, b in zip((t[0] for t in targets), benches):
                    name = f"fastq {label}"
                    fan, chain = figures.setdefault(name, ([], []))
                    fan.append(b.fan())
                    chain.append(CHAINS / b.chains())
                    handler[name] = b.handler_s
                    log(
                        f"round {r + 1}/{runs} {name}: fan-out {fan[-1]:.3f} s "
                        f"({ideal / fan[-1]:.0%} of ideal; elements' mean handler time "
                        f"{b.handler_s[-1] * 1e3:.2f} ms), "
                        f"{chain[-1]:,.0f} chain runs/s"
                    )
                for system in peers:
                    peer = None
                    try:
                        peer = wfpeers.Peer(system, work, amqp, burn, f"{int(time.time())}-{r}")
                        peer.warm()
                        took, rate = peer.fan(FAN), CHAINS / peer.chains(CHAINS)
                    except Exception as e:  # noqa: BLE001 - a peer's failure is logged; the rest run
                        log(f"round {r + 1}/{runs} {system.name} failed: {type(e).__name__}: {e}")
                        continue
                    finally:
                        if peer is not None:
                            peer.close()
                    fan, chain = figures.setdefault(system.name, ([], []))
                    fan.append(took)
                    chain.append(rate)
                    log(
                        f"round {r + 1}/{runs} {system.name}: fan-out {took:.3f} s "
                        f"({ideal / took:.0%} of ideal), {rate:,.0f} chain runs/s"
                    )
        finally:
            for b in benches:
                try:
                    b.close()
                except Exception as e:  # noqa: BLE001 - the others are closed all the same
                    log(f"closing the fastq {b.url} bench failed: {type(e).__name__}: {e}")
    results = [_figures(name, fans, chains, cores) for name, (fans, chains) in figures.items()]
    for row in results:
        if row["system"] in handler:
            row["handler_ms"] = statistics.median(handler[row["system"]]) * 1e3
    return results


def render(results: list[dict[str, Any]]) -> list[str]:
    head = f"  {'system':<24} {'fan-out s':>10} {'of ideal':>9} {'handler ms':>11} "
    lines = [head + f"{'chain runs/s':>13}"]
    for r in results:
        handler = f"{r['handler_ms']:.2f}" if "handler_ms" in r else "-"
        lines.append(
            f"  {r['system']:<24} {r['fan_out_s']:>10.3f} {r['fan_out_of_ideal']:>9.0%} "
            f"{handler:>11} {r['chain_runs_per_s']:>13,.0f}"
        )
    ours = [r for r in results if r["system"].startswith("fastq")]
    peers = [r for r in results if not r["system"].startswith("fastq")]
    for r in ours:
        ratios = [
            f"{p['system']}: fan-out {p['fan_out_s'] / r['fan_out_s']:.1f}x, chain "
            f"{r['chain_runs_per_s'] / p['chain_runs_per_s']:.1f}x"
            for p in peers
        ]
        r["ratios"] = {
            p["system"]: {
                "fan_out": p["fan_out_s"] / r["fan_out_s"],
                "chain": r["chain_runs_per_s"] / p["chain_runs_per_s"],
            }
            for p in peers
        }
        if ratios:
            lines.append(f"  {r['system']} vs " + "; ".join(ratios))
    if not peers:
        lines.append("  (no peer ran: no ratios)")
    return lines


def main(*, runs: int, json_path: str | None, broker: str | None = None) -> int:
    from fastq._bench import log, write_json
    from fastq._bench.ring import machine
    from fastq.broker.base import mask_url

    info = machine()
    cores = int(info["usable_cores"])
    results = measure(runs, cores, broker, log)
    print(
        f"fastq bench workflow on {info['cpu']} ({cores} cores), Python {info['python']}; "
        f"medians of {runs} rounds, systems interleaved: (a) a fan-out of {FAN:,} steps of "
        f"~1 ms and its fan-in (ideal: {FAN * 0.001 / cores:.2f} s); (b) {CHAINS:,} runs of a "
        "4-step noop chain"
    )
    if broker:
        print(
            f"  fastq amqp: RabbitMQ at {mask_url(broker)}, its runs in a sqlite:// result store "
            "in the bench's temporary folder"
        )
    print("\n".join(render(results)))
    print(
        "  (handler ms: the fan-out elements' mean handler time from the run's step times; "
        "peers: RabbitMQ + Redis results, a worker process per core)"
    )
    write_json(json_path, "workflow", info, results)
    return 0
