"""The fastq command: send from a shell, and one-line errors for bad arguments."""

from __future__ import annotations

import asyncio
import re
import textwrap

import msgspec
import pytest

from fastq import message
from fastq.cli import RET_USAGE, main

MODULE = """
import msgspec, fastq

class Order(msgspec.Struct):
    id: int
    total: float

app = fastq.App("cli", broker="memory://cli-test")

@app.task(queue="orders")
def charge(order: Order, note: str = "") -> None: ...

not_a_task = 42
"""


@pytest.fixture
def shop(tmp_path, monkeypatch):
    (tmp_path / "clishop.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import clishop

    return clishop


def test_send_enqueues_a_call_from_json_and_prints_its_id(shop, capsys):
    assert main(["send", "clishop:charge", '[{"id": 7, "total": 1.5}, "gift"]']) == 0
    mid = capsys.readouterr().out.strip()

    async def take():
        return await shop.app.broker.fetch("orders", 10, timeout=0.1)

    (d,) = asyncio.run(take())
    env = message.decode(d.body)
    assert d.message_id == mid
    assert shop.charge.decode_args(env.args) == (shop.Order(7, 1.5), "gift")
    assert main(["send", "clishop:charge", '{"order": {"id": 8, "total": 2}}']) == 0


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["send", "clishop", "[]"],
            r"^fastq send: 'clishop' is not module:attribute, e\.g\. myproject\.tasks:app$",
        ),
        (
            ["send", "nosuchmodule:x", "[]"],
            r"^fastq send: cannot import 'nosuchmodule': No module named 'nosuchmodule'; run from",
        ),
        (["send", "clishop:nothing", "[]"], r"^fastq send: module 'clishop' has no 'nothing'$"),
        (
            ["send", "clishop:not_a_task", "[]"],
            r"^fastq send: clishop:not_a_task is a int, not a task made with @app\.task$",
        ),
        (["send", "clishop:charge", "[1,"], r"^fastq send: arguments '\[1,' are not JSON"),
        (
            ["send", "clishop:charge", '[{"id": "x", "total": 1}]'],
            r"^fastq send: arguments do not fit .*Expected `int`, got `str`",
        ),
        (["bench", "--runs", "0"], r"^fastq bench: --runs must be >= 1, got 0$"),
        (
            ["bench", "autosize", "--seconds", "2"],
            r"^fastq bench: --seconds must be >= 5 for the autosize suite, got 2$",
        ),
        (
            ["plan", "clishop:app", "--queue", "nope"],
            (
                r"^fastq plan: queues \['nope'\] have no task or consumer in app 'cli'; "
                r"known: \['orders'\]$"
            ),
        ),
        (["plan", "clishop:charge"], r"^fastq plan: clishop:charge is a Task, not a fastq\.App$"),
        (["plan", "clishop:app", "--prefetch", "0"], r"^fastq plan: prefetch must be >= 1"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(shop, capsys, argv, error):
    assert main(argv) == RET_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    import re

    assert re.search(error, err.strip()), err


def test_plan_prints_each_number_with_its_rule_and_starts_nothing(shop, capsys):
    import json
    import os

    assert main(["plan", "clishop:app", "--concurrency", "3"]) == 0
    out = capsys.readouterr().out
    cores = len(os.sched_getaffinity(0))
    assert f"processes: {cores} (one per usable core: {cores} cpus in the affinity mask)" in out
    assert "queue 'orders' (io): concurrency 3 (set by you)" in out
    assert "queue 'orders': prefetch 15 (io: concurrency x 5)" in out
    assert main(["plan", "clishop:app", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    (q,) = plan["queues"]
    assert (q["name"], q["kind"], q["prefetch"]) == ("orders", "io", q["concurrency"] * 5)
    assert plan["processes"] == cores and q["workers"] == list(range(cores))


def test_stats_counts_ready_and_dead_messages_per_queue(shop, capsys, tmp_path):
    db = tmp_path / "stats.db"
    shop.app.config = msgspec.structs.replace(shop.app.config, broker_url=f"sqlite:///{db}")
    shop.charge.send_many((shop.Order(i, 1.0),) for i in range(7))
    assert main(["stats", "clishop:app", "--broker", f"sqlite:///{db}", "--json"]) == 0
    counts = msgspec.json.decode(capsys.readouterr().out)
    assert (
        counts["orders"]["ready"] == 7
        and counts["orders"]["unacked"] == 0
        and counts["orders"]["dead"] == 0
    )
    assert main(["stats", "clishop:app", "--broker", f"sqlite:///{db}"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["queue", "ready", "unacked", "delayed", "dead", "consumers"]
    assert table[1].split() == ["orders", "7", "0", "0", "0", "-"]


def test_plan_shows_the_next_three_fire_times_of_each_schedule(shop, capsys):
    app = shop.app

    @app.periodic(cron="0 9 * * 1", timezone="Europe/Paris")  # Mondays 9:00 in Paris
    @app.task(name="weekly")
    def weekly() -> None: ...

    try:
        assert main(["plan", "clishop:app"]) == 0
        out = capsys.readouterr().out
    finally:
        del app.schedules["weekly"], app.tasks["weekly"]
    line = next(x for x in out.splitlines() if x.strip().startswith("weekly:"))
    assert line.startswith("  weekly: cron '0 9 * * 1' (Europe/Paris), catch_up=latest; next ")
    fires = line.split("; next ")[1].split(", ")
    assert len(fires) == 3
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT09:00:00\+0[12]:00", f) for f in fires)
