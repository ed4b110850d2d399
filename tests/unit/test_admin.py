"""fastq dlq / purge on the SQLite broker (a file of the test's own) and memory://, through the
command's own entry (``fastq.cli.main``): exact counts, the reason in the listing, requeued
dead letters run again (``fastq.testing.drain``), purges leave zero, and bad input is one line
on stderr with exit 2."""

from __future__ import annotations

import asyncio
import json
import re
import textwrap

import pytest

from fastq.cli import RET_USAGE, main
from fastq.testing import drain

MODULE = """
import fastq

app = fastq.App("admin", broker={url!r})
ran = []

@app.task(queue="orders", max_retries=0)
def charge(order_id: int) -> None:
    ran.append(order_id)
    if order_id < 0:
        raise ValueError(f"no order {{order_id}}")
"""


@pytest.fixture(params=["sqlite", "memory"])
def shop(request, tmp_path, monkeypatch):
    url = (
        f"sqlite:///{tmp_path}/q.db"
        if request.param == "sqlite"
        else f"memory://admin-{tmp_path.name}"
    )
    name = f"adminshop_{request.param}_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE.format(url=url)))
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
        return await shop.app.queue_depth("orders")

    return asyncio.run(measure())


def test_dead_letters_are_listed_requeued_run_and_purged(shop, capsys):
    # Given: 3 calls that fail for good and 2 that succeed, run through the handler path
    for i in (-1, -2, -3, 4, 5):
        shop.charge.send(i)
    assert drain(shop.app).dead == 3
    # When: listed
    code, out, _ = run(capsys, "dlq", shop.spec, "list", "orders")
    # Then: each with its reason, and the count
    assert code == 0
    assert out.count("ValueError: no order -") == 3
    assert out.endswith("3 dead letter(s) of 'orders'\n")
    code, out, _ = run(capsys, "dlq", shop.spec, "list", "orders", "--json", "--limit", "2")
    rows = json.loads(out)
    assert [r["reason"] for r in rows] == [
        "ValueError: no order -1 (after 1 attempts)",
        "ValueError: no order -2 (after 1 attempts)",
    ]
    assert {r["task"] for r in rows} == {f"{shop.__name__}.charge"}
    # show: the whole dead letter, its envelope decoded
    code, out, _ = run(capsys, "dlq", shop.spec, "show", rows[1]["id"])
    shown = json.loads(out)
    assert code == 0
    assert shown["envelope"]["args"] == [-2]
    assert shown["reason"] == rows[1]["reason"]
    # requeue one by id: it runs again (and dies again); then the rest with --all
    code, out, _ = run(capsys, "dlq", shop.spec, "requeue", "orders", rows[0]["id"])
    assert (code, out) == (0, "requeued 1 dead letter(s) to 'orders'\n")
    assert depth(shop).ready == 1
    shop.ran.clear()
    assert drain(shop.app).dead == 1
    assert shop.ran == [-1]
    code, out, _ = run(capsys, "dlq", shop.spec, "requeue", "orders", "--all")
    assert (code, out) == (0, "requeued 3 dead letter(s) to 'orders'\n")
    assert (depth(shop).ready, depth(shop).dead) == (3, 0)
    shop.ran.clear()
    assert drain(shop.app).dead == 3
    assert sorted(shop.ran) == [-3, -2, -1]
    # purge the dead letters: none left
    code, out, _ = run(capsys, "dlq", shop.spec, "purge", "orders")
    assert (code, out) == (0, "purged 3 dead letter(s) of 'orders'\n")
    assert depth(shop).dead == 0


def test_purge_deletes_ready_messages_only_with_yes(shop, capsys):
    for i in range(7):
        shop.charge.send(i)
    code, out, err = run(capsys, "purge", shop.spec, "orders")
    assert (code, out) == (RET_USAGE, "")
    assert err == (
        "fastq purge: purge deletes every ready message of 'orders' for good; "
        "add --yes to say you mean it\n"
    )
    assert depth(shop).ready == 7
    code, out, _ = run(capsys, "purge", shop.spec, "orders", "--yes")
    assert (code, out) == (0, "purged 7 ready message(s) of 'orders'\n")
    assert depth(shop).ready == 0
    assert drain(shop.app).runs == 0


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["dlq", "{spec}", "list", "nope"],
            r"^fastq dlq: unknown queue 'nope': the app consumes 'orders'; name one of them$",
        ),
        (
            ["dlq", "{spec}", "list", "orders", "--limit", "0"],
            r"^fastq dlq: --limit must be >= 1, got 0$",
        ),
        (
            ["dlq", "{spec}", "show", "x"],
            (
                r"^fastq dlq: bad dead letter id 'x': expected a positive integer, as the id "
                r"column of fastq dlq list shows$"
            ),
        ),
        (
            ["dlq", "{spec}", "show", "99"],
            r"^fastq dlq: no dead letter '99' on \S+; fastq dlq \.\.\. list QUEUE shows their ids$",
        ),
        (
            ["dlq", "{spec}", "requeue", "orders"],
            (
                r"^fastq dlq: requeue takes --all or dead letter ids \(as fastq dlq list shows\), "
                r"not neither$"
            ),
        ),
        (
            ["dlq", "{spec}", "requeue", "orders", "98"],
            (
                r"^fastq dlq: 1 of the ids given name no dead letter of 'orders'; fastq dlq \.\.\. "
                r"list QUEUE shows them$"
            ),
        ),
        (
            ["dlq", "{spec}", "purge", "nope"],
            r"^fastq dlq: unknown queue 'nope': the app consumes 'orders'; name one of them$",
        ),
        (
            ["purge", "{spec}", "nope", "--yes"],
            r"^fastq purge: unknown queue 'nope': the app consumes 'orders'; name one of them$",
        ),
        (
            ["dlq", "nosuchmodule:app", "list", "orders"],
            (
                r"^fastq dlq: cannot import 'nosuchmodule': No module named 'nosuchmodule'; "
                r"run from the directory that holds it$"
            ),
        ),
        (
            ["purge", "{module}:charge", "orders"],
            r"^fastq purge: \S+:charge is a Task, not a fastq\.App$",
        ),
        (
            ["inspect", "nosuchmodule:app"],
            (
                r"^fastq inspect: cannot import 'nosuchmodule': No module named "
                r"'nosuchmodule'; run from the directory that holds it$"
            ),
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(shop, capsys, argv, error):
    argv = [a.format(spec=shop.spec, module=shop.__name__) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == RET_USAGE
    assert out in ("", "requeued 0 of 1 dead letter(s) to 'orders'\n")
    assert err.count("\n") == 1
    assert err.rstrip("\n") == err.strip()
    assert re.match(error, err.rstrip("\n")), err


def test_inspect_with_no_supervisor_running_is_one_line_and_exit_2(
    shop, capsys, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    code, out, err = run(capsys, "inspect", shop.spec)
    assert (code, out) == (RET_USAGE, "")
    assert err == (
        f"fastq inspect: no running supervisor of {shop.spec} on this host (none answers in "
        f"{tmp_path}/fastq-inspect); start one with fastq worker {shop.spec}\n"
    )
    code, _, err = run(capsys, "inspect", shop.spec, "--timeout", "0")
    assert (code, err) == (RET_USAGE, "fastq inspect: --timeout must be > 0 seconds, got 0\n")
