"""fastq dlq / purge on RabbitMQ (``<queue>.dlq``), through the command's own entry: dead letters
made by the real settle path (``fastq.testing.drain`` on an amqp:// app), listed with their
reason, shown whole, requeued and run again, purged to zero; bad input is one line, exit 2."""

from __future__ import annotations

import asyncio
import json
import textwrap
import uuid

import pika
import pytest

from fastq.broker import open_broker
from fastq.cli import RET_USAGE, main
from fastq.testing import drain

MODULE = """
import fastq

app = fastq.App("amqpadmin", broker={url!r})
ran = []

@app.task(queue={queue!r}, max_retries=0)
def charge(order_id: int) -> None:
    ran.append(order_id)
    if order_id < 0:
        raise ValueError(f"no order {{order_id}}")

@app.task(queue={queue!r} + "-never")  # never declared on RabbitMQ
def unused(n: int) -> None: ...
"""


@pytest.fixture
def shop(amqp_url, tmp_path, monkeypatch):
    queue = f"fq-admin-{uuid.uuid4().hex[:8]}"
    name = f"amqpadmin_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE.format(url=amqp_url, queue=queue)))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    module.spec, module.queue = f"{name}:app", queue
    yield module
    asyncio.run(module.app.broker.close())
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    for q in (queue, f"{queue}.dlq"):
        channel.queue_delete(q)
    connection.close()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def depth(shop):
    async def measure():  # a broker of its own: each asyncio.run is a loop of its own
        broker = open_broker(shop.app.config.broker_url)
        await broker.open()
        try:
            return await broker.queue_depth(shop.queue)
        finally:
            await broker.close()

    return asyncio.run(measure())


def test_dead_letters_on_rabbitmq_are_listed_requeued_run_and_purged(shop, capsys):
    # Given: 3 calls that fail for good, 2 that succeed, run through the real settle path
    for i in (-1, -2, -3, 4, 5):
        shop.charge.send(i)
    drained = drain(shop.app, timeout=30)
    assert (drained.ok, drained.dead) == (2, 3)
    # When: listed; Then: each with its reason, message id as the id
    code, out, _ = run(capsys, "dlq", shop.spec, "list", shop.queue, "--json")
    rows = json.loads(out)
    assert code == 0
    assert sorted(r["reason"] for r in rows) == [
        f"ValueError: no order -{i} (after 1 attempts)" for i in (1, 2, 3)
    ]
    assert all(r["id"] == r["message_id"] and r["failed_at"] > 0 for r in rows)
    assert all(r["attempts"] == 1 for r in rows)
    # listing takes nothing away
    code, out, _ = run(capsys, "dlq", shop.spec, "list", shop.queue)
    assert out.endswith(f"3 dead letter(s) of '{shop.queue}'\n")
    code, out, _ = run(capsys, "dlq", shop.spec, "show", rows[0]["id"])
    shown = json.loads(out)
    assert shown["message_id"] == rows[0]["message_id"]
    assert shown["envelope"]["args"] in ([-1], [-2], [-3])
    # requeue one by id: it runs again
    code, out, _ = run(capsys, "dlq", shop.spec, "requeue", shop.queue, rows[0]["id"])
    assert (code, out) == (0, f"requeued 1 dead letter(s) to '{shop.queue}'\n")
    shop.ran.clear()
    assert drain(shop.app, timeout=30).dead == 1
    assert shop.ran == shown["envelope"]["args"]
    # requeue all: 3 run again
    code, out, _ = run(capsys, "dlq", shop.spec, "requeue", shop.queue, "--all")
    assert (code, out) == (0, f"requeued 3 dead letter(s) to '{shop.queue}'\n")
    shop.ran.clear()
    assert drain(shop.app, timeout=30).dead == 3
    assert sorted(shop.ran) == [-3, -2, -1]
    # purge the dead letters: zero left
    code, out, _ = run(capsys, "dlq", shop.spec, "purge", shop.queue)
    assert (code, out) == (0, f"purged 3 dead letter(s) of '{shop.queue}'\n")
    assert depth(shop).dead == 0


def test_purge_on_rabbitmq_deletes_ready_messages_only_with_yes(shop, capsys):
    for i in range(6):
        shop.charge.send(i)
    code, _, err = run(capsys, "purge", shop.spec, shop.queue)
    assert code == RET_USAGE
    assert err.endswith("add --yes to say you mean it\n") and err.count("\n") == 1
    code, out, _ = run(capsys, "purge", shop.spec, shop.queue, "--yes")
    assert (code, out) == (0, f"purged 6 ready message(s) of '{shop.queue}'\n")
    assert depth(shop).ready == 0


def test_bad_input_on_rabbitmq_is_one_line_and_exit_2(shop, capsys):
    shop.charge.send(1)  # declares the queue and its dlq
    for argv, starts in [
        (["dlq", shop.spec, "list", "nope"], "fastq dlq: unknown queue 'nope'"),
        (["dlq", shop.spec, "show", "no-such-id"], "fastq dlq: no dead letter 'no-such-id'"),
        (
            ["dlq", shop.spec, "requeue", shop.queue, "no-such-id"],
            "fastq dlq: 1 of the ids given name no dead letter",
        ),
        (["purge", shop.spec, "nope", "--yes"], "fastq purge: unknown queue 'nope'"),
        (
            ["dlq", shop.spec, "list", f"{shop.queue}-never"],
            (
                f"fastq dlq: RabbitMQ at {shop.app.broker.url} has no queue "
                f"'{shop.queue}-never' (NOT_FOUND - no queue '{shop.queue}-never.dlq' in vhost"
            ),
        ),
        (
            ["purge", shop.spec, f"{shop.queue}-never", "--yes"],
            (
                f"fastq purge: RabbitMQ at {shop.app.broker.url} has no queue "
                f"'{shop.queue}-never' (NOT_FOUND"
            ),
        ),
    ]:
        code, _, err = run(capsys, *argv)
        assert code == RET_USAGE, argv
        assert err.startswith(starts) and err.count("\n") == 1, err
