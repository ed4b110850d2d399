"""A/B of two checkouts of fastq on one measure, alternating rounds in one run: each round runs
this script again in a fresh process with ``PYTHONPATH`` set to one checkout (its extensions
built in place: ``python setup.py build_ext --inplace`` there).

    python bench/ab_checkouts.py BASE NEW MEASURE [rounds]

MEASURE is one of:
- ``chains-sqlite`` / ``chains-memory``: 1,000 runs of the workflow bench's 4-step noop chain
  (``fastq._bench.workflow.Bench.chains``), three times a round: chain runs/s; ``chains-amqp``:
  the same through RabbitMQ at ``$FASTQ_AMQP_URL`` with a sqlite:// result store, as the
  workflow bench runs it (its queues deleted after the round);
- ``fanout-sqlite``: the workflow bench's fan-out of 1,000 ~1 ms steps: seconds divided by the
  elements' mean handler time (the run's own "1 ms"), so that a slower handler does not read as
  a slower engine; ``fanout-amqp``: the same through RabbitMQ, as ``chains-amqp``;
- ``result-sqlite``: 60 sequential ``wf.start`` + ``wf.result`` of a 2-step noop workflow
  against a ``fastq worker`` of its own, p50 in ms;
- ``call-sqlite``: 500 sequential ``call`` round trips of an echo task from a caller process of
  its own against an idle supervisor (``fastq._bench.pipeline``), p50 in ms; and
  ``call-sqlite-thread``: the same from a thread of the supervisor's process (both checkouts
  at f79ca61 or later: ``Pipeline.calls(in_process=)``); ``call-amqp``: the same through
  RabbitMQ at ``$FASTQ_AMQP_URL`` (default ``amqp://guest:guest@127.0.0.1:5672/``), direct
  reply-to, queues of the round's own, deleted after it.

Prints each round's figures and the median of each side. A sketch for a quick A/B, not a
replacement for the suites (``python -m fastq bench ...``), which measure against the peers.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURES = (
    "chains-sqlite",
    "chains-memory",
    "chains-amqp",
    "fanout-sqlite",
    "fanout-amqp",
    "result-sqlite",
    "call-sqlite",
    "call-sqlite-thread",
    "call-amqp",
)
RESULT_APP = """
import fastq

app = fastq.App("abresult", broker={url!r})
chain = app.workflow("chain")


@chain.step()
async def one(n: int) -> int:
    return n


@chain.step(depends_on=[one])
async def two(one: int) -> int:
    return one + 1
"""


def measure(what: str) -> list[float]:
    """One round of ``what`` in this process (the checkout on ``PYTHONPATH``)."""
    from fastq._bench import _burn_iterations

    with tempfile.TemporaryDirectory(prefix="fastq-ab-") as tmp:
        work = Path(tmp)
        if what.startswith("call"):
            return [_call_p50(work, what)]
        if what.startswith("result"):
            return [_result_p50(work)]
        from fastq._bench.workflow import CHAINS, Bench

        store = None
        if what.endswith("memory"):
            url = "memory://ab"
        elif what.endswith("amqp"):
            url = os.environ.get("FASTQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
            store = f"sqlite:///{work / 'store.db'}"
        else:
            url = f"sqlite:///{work / 'wf.db'}"
        b = Bench("ab", url, work, _burn_iterations(), store)
        try:
            if what.startswith("fanout"):
                took = b.fan()
                return [took / (b.handler_s[-1] * 1e3)]
            return [CHAINS / b.chains() for _ in range(3)]
        finally:
            b.close()


def _result_p50(work: Path) -> float:
    from fastq._bench import percentile, timed_calls
    from fastq.testing import terminate

    (work / "abresult.py").write_text(RESULT_APP.format(url=f"sqlite:///{work / 'r.db'}"))
    sys.path.insert(0, str(work))
    import abresult  # type: ignore[import-not-found]

    chain = abresult.chain
    worker = subprocess.Popen(
        [sys.executable, "-m", "fastq", "worker", "abresult:app"],
        cwd=work,
        env={**os.environ, "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{work}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:  # the run's value is its argument + 1: timed_calls checks each came back
        times = timed_calls(lambda i: chain.result(chain.start(i), timeout=60)["two"] - 1, 60, 1)
    finally:
        terminate(worker, 30)
    return percentile(times, 0.5) * 1e3


def _call_p50(work: Path, what: str) -> float:
    from fastq._bench import _burn_iterations, peers, percentile
    from fastq._bench.pipeline import CALLS, Pipeline

    amqp = what == "call-amqp"
    url = os.environ.get("FASTQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    prefix = f"fq-ab-{os.getpid()}-" if amqp else ""
    p = Pipeline(
        "ab", url if amqp else f"sqlite:///{work / 'p.db'}", work, _burn_iterations(), prefix
    )
    try:
        times = p.calls(CALLS, in_process=True) if what.endswith("thread") else p.calls(CALLS)
    finally:
        p.close()
        if amqp:
            peers.purge(url, prefix)
    return percentile(times, 0.5) * 1e3


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2])))
        return 0
    if len(sys.argv) < 4 or sys.argv[3] not in MEASURES:
        print(__doc__)
        return 2
    base, new, what = sys.argv[1:4]
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    figures: dict[str, list[float]] = {"base": [], "new": []}
    for r in range(rounds):
        for side, path in (("base", base), ("new", new)):
            env = {**os.environ, "PYTHONPATH": str(Path(path).resolve())}
            done = subprocess.run(
                [sys.executable, __file__, "--one", what],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                print(f"round {r + 1} {side} failed:\n{done.stderr[-2000:]}")
                return 1
            got = json.loads(done.stdout.strip().splitlines()[-1])
            figures[side].extend(got)
            print(f"round {r + 1} {side}: {', '.join(f'{g:,.3f}' for g in got)}", flush=True)
    for side, values in figures.items():
        print(f"{side} median {statistics.median(values):,.3f} ({what}, {len(values)} figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
