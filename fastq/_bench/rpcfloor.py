"""The floor under ``call`` on RabbitMQ, measured in the same run as fastq's ``call`` and
Celery's ``.delay().get()`` (``python -m fastq bench pipeline --broker amqp://...``): an RPC
over direct reply-to written by hand with aiormq, the way RabbitMQ's RPC tutorial writes it.

The server, a process of its own, consumes the queue (prefetch 10), publishes each reply to the
request's ``reply_to`` on a confirm channel, waits for the confirm, then acks the request, as
fastq's supervisor does. The client, another process, publishes each request persistent,
mandatory and confirmed (as fastq's ``call`` does) on the channel that consumes
``amq.rabbitmq.reply-to``, and waits for the reply. No task queue, no worker process, no
thread hop: what any client of this RabbitMQ on this machine pays for one round trip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from typing import Any

SERVER = """
import asyncio

import aiormq
from pamqp.commands import Basic


async def main():
    connection = await aiormq.connect({url!r})
    channel = await connection.channel(publisher_confirms=True)
    await channel.queue_declare({queue!r}, durable=True)
    await channel.basic_qos(prefetch_count=10)

    async def on_request(m):
        props = m.header.properties
        await channel.basic_publish(
            m.body,
            routing_key=props.reply_to,
            properties=Basic.Properties(correlation_id=props.correlation_id),
        )
        await channel.basic_ack(m.delivery.delivery_tag)

    await channel.basic_consume({queue!r}, on_request)
    print("ready", flush=True)
    await asyncio.Future()


asyncio.run(main())
"""

CLIENT = """
import asyncio
import json
import time

import aiormq
from pamqp.commands import Basic


async def main():
    connection = await aiormq.connect({url!r})
    channel = await connection.channel(publisher_confirms=True)
    waiting = {{}}

    async def on_reply(m):
        future = waiting.pop(m.header.properties.correlation_id, None)
        if future is not None:
            future.set_result(m.body)

    await channel.basic_consume("amq.rabbitmq.reply-to", on_reply, no_ack=True)
    times = []
    for i in range({warmup} + {n}):
        t = time.perf_counter()
        future = asyncio.get_running_loop().create_future()
        waiting[str(i)] = future
        await channel.basic_publish(
            str(i).encode(),
            routing_key={queue!r},
            mandatory=True,
            properties=Basic.Properties(
                delivery_mode=2, reply_to="amq.rabbitmq.reply-to", correlation_id=str(i)
            ),
        )
        got = await asyncio.wait_for(future, 60)
        took = time.perf_counter() - t
        assert got == str(i).encode(), got
        if i >= {warmup}:
            times.append(took)
    await connection.close()
    print(json.dumps(times))


asyncio.run(main())
"""

NAME = "hand-written aiormq RPC, direct reply-to"


def _round(url: str, queue: str, calls: int, warmup: int) -> list[float]:
    from fastq.testing import terminate

    with tempfile.TemporaryFile() as errors:
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER.format(url=url, queue=queue)],
            stdout=subprocess.PIPE,
            stderr=errors,
        )
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != b"ready":  # nothing: it died
                server.wait(30)
                errors.seek(0)
                said = errors.read().decode(errors="replace").strip().splitlines()
                last = said[-1] if said else "it said nothing"
                password = urllib.parse.urlsplit(url).password
                raise RuntimeError(
                    f"the RPC server did not start (exit code {server.returncode}): "
                    + (last.replace(password, "***") if password else last)
                )
            done = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CLIENT.format(url=url, queue=queue, n=calls, warmup=warmup),
                ],
                capture_output=True,
                text=True,
                timeout=calls * 60 + 60,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"the RPC client failed: {done.stderr[-2000:]}")
            times: list[float] = json.loads(done.stdout.strip().splitlines()[-1])
            return times
        finally:
            terminate(server)
            if server.stdout is not None:
                server.stdout.close()


def measure(url: str, runs: int, calls: int, log: Any, warmup: int = 20) -> dict[str, Any]:
    """``runs`` rounds of ``calls`` sequential round trips (after ``warmup`` not counted), a
    server and a queue of each round's own (deleted after it): the call figures of the row."""
    from fastq._bench import call_figures
    from fastq._bench.amqp import _purge

    rounds = []
    for r in range(runs):
        queue = f"fq-rpc-{os.getpid()}-{int(time.time())}-{r}"
        try:
            rounds.append(_round(url, queue, calls, warmup))
        finally:
            _purge(url, [queue], delete=True)
        log(f"{NAME} {r + 1}/{runs}: {call_figures(rounds[-1:])}")
    return {"system": NAME, **call_figures(rounds)}
