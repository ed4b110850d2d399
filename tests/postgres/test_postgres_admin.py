"""fastq dlq / purge on PostgreSQL (a schema of the test's own), through the command's own entry:
exact counts, the reason in the listing, requeued dead letters run again, purges leave zero,
bad input is one line with exit 2."""

from __future__ import annotations

import asyncio
import json
import textwrap
import uuid

import pytest

from fastq.broker import open_broker
from fastq.cli import RET_USAGE, main
from fastq.testing import drain

MODULE = """
import fastq

app = fastq.App("pgadmin", broker={url!r})
ran = []

@app.task(queue="orders", max_retries=1, retry_backoff=0.001)
def charge(order_id: int) -> None:
    ran.append(order_id)
    if order_id < 0:
        raise ValueError(f"no order {{order_id}}")
"""


@pytest.fixture
def shop(pg_url, tmp_path, monkeypatch):
    name = f"pgadmin_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE.format(url=pg_url)))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    module.spec = f"{name}:app"
    return module


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def depth(shop):
    async def measure():
        broker = open_broker(shop.app.config.broker_url)
        await broker.open()
        try:
            return await broker.queue_depth("orders")
        finally:
            await broker.close()

    return asyncio.run(measure())


def test_dead_letters_on_postgres_are_listed_requeued_run_and_purged(shop, capsys):
    # Given: 3 calls that fail twice (one retry each) and 2 that succeed
    for i in (-1, -2, -3, 4, 5):
        shop.charge.send(i)
    drained = drain(shop.app, timeout=30)
    assert (drained.ok, drained.retried, drained.dead) == (2, 3, 3)
    code, out, _ = run(capsys, "dlq", shop.spec, "list", "orders", "--json")
    rows = json.loads(out)
    assert code == 0
    assert [r["reason"] for r in rows] == [
        f"ValueError: no order -{i} (after 2 attempts)" for i in (1, 2, 3)
    ]
    assert [r["retries"] for r in rows] == [1, 1, 1]
    code, out, _ = run(capsys, "dlq", shop.spec, "show", rows[2]["id"])
    assert json.loads(out)["envelope"]["args"] == [-3]
    code, out, _ = run(capsys, "dlq", shop.spec, "requeue", "orders", rows[0]["id"], rows[1]["id"])
    assert (code, out) == (0, "requeued 2 dead letter(s) to 'orders'\n")
    shop.ran.clear()
    assert drain(shop.app, timeout=30).dead == 2
    assert sorted(shop.ran) == [-2, -2, -1, -1]  # with fresh counts: one retry each again
    code, out, _ = run(capsys, "dlq", shop.spec, "requeue", "orders", "--all")
    assert (code, out) == (0, "requeued 3 dead letter(s) to 'orders'\n")
    assert (depth(shop).ready, depth(shop).dead) == (3, 0)
    code, out, _ = run(capsys, "purge", shop.spec, "orders", "--yes")
    assert (code, out) == (0, "purged 3 ready message(s) of 'orders'\n")
    shop.charge.send(-9)
    assert drain(shop.app, timeout=30).dead == 1
    code, out, _ = run(capsys, "dlq", shop.spec, "purge", "orders")
    assert (code, out) == (0, "purged 1 dead letter(s) of 'orders'\n")
    assert (depth(shop).ready, depth(shop).dead) == (0, 0)


def test_bad_input_on_postgres_is_one_line_and_exit_2(shop, capsys):
    for argv, expected in [
        (
            ["dlq", shop.spec, "list", "nope"],
            "fastq dlq: unknown queue 'nope': the app consumes 'orders'; name one of them\n",
        ),
        (
            ["dlq", shop.spec, "show", "-3"],
            (
                "fastq dlq: bad dead letter id '-3': expected a positive integer, as the id column "
                "of fastq dlq list shows\n"
            ),
        ),
        (
            ["purge", shop.spec, "orders"],
            (
                "fastq purge: purge deletes every ready message of 'orders' for good; add --yes to "
                "say you mean it\n"
            ),
        ),
    ]:
        code, _, err = run(capsys, *argv)
        assert (code, err) == (RET_USAGE, expected)
    code, _, err = run(capsys, "dlq", shop.spec, "show", "12345")
    assert code == RET_USAGE
    assert err.startswith("fastq dlq: no dead letter '12345' on postgresql://")
