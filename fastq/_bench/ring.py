"""``python -m fastq bench ring``: the shared-memory ring against what you would use instead.

One producer process sends ``count`` frames of ``size`` bytes to one consumer process, which turns
each back into its own ``bytes`` object. Every method runs in its own pair of freshly spawned
processes, pinned to different cores when there are two, timed from the producer's first put to
the consumer's last frame (CLOCK_MONOTONIC is one clock for the whole machine). Methods take turns
within each round, so machine noise spreads over all of them, and the median of the rounds is
reported. Caveats: the producer sends the same ``batch`` distinct payloads over and over, so
producer-side allocation is not measured for anyone; numbers from a shared machine move by 10-20%
from run to run, which is why only ratios from the same run are compared.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import platform
import statistics
import struct
import time
from collections.abc import Callable
from typing import Any

from fastq._bench import log, write_json
from fastq.ring import IMPLEMENTATION, Ring

#: Frames per put_many / per list put; the same for every batched method.
BATCH = 256
#: fastq's ring and faster-fifo's queue get the same room; 2 MiB stays in cache here, where 8 MiB
#: made both bimodal (a full ring is read cold).
RING_BYTES = 2 << 20
PIPE_WRITE_BYTES = 64 << 10
PIPE_BYTES = 1 << 20

_LEN = struct.Struct("<I")


def _pin(cpu: int) -> bool:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return False
    os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})
    return True


# -- producers: send `count` frames cycling over `payloads` ------------------------------------


def _batches(payloads: list[bytes], count: int):  # type: ignore[no-untyped-def]
    full, rest = divmod(count, len(payloads))
    for _ in range(full):
        yield payloads
    if rest:
        yield payloads[:rest]


def _put_fastq(name: str, payloads: list[bytes], count: int) -> None:
    ring = Ring.attach(name)
    for batch in _batches(payloads, count):
        ring.put_many(batch)


def _put_mpq_batched(q: Any, payloads: list[bytes], count: int) -> None:
    for batch in _batches(payloads, count):
        q.put(batch)


def _put_mpq_single(q: Any, payloads: list[bytes], count: int) -> None:
    for batch in _batches(payloads, count):
        for frame in batch:
            q.put(frame)


def _put_pipe(conn: Any, payloads: list[bytes], count: int) -> None:
    fd = conn.fileno()
    parts: list[bytes] = []
    size = 0
    for batch in _batches(payloads, count):
        for frame in batch:
            parts.append(_LEN.pack(len(frame)))
            parts.append(frame)
            size += 4 + len(frame)
            if size >= PIPE_WRITE_BYTES:
                _write_all(fd, b"".join(parts))
                parts, size = [], 0
    if parts:
        _write_all(fd, b"".join(parts))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _put_ffifo(q: Any, payloads: list[bytes], count: int) -> None:
    # faster-fifo's put_many waits until the whole list fits at once: keep lists to 1/4 of it.
    step = max(1, min(BATCH, RING_BYTES // 4 // max(1, len(payloads[0]))))
    for batch in _batches(payloads, count):
        for i in range(0, len(batch), step):
            q.put_many(batch[i : i + step], block=True, timeout=60.0)


# -- consumers: receive until `count` frames; return the payload bytes, counted from one frame per
# batch so that the harness adds no per-frame work (the tests check content, frame by frame) ----


def _get_fastq(name: str, count: int, ready: Callable[[], None]) -> int:
    ring = Ring.attach(name)
    ring.fileno()  # take the consumer end before the clock starts
    ready()
    n = nbytes = 0
    while n < count:
        frames = ring.get_many(1024)
        n += len(frames)
        nbytes += len(frames) * len(frames[-1])
    return nbytes


def _get_mpq_batched(q: Any, count: int, ready: Callable[[], None]) -> int:
    ready()
    n = nbytes = 0
    while n < count:
        frames = q.get()
        n += len(frames)
        nbytes += len(frames) * len(frames[-1])
    return nbytes


def _get_mpq_single(q: Any, count: int, ready: Callable[[], None]) -> int:
    ready()
    nbytes = 0
    for _ in range(count):
        nbytes += len(q.get())
    return nbytes


def _get_pipe(conn: Any, count: int, ready: Callable[[], None]) -> int:
    fd = conn.fileno()
    ready()
    buf = bytearray()
    n = nbytes = 0
    while n < count:
        chunk = os.read(fd, PIPE_BYTES)
        if not chunk:
            break
        buf += chunk
        off, end = 0, len(buf)
        with memoryview(buf) as view:
            while end - off >= 4:
                (size,) = _LEN.unpack_from(view, off)
                if off + 4 + size > end:
                    break
                frame = bytes(view[off + 4 : off + 4 + size])
                n += 1
                off += 4 + size
        del buf[:off]
        nbytes = n * len(frame)
    return nbytes


def _get_ffifo(q: Any, count: int, ready: Callable[[], None]) -> int:
    ready()
    n = nbytes = 0
    while n < count:
        frames = q.get_many(block=True, timeout=60.0, max_messages_to_get=1024)
        n += len(frames)
        nbytes += len(frames) * len(frames[-1])
    return nbytes


def _faster_fifo() -> Any:
    try:
        import faster_fifo
    except ImportError:
        return None
    return faster_fifo


METHODS: dict[str, tuple[Callable[..., None], Callable[..., int]]] = {
    "fastq ring": (_put_fastq, _get_fastq),
    "mp.Queue, lists of 256": (_put_mpq_batched, _get_mpq_batched),
    "mp.Queue, 1 per put": (_put_mpq_single, _get_mpq_single),
    "os.pipe, 64 KiB writes": (_put_pipe, _get_pipe),
    "faster-fifo put_many": (_put_ffifo, _get_ffifo),
}


def _producer_main(
    method: str, transport: Any, size: int, count: int, barrier: Any, out: Any
) -> None:
    pinned = _pin(0)
    payloads = [os.urandom(size) for _ in range(BATCH)]  # distinct objects: no pickle memo help
    barrier.wait()
    t0 = time.perf_counter()
    METHODS[method][0](transport, payloads, count)
    out.put(("t0", t0, pinned))


def _consumer_main(method: str, transport: Any, count: int, barrier: Any, out: Any) -> None:
    _pin(1)
    nbytes = METHODS[method][1](transport, count, barrier.wait)
    out.put(("t1", time.perf_counter(), nbytes))


def run_once(method: str, size: int, count: int) -> tuple[float, bool]:
    """Seconds to move ``count`` frames of ``size`` bytes with ``method``, and whether pinned."""
    ctx = multiprocessing.get_context("spawn")
    ring = None
    if method == "fastq ring":
        ring = Ring.create(RING_BYTES)
        transport: Any = ring.name
    elif method.startswith("mp.Queue"):
        transport = ctx.Queue()
    elif method.startswith("os.pipe"):
        reader, writer = ctx.Pipe(duplex=False)
        fcntl.fcntl(writer.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        transport = None
    else:
        transport = _faster_fifo().Queue(RING_BYTES, loads=bytes, dumps=bytes)
    barrier, out = ctx.Barrier(2), ctx.SimpleQueue()
    if method.startswith("os.pipe"):
        consumer = ctx.Process(target=_consumer_main, args=(method, reader, count, barrier, out))
        producer = ctx.Process(
            target=_producer_main, args=(method, writer, size, count, barrier, out)
        )
    else:
        consumer = ctx.Process(target=_consumer_main, args=(method, transport, count, barrier, out))
        producer = ctx.Process(
            target=_producer_main, args=(method, transport, size, count, barrier, out)
        )
    try:
        consumer.start()
        producer.start()
        if method.startswith("os.pipe"):
            reader.close()
            writer.close()
        got = {m[0]: m[1:] for m in (out.get(), out.get())}
        producer.join(60)
        consumer.join(60)
    finally:
        for p in (producer, consumer):
            if p.is_alive():
                p.kill()
                p.join()
        if ring is not None:
            ring.close()
            ring.unlink()
    (t0, pinned), (t1, nbytes) = got["t0"], got["t1"]
    if nbytes != size * count:
        raise RuntimeError(
            f"{method}: consumer saw {nbytes} payload bytes, expected {size * count}"
        )
    return t1 - t0, pinned


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "usable_cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "implementation": IMPLEMENTATION,
        "platform": platform.platform(),
    }


def measure(
    sizes: list[int], runs: int, seconds: float, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    methods = [m for m in METHODS if m != "faster-fifo put_many" or _faster_fifo() is not None]
    if len(methods) < len(METHODS):
        log("faster-fifo is not installed (pip install faster-fifo): that baseline is skipped")
    results = []
    for size in sizes:
        counts = {}
        for method in methods:  # a short first run sets how many frames fill `seconds`
            probe = max(200, min(20_000, (32 << 20) // size))
            elapsed, _ = run_once(method, size, probe)
            counts[method] = max(probe, int(probe / elapsed * seconds) // BATCH * BATCH)
        times: dict[str, list[float]] = {m: [] for m in methods}
        pinned = False
        for r in range(runs):
            for method in methods:
                elapsed, pinned = run_once(method, size, counts[method])
                times[method].append(elapsed)
                log(
                    f"size {size} B, round {r + 1}/{runs}: {method:<24} "
                    f"{counts[method] / elapsed:>14,.0f} msgs/s"
                )
        for method in methods:
            rates = [counts[method] / t for t in times[method]]
            rate = statistics.median(rates)
            results.append(
                {
                    "method": method,
                    "size_bytes": size,
                    "frames": counts[method],
                    "msgs_per_s": rate,
                    "mb_per_s": rate * size / 1e6,
                    "runs_msgs_per_s": rates,
                    "pinned": pinned,
                }
            )
    return results


def render(results: list[dict[str, Any]]) -> str:
    lines = []
    for size in dict.fromkeys(r["size_bytes"] for r in results):
        rows = [r for r in results if r["size_bytes"] == size]
        ours = next(r for r in rows if r["method"] == "fastq ring")["msgs_per_s"]
        lines.append(
            f"\nframes of {size:,} bytes (median of {len(rows[0]['runs_msgs_per_s'])} runs)"
        )
        lines.append(f"  {'method':<24} {'msgs/s':>14} {'MB/s':>10}   fastq is")
        for r in rows:
            ratio = "-" if r["method"] == "fastq ring" else f"{ours / r['msgs_per_s']:.2f}x"
            lines.append(
                f"  {r['method']:<24} {r['msgs_per_s']:>14,.0f} {r['mb_per_s']:>10,.0f}   {ratio}"
            )
    return "\n".join(lines)


def main(*, sizes: list[int], runs: int, seconds: float, json_path: str | None) -> int:
    info = machine()
    log(
        f"fastq bench ring: {info['cpu']}, {info['usable_cores']} usable cores, Python "
        f"{info['python']}, "
        f"ring implementation {info['implementation']}"
    )
    results = measure(sizes, runs, seconds, log)
    pinned = any(r["pinned"] for r in results)
    print(
        f"fastq bench ring on {info['cpu']} ({info['usable_cores']} cores, "
        f"{'producer and consumer pinned to different cores' if pinned else 'not pinned'}), "
        f"Python {info['python']}, implementation {info['implementation']}"
    )
    print(render(results))
    write_json(json_path, "ring", info, results)
    return 0
