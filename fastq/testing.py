"""For tests, users' and ours: waiting for a condition without sleeping blind, an App on an
in-process broker, running what it was sent in this process (``drain``), and the RabbitMQ check
that skips locally and fails in CI.

    from fastq.testing import drain, wait_until

    with app.testing():              # memory:// for the block; app.testing(eager=True): at once
        charge.send(7)
        assert drain(app).ok == 1    # through the workers' handler path, retries and all

    wait_until(lambda: len(done) == 100, timeout=30, message=lambda: f"{len(done)} of 100 done")

The pytest plugin (``fastq.pytest_plugin``, loaded by entry point) wraps these in fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator

from fastq.app import App
from fastq.errors import ConfigError
from fastq.inline import Drained, drain, drain_async

__all__ = [
    "AMQP_URL",
    "POSTGRES_URL",
    "Drained",
    "drain",
    "drain_async",
    "memory_app",
    "postgres_restarted",
    "require_amqp",
    "require_postgres",
    "terminate",
    "wait_until",
    "wait_until_async",
]

#: where the RabbitMQ tests find their broker
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
#: where the PostgreSQL tests find their database (each test makes a schema of its own in it)
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
#: seconds between two looks at the condition, by default
INTERVAL = 0.02

_apps = itertools.count()


def _say(message: str | Callable[[], str]) -> str:
    return message() if callable(message) else message


def _check(timeout: float, interval: float) -> None:
    if not timeout >= 0 or not interval > 0:
        raise ConfigError(
            f"timeout must be >= 0 and interval > 0 seconds, got {timeout!r} and {interval!r}"
        )


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 30.0,
    message: str | Callable[[], str] = "",
    *,
    interval: float = INTERVAL,
) -> None:
    """Return as soon as ``predicate()`` is true; look again every ``interval`` seconds.

    ``predicate`` may raise to give up at once (an assertion that a process still runs, say).
    ``message`` (or what it returns, when it is called: at the timeout only) says what was
    awaited and what was seen.

    Raises:
        TimeoutError: ``timeout`` seconds passed and it was still false; the message says so.
    """
    _check(timeout, interval)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not true after {timeout:g} s: {_say(message) or predicate!r}")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], object | Awaitable[object]],
    timeout: float = 30.0,
    message: str | Callable[[], str] = "",
    *,
    interval: float = INTERVAL,
) -> None:
    """``wait_until`` for a coroutine: the loop runs between looks; ``predicate`` may be async."""
    _check(timeout, interval)
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not true after {timeout:g} s: {_say(message) or predicate!r}")
        await asyncio.sleep(interval)


def memory_app(name: str = "test") -> App:
    """An App on a ``memory://`` broker of its own (in this process only): nothing touches a
    file or a server, and no two such apps share a queue."""
    return App(name, broker=f"memory://{name}-{os.getpid()}-{next(_apps)}")


def _require(what: str, url: str, default_port: int, how: str) -> None:
    """Skip (or, with ``CI`` set, fail) unless something answers on ``url``'s port."""
    import pytest

    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError as e:
        if os.environ.get("CI"):
            raise ConnectionError(
                f"{what} unreachable at {host}:{port} ({e}) and CI is set: start it ({how})"
            ) from e
        pytest.skip(f"{what} unreachable at {host}:{port} ({e})")


def require_postgres(url: str | None = None) -> str:
    """PostgreSQL's URL (``url``, else ``FASTQ_POSTGRES_URL``, else ``POSTGRES_URL``) once
    something answers on its port; skipped when nothing does, a failure when ``CI`` is set."""
    url = url or os.environ.get("FASTQ_POSTGRES_URL") or POSTGRES_URL
    _require("PostgreSQL", url, 5432, "pg_ctlcluster 15 main start")
    return url


@contextlib.contextmanager
def postgres_restarted(version: str = "15", timeout: float = 120) -> Iterator[None]:
    """PostgreSQL on this host stopped (``pg_ctlcluster VERSION main stop``) for the ``with``
    block, and started again however the block ends: other tests and CI share it."""
    subprocess.run(
        ["pg_ctlcluster", version, "main", "stop", "-m", "fast"],
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    try:
        yield
    finally:
        subprocess.run(
            ["pg_ctlcluster", version, "main", "start"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )


def require_amqp(url: str | None = None) -> str:
    """RabbitMQ's URL (``url``, else ``FASTQ_AMQP_URL``, else ``AMQP_URL``) once something answers
    on its port; when nothing does, the test is skipped, unless ``CI`` is set: there that is a
    failure (dramatiq's rule: a suite that skips its broker tests in CI proves nothing)."""
    url = url or os.environ.get("FASTQ_AMQP_URL") or AMQP_URL
    port = 5671 if urllib.parse.urlsplit(url).scheme == "amqps" else 5672
    _require("RabbitMQ", url, port, "rabbitmq-server -detached")
    return url


@contextlib.contextmanager
def rabbitmq_stopped(timeout: float = 180) -> Iterator[None]:
    """RabbitMQ on this host stopped (``rabbitmqctl stop_app``) for the ``with`` block, and
    started again however the block ends, waiting until it is up (``await_startup``): other
    tests and CI share this RabbitMQ."""
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=timeout)
    try:
        yield
    finally:
        subprocess.run(
            ["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=timeout
        )
        subprocess.run(
            ["rabbitmqctl", "await_startup"], check=False, capture_output=True, timeout=timeout
        )


def terminate(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """End a process started for a test (a worker, a peer's worker): SIGTERM, then SIGKILL if it
    is still there after ``timeout`` seconds; returns once it is gone."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
