"""The floor under ``call`` on RabbitMQ, measured in the same run as fastq's ``call`` and
Celery's ``.delay().get()`` (``python -m fastq bench pipeline --broker amqp://...``): an RPC
over direct reply-to written by hand with aiormq, the way RabbitMQ's RPC tutorial writes it.

The server, a process of its own, consumes the queue (prefetch 10), publishes each reply to the
request's ``reply_to`` on a confirm channel, waits for the confirm, then acks the request, as
fastq's supervisor does. The client, another process, publishes each request persistent,
mandatory and confirmed (as fastq's ``call`` does) on the channel that consumes
``amq.rabbitmq.reply-to``, and waits for the reply. No task queue, no worker process, no
thread hop: what one round trip with fastq's guarantees (a persistent, confirmed request, a
confirmed reply) costs on this RabbitMQ and this machine with nothing behind the queue.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from typing import Any

from fastq.url import scrub

SERVER = """
import asyncio
import os
import signal

import aiormq
from pamqp.commands import Basic


async def main():
    connection = await aiormq.connect(os.environ["FASTQ_RPC_URL"])
    channel = await connection.channel(publisher_confirms=True)
    # gone 10 minutes after its last use, should the bench be killed before it deletes it
    await channel.queue_declare({queue!r}, durable=True, arguments={{"x-expires": 600000}})
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
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    print("ready", flush=True)
    await stop
    await connection.close()


asyncio.run(main())
"""

CLIENT = """
import asyncio
import json
import os
import time

import aiormq
from pamqp.commands import Basic


async def main():
    connection = await aiormq.connect(os.environ["FASTQ_RPC_URL"])
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
#: the longest a server may take to say it is ready, a client to make its calls
START_TIMEOUT, CLIENT_TIMEOUT = 60.0, 600.0


def _last_lines(url: str, f: Any, n: int = 3) -> str:
    f.seek(0)
    lines = f.read().decode(errors="replace").strip().splitlines()
    return scrub(url, " | ".join(lines[-n:])) if lines else "it said nothing"


def _round(url: str, queue: str, calls: int, warmup: int) -> list[float]:
    """One server, one client, ``calls`` timed round trips; the URL reaches them by their
    environment (never on a command line, which ``ps`` shows), and what they say on failure is
    scrubbed of its password.

    Raises:
        RuntimeError: the server did not start, or the client failed or took too long.
    """
    from fastq.testing import terminate

    env = {**os.environ, "FASTQ_RPC_URL": url}
    with tempfile.TemporaryFile() as server_err:
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER.format(queue=queue)],
            stdout=subprocess.PIPE,
            stderr=server_err,
            env=env,
        )
        try:
            assert server.stdout is not None
            ready = selectors.DefaultSelector()
            ready.register(server.stdout, selectors.EVENT_READ)
            said = server.stdout.readline() if ready.select(START_TIMEOUT) else b""
            ready.close()
            if said.strip() != b"ready":  # nothing: it died, or hangs
                terminate(server)
                raise RuntimeError(
                    f"the RPC server did not start (exit code {server.returncode}): "
                    + _last_lines(url, server_err)
                )
            try:
                done = subprocess.run(
                    [sys.executable, "-c", CLIENT.format(queue=queue, n=calls, warmup=warmup)],
                    capture_output=True,
                    timeout=CLIENT_TIMEOUT,
                    check=False,
                    env=env,
                )
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"the RPC client made {calls + warmup} calls for over {CLIENT_TIMEOUT:g} s; "
                    f"the server said: {_last_lines(url, server_err)}"
                ) from None
            if done.returncode != 0:
                client = scrub(url, done.stderr.decode(errors="replace").strip())
                raise RuntimeError(
                    f"the RPC client failed: {client[-1500:]}; the server said: "
                    + _last_lines(url, server_err)
                )
            times: list[float] = json.loads(done.stdout.decode().strip().splitlines()[-1])
            return times
        finally:
            terminate(server)
            if server.stdout is not None:
                server.stdout.close()


def measure(url: str, runs: int, calls: int, log: Any, warmup: int = 20) -> dict[str, Any]:
    """``runs`` rounds of ``calls`` sequential round trips (after ``warmup`` not counted), a
    server and a queue of each round's own (deleted after it): the call figures of the row."""
    from fastq._bench import call_figures
    from fastq._bench.wfpeers import delete_queues

    rounds = []
    for r in range(runs):
        queue = f"fq-rpc-{os.getpid()}-{int(time.time())}-{r}"
        try:
            rounds.append(_round(url, queue, calls, warmup))
        finally:
            delete_queues(url, [queue])  # never raises: the round's own error is the one to see
        log(f"{NAME} {r + 1}/{runs}: {call_figures(rounds[-1:])}")
    return {"system": NAME, **call_figures(rounds)}
