"""``python -m fastq bench autosize``: the controller against hand-set settings, in one run.

For noop, I/O (5 ms sleep) and CPU (about 1 ms of Python) handlers on ``memory://``, each
(concurrency, prefetch) pair of the sweep is held for a few seconds, then the autosized engine
starts from the formula; every run has a backlog that outlasts it, and its rate is read every
second. The two best held pairs are then measured again, alternating with autosized runs, ROUNDS
times, each over the same backlog as the autosized run, and the better of the two in each round is
that round's best: one noisy sweep may crown the wrong pair, and a fresh measure beside each
autosized run keeps the comparison in the same minute of a shared machine (the higher of two noisy
rates still leans to the held side). Reported per scenario: the sweep, and over the rounds the
medians of the autosized rate once it settled (median of its last three seconds), of that as a share
of the round's best, and of the seconds until the autosized rate first reached 95% of it (the change
of load is the start: from no work to a backlog).

Caveats: one broker (memory), one machine, the controller's own intervals; the autosized run
is capped at ``seconds`` and includes nothing but the controller's own ramp.
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastq._bench import _burn_iterations
from fastq._bench.engine import Bench

#: per scenario, the (concurrency, prefetch) pairs held by hand; "cores" is the usable cores,
#: "xN" N times the cores (x20: a CPU prefetch as deep as the controller's buffer of short
#: handlers may go)
SWEEP: dict[str, list[tuple[int | str, int | str]]] = {
    "noop": [(4, 20), (16, 160), (100, 500), (100, 2_000)],
    "io": [(4, 20), (16, 160), (100, 1_000), (500, 5_000), (1_000, 10_000)],
    "cpu": [("cores", "x2"), ("cores", "x3"), ("cores", "x20"), ("2cores", "x2")],
}
#: seconds of each held run; its rate is the median of the last three
HELD_SECONDS = 5
#: the best held pair and the autosized engine, measured alternately this many times
ROUNDS = 3


def _resolve(value: int | str, cores: int) -> int:
    if value == "cores":
        return cores
    if value == "2cores":
        return 2 * cores
    if isinstance(value, str) and value.startswith("x"):
        return int(value[1:]) * cores
    assert isinstance(value, int)
    return value


#: messages per second a backlog is sized for, per scenario (above what this machine carries)
CEILING = {"noop": 400_000, "io": 200_000, "cpu": 2_500}


def run(
    bench: Bench,
    scenario: str,
    seconds: float,
    concurrency: int | None = None,
    prefetch: int | None = None,
    fill_for: float | None = None,
) -> list[float]:
    """Messages per second in each second of a run with a backlog that outlasts it (sized for
    ``fill_for`` seconds, default ``seconds``): held at (concurrency, prefetch), or autosized
    from the formula when both are None."""
    from fastq._aio import run_loop

    app = bench.module.app
    task = getattr(bench.module, scenario)
    sup = bench.supervisor(
        scenario, concurrency, prefetch, autosize=concurrency is None and prefetch is None
    )
    batch = [task.message(time.time()) for _ in range(10_000)]  # the same messages, many times:
    for _ in range(
        int(CEILING[scenario] * ((fill_for or seconds) + 1)) // len(batch) + 1
    ):  # a quick fill
        app.broker.publish_sync(scenario, batch)
    gc.collect()
    gc.freeze()  # millions of queued entries must not make every collection slow

    async def main() -> list[float]:
        runner = asyncio.get_running_loop().create_task(sup.run())
        await sup.wait_workers_ready(timeout=60)
        rates, last = [], sup.settled_by_queue[scenario]
        t = time.perf_counter()
        for _ in range(int(seconds)):
            await asyncio.sleep(1.0)
            now, done = time.perf_counter(), sup.settled_by_queue[scenario]
            rates.append((done - last) / (now - t))
            last, t = done, now
        sup.stop()
        sup.stop()  # the second request gives the backlog back at once
        await runner
        return rates

    try:
        return run_loop(main())
    finally:
        gc.unfreeze()
        app.broker._queues.clear()  # memory:// only: the next run starts empty


def measure(seconds: float, log: Callable[[str], None]) -> list[dict[str, Any]]:
    cores = len(os.sched_getaffinity(0))
    burn = _burn_iterations()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fastq-bench-autosize-") as tmp:
        bench = Bench("memory", Path(tmp), burn)
        try:
            for scenario, pairs in SWEEP.items():
                sweep: list[dict[str, Any]] = []
                for c, p in pairs:
                    concurrency, prefetch = _resolve(c, cores), _resolve(p, cores)
                    rate = statistics.median(
                        run(bench, scenario, HELD_SECONDS, concurrency, prefetch)[-3:]
                    )
                    sweep.append(
                        {"concurrency": concurrency, "prefetch": prefetch, "msgs_per_s": rate}
                    )
                    log(
                        f"autosize {scenario}: held at {concurrency}/{prefetch}: {rate:,.0f} msgs/s"
                    )
                top = sorted(sweep, key=lambda r: r["msgs_per_s"], reverse=True)[:2]
                best = top[0]
                rounds: list[dict[str, Any]] = []
                for i in range(ROUNDS):
                    rates = run(bench, scenario, seconds)
                    # the same backlog as the autosized run's: both over the same broker state
                    # (8 million queued noop messages, against the sweep's 2.4 million)
                    again = {
                        (t["concurrency"], t["prefetch"]): statistics.median(
                            run(
                                bench,
                                scenario,
                                HELD_SECONDS,
                                t["concurrency"],
                                t["prefetch"],
                                fill_for=seconds,
                            )[-3:]
                        )
                        for t in top
                    }
                    (c, p), held = max(again.items(), key=lambda kv: kv[1])
                    settled = statistics.median(rates[-3:])
                    reached = next((k + 1 for k, r in enumerate(rates) if r >= 0.95 * held), None)
                    rounds.append(
                        {
                            "autosized_per_second": rates,
                            "autosized_msgs_per_s": settled,
                            "best_held": {"concurrency": c, "prefetch": p},
                            "best_held_msgs_per_s": held,
                            "held_again": [
                                {"concurrency": k[0], "prefetch": k[1], "msgs_per_s": v}
                                for k, v in again.items()
                            ],
                            "share_of_best": settled / held,
                            "seconds_to_95_percent": reached,
                        }
                    )
                    log(
                        f"autosize {scenario}: round {i + 1}: autosized, settled at {settled:,.0f} "
                        "msgs/s; "
                        + ", ".join(f"{k[0]}/{k[1]} again {v:,.0f}" for k, v in again.items())
                        + f": {settled / held:.1%} of the better, at 95% "
                        + (f"after {reached} s" if reached else "never")
                    )
                reached_all = [r["seconds_to_95_percent"] for r in rounds]
                results.append(
                    {
                        "scenario": scenario,
                        "sweep": sweep,
                        "best": best,
                        "rounds": rounds,
                        "autosized_msgs_per_s": statistics.median(
                            r["autosized_msgs_per_s"] for r in rounds
                        ),
                        "share_of_best": statistics.median(r["share_of_best"] for r in rounds),
                        # a round that never got there counts as longer than any that did
                        "seconds_to_95_percent": statistics.median(
                            x if x is not None else seconds + 1 for x in reached_all
                        ),
                        "seconds_to_95_percent_per_round": reached_all,
                    }
                )
        finally:
            bench.close()
    return results


def render(results: list[dict[str, Any]]) -> str:
    lines = [
        (
            f"  {'scenario':<9} {'held by hand (concurrency/prefetch: msgs/s)':<70} "
            f"{'autosized':>10} {'of best':>8} {'to 95%':>7}  rounds (of best, to 95%)"
        )
    ]
    for r in results:
        sweep = ", ".join(
            f"{s['concurrency']}/{s['prefetch']}: {s['msgs_per_s']:,.0f}" for s in r["sweep"]
        )
        per_round = ", ".join(
            f"{x['share_of_best']:.1%} {x['seconds_to_95_percent'] or 'never'}" for x in r["rounds"]
        )
        lines.append(
            f"  {r['scenario']:<9} {sweep:<70} {r['autosized_msgs_per_s']:>10,.0f} "
            f"{r['share_of_best']:>8.1%} {r['seconds_to_95_percent']:>5g} s  {per_round}"
        )
    return "\n".join(lines)


def main(*, seconds: float, json_path: str | None) -> int:
    from fastq._bench import log, write_json
    from fastq._bench.ring import machine

    info = machine()
    log(
        f"fastq bench autosize: {info['cpu']}, {info['usable_cores']} usable cores, ring "
        f"{info['implementation']}"
    )
    results = measure(seconds, log)
    print(
        f"fastq bench autosize on {info['cpu']} ({info['usable_cores']} cores), memory://, "
        f"{ROUNDS} autosized runs "
        f"of {seconds:g} s from the formula, each beside a new run of the best held pair; settled "
        "= median of "
        f"the last 3 s; medians over the rounds"
    )
    print(render(results))
    write_json(json_path, "autosize", info, results)
    return 0
