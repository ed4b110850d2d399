"""``python -m fastq bench soak``: mixed load for a long time, a worker SIGKILLed every minute.

A `fastq worker` tree on the embedded SQLite broker runs three queues (noop, 5 ms I/O, about
1 ms of CPU) while this process sends a steady mix to them; once a minute a random worker is
SIGKILLed. Every 10 s the supervisor's resident set and open file descriptors are read. At the
end, every message sent must have been processed (at least once: those in flight at a kill
run twice), and the supervisor's RSS and descriptors must be flat: after the first two minutes
(warm-up: caches, the ring buffers' pages, the thread pools) RSS grows by at most 20% and the
descriptors move by at most 8.

Caveats: the machine's two cores are shared by the producer, the supervisor and its workers;
the rate is a target the producer paces, not a measure of speed (the engine suite is that).
"""

from __future__ import annotations

import importlib
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil

from fastq._bench import log, write_json
from fastq._bench.ring import machine

APP = """
import asyncio, os
import fastq

app = fastq.App("soak", broker={url!r})
OUT = {out!r}

def _record(n: int) -> None:
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"%d\\n" % n)
    os.close(fd)

@app.task(queue="soak-noop", kind="io")
async def noop(n: int) -> None:
    _record(n)

@app.task(queue="soak-io", kind="io")
async def io(n: int) -> None:
    await asyncio.sleep(0.005)
    _record(n)

@app.task(queue="soak-cpu", kind="cpu")
def cpu(n: int) -> None:
    x = 0
    for i in range(30_000):
        x += i * i
    _record(n)
"""

#: messages a second the producer aims at, split over the three queues (cpu: a tenth)
RATE = 400
#: RSS may grow by this share after the warm-up, and the descriptors move by this many
RSS_GROWTH, FD_SPREAD = 0.20, 8
WARMUP_SECONDS = 120.0


def _workers(supervisor: psutil.Process) -> list[psutil.Process]:
    found = []
    for p in supervisor.children():
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def soak(minutes: float, log_line: Any = log) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fastq-soak-") as tmp:
        directory = Path(tmp)
        out = directory / "out.txt"
        (directory / "soakapp.py").write_text(
            textwrap.dedent(APP.format(url=f"sqlite:///{directory / 'q.db'}", out=str(out)))
        )
        sys.path.insert(0, tmp)
        soakapp = importlib.import_module("soakapp")

        with open(directory / "worker.log", "ab") as worker_log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fastq", "worker", "soakapp:app", "--log-level", "info"],
                cwd=tmp,
                stdout=worker_log,
                stderr=subprocess.STDOUT,
            )
        try:
            return _run(proc, soakapp, out, minutes, log_line)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
            sys.path.remove(tmp)
            sys.modules.pop("soakapp", None)


def _run(
    proc: subprocess.Popen[bytes], app: Any, out: Path, minutes: float, log_line: Any
) -> dict[str, Any]:
    supervisor = psutil.Process(proc.pid)
    rng = random.Random(1)
    tasks = [app.noop] * 6 + [app.io] * 3 + [app.cpu]
    start = time.monotonic()
    end = start + minutes * 60
    sent, kills, samples = 0, 0, []
    next_kill, next_sample = start + 60, start
    while time.monotonic() < end:
        tick = time.monotonic()
        batch = max(1, RATE // 10)
        for _ in range(batch):
            rng.choice(tasks).send(sent)
            sent += 1
        now = time.monotonic()
        if now >= next_sample:
            samples.append((now - start, supervisor.memory_info().rss, supervisor.num_fds()))
            log_line(
                f"soak: {now - start:5.0f} s, {sent:,} sent, supervisor rss "
                f"{samples[-1][1] / 2**20:.1f} MiB, {samples[-1][2]} fds, {kills} kills"
            )
            next_sample += 10
        if now >= next_kill:
            victims = _workers(supervisor)
            if victims:
                rng.choice(victims).send_signal(signal.SIGKILL)
                kills += 1
            next_kill += 60
        time.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
    # every message sent must come through
    deadline = time.monotonic() + 300
    expected = set(range(sent))
    seen: set[int] = set()
    while time.monotonic() < deadline:
        seen = {int(x) for x in out.read_text().split()} if out.exists() else set()
        if expected <= seen:
            break
        time.sleep(1)
    lines = out.read_text().split() if out.exists() else []
    if not expected <= seen:
        keep = Path(tempfile.mkdtemp(prefix="fastq-soak-lost-"))
        for f in out.parent.iterdir():
            if f.is_file():
                (keep / f.name).write_bytes(f.read_bytes())
        log_line(f"soak: {len(expected - seen)} messages missing; the files are kept in {keep}")
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(120)
    warmup = min(WARMUP_SECONDS, minutes * 30)  # half of a short run
    after = [s for s in samples if s[0] >= warmup] or samples
    rss0, rss_max = after[0][1], max(s[1] for s in after)
    fds = [s[2] for s in after]
    return {
        "minutes": minutes,
        "sent": sent,
        "processed_distinct": len(seen & expected),
        "lost": len(expected - seen),
        "processed_twice": len(lines) - len(set(lines)),
        "worker_kills": kills,
        "exit_code": code,
        "rss_after_warmup_bytes": rss0,
        "rss_max_bytes": rss_max,
        "rss_growth": rss_max / rss0 - 1,
        "fds_min": min(fds),
        "fds_max": max(fds),
        "rss_median_bytes": statistics.median(s[1] for s in after),
        "samples": samples,
        "flat": rss_max / rss0 - 1 <= RSS_GROWTH and max(fds) - min(fds) <= FD_SPREAD,
    }


def main(*, minutes: float, json_path: str | None) -> int:
    info = machine()
    log(
        f"fastq bench soak: {info['cpu']}, {info['usable_cores']} usable cores, "
        f"{minutes:g} min, a worker SIGKILLed every minute"
    )
    r = soak(minutes)
    ok = r["lost"] == 0 and r["flat"] and r["exit_code"] == 0
    print(
        f"fastq bench soak on {info['cpu']} ({info['usable_cores']} cores), {minutes:g} min, "
        f"{RATE} msgs/s mixed (noop, 5 ms I/O, 1 ms CPU) on sqlite://, a worker SIGKILLed every "
        f"minute\n"
        f"  sent {r['sent']:,}, processed {r['processed_distinct']:,}, lost {r['lost']}, "
        f"run twice {r['processed_twice']} (in flight at a kill), worker kills "
        f"{r['worker_kills']}, exit code {r['exit_code']}\n"
        f"  supervisor after {WARMUP_SECONDS:g} s of warm-up: rss "
        f"{r['rss_after_warmup_bytes'] / 2**20:.1f} MiB, at most "
        f"{r['rss_max_bytes'] / 2**20:.1f} MiB ({r['rss_growth']:+.1%}; bound +{RSS_GROWTH:.0%}), "
        f"open fds {r['fds_min']}..{r['fds_max']} (bound: a spread of {FD_SPREAD})\n"
        f"  {'PASS' if ok else 'FAIL'}"
    )
    write_json(json_path, "soak", info, [r])
    return 0 if ok else 1
