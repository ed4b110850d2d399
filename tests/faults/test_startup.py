"""What an operator meets first: a broker that cannot be opened, and secrets in what is printed.

Each command turns a broker it cannot open into one line that says what was tried (the password
masked) and what to check, and exits 2; nothing the product prints shows a password."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from faulttree import Tree

from fastq.testing import require_amqp


def _fastq(tree: Tree, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastq", *args],
        cwd=tree.dir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _one_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        (
            "amqp://guest:hunter2@127.0.0.1:1/",
            (
                r"^fastq worker: cannot connect to RabbitMQ at amqp://guest:\*\*\*@127\.0\.0\.1:1/ "
                r"\(AMQPConnectionError: .*Connection refused\): nothing listens there; is "
                r"RabbitMQ running on that host and port\?$"
            ),
        ),
        (
            "sqlite:////no/such/dir/q.db?password=hunter2",
            (
                r"^fastq worker: cannot open the SQLite broker at sqlite:////no/such/dir/q\.db\?"
                r"password=\*\*\* \(unable to open database file\): the directory /no/such/dir "
                r"does not exist; create it or change the path$"
            ),
        ),
        (
            "sqlite://user:hunter2@/path",
            (
                r"^fastq worker: 'sqlite://user:\*\*\*@/path' is not a SQLite broker URL; use "
                r"sqlite:///relative/path\.db or sqlite:////absolute/path\.db$"
            ),
        ),
    ],
    ids=["connection-refused", "no-such-directory", "malformed"],
)
def test_a_worker_whose_broker_cannot_be_opened_says_so_in_one_line_and_exits_2(
    sqlite_tree, broker, expected
):
    out = _fastq(
        sqlite_tree,
        "worker",
        f"{sqlite_tree.module}:app",
        "--broker",
        broker,
        "--log-level",
        "warning",
    )
    assert out.returncode == 2
    line = _one_line(out)
    assert "hunter2" not in line
    assert re.match(expected, line), line


def test_a_wrong_rabbitmq_password_is_one_line_that_says_so(sqlite_tree):
    url = urllib.parse.urlsplit(require_amqp())
    wrong = url._replace(netloc=f"{url.username}:hunter2@{url.hostname}:{url.port or 5672}")
    out = _fastq(
        sqlite_tree,
        "worker",
        f"{sqlite_tree.module}:app",
        "--broker",
        wrong.geturl(),
        "--log-level",
        "warning",
    )
    assert out.returncode == 2
    line = _one_line(out)
    assert "hunter2" not in line and ":***@" in line
    assert line.endswith("RabbitMQ refused the user name or password; check them in the URL")


def test_send_and_stats_with_a_broker_that_cannot_be_opened_say_so_in_one_line(tmp_path: Path):
    tree = Tree(tmp_path, "sqlite:////no/such/dir/q.db")
    try:
        for args in (("send", f"{tree.module}:record", "[1]"), ("stats", f"{tree.module}:app")):
            out = _fastq(tree, *args)
            assert out.returncode == 2, out
            assert _one_line(out) == (
                f"fastq {args[0]}: cannot open the SQLite broker at sqlite:////no/such/dir/q.db "
                "(unable to open database file): the directory /no/such/dir does not exist; "
                "create it or change the path"
            )
    finally:
        tree.close()


def test_the_worker_log_masks_secrets_in_the_broker_url(sqlite_tree):
    # Given a broker URL with a secret in its query
    broker = f"sqlite:///{sqlite_tree.dir / 'q.db'}?lease=30&password=hunter2"
    proc = sqlite_tree.start("--broker", broker, "--processes", "1", "--log-level", "info")
    sqlite_tree.wait_for_workers(proc, 1)
    assert sqlite_tree.stop(proc) == 0
    # Then the log names the broker, with the secret masked, and never shows it
    log = sqlite_tree.logs[proc.pid].read_text()
    assert f"on sqlite:///{sqlite_tree.dir / 'q.db'}?lease=30&password=***" in log
    assert "hunter2" not in log
