"""The test kit for users (fastq.testing, App.testing, the pytest plugin): drain runs what was
sent through the workers' handler path in this process (validation, middleware, retries, dead
letters, results, publish_to) with exact counts; eager sends run at once and fail loudly; the
pytest plugin is loaded by its entry point and its fixtures work."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import msgspec
import pytest

import fastq
from fastq.errors import ConfigError, TaskFailed
from fastq.testing import Drained, drain, drain_async, memory_app


class Order(msgspec.Struct):
    id: int
    total: float


class Seen(fastq.Middleware):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []

    def after_process(self, message, exc):
        self.calls.append((message.queue, message.retries, type(exc).__name__ if exc else ""))


def test_drain_runs_retries_to_a_dead_letter_with_exact_counts():
    # Given: a task that always fails, with 2 retries, and one that works
    seen = Seen()
    app = memory_app("kit")
    app.middleware.append(seen)
    calls = []

    @app.task(queue="orders", max_retries=2, retry_backoff=60.0)  # backoff not waited for
    def charge(order: Order) -> None:
        calls.append(order.id)
        raise ValueError(f"card declined for {order.id}")

    @app.task(queue="mail")
    def notify(to: str) -> None:
        calls.append(to)

    charge.send(Order(1, 9.5))
    notify.send("ann")
    # When
    drained = drain(app)
    # Then: 3 runs of charge (2 retries), one of notify; one dead letter with its reason
    assert drained == Drained(ok=1, retried=2, dead=1)
    assert drained.runs == 4
    assert sorted(calls, key=str) == [1, 1, 1, "ann"]
    (dead,) = app.broker.dead_letters("orders")
    assert dead.reason == "ValueError: card declined for 1 (after 3 attempts)"
    assert sorted(seen.calls) == [
        ("mail", 0, ""),
        ("orders", 0, "ValueError"),
        ("orders", 1, "ValueError"),
        ("orders", 2, "ValueError"),
    ]
    assert drain(app) == Drained()  # nothing left


def test_drain_keeps_results_and_runs_what_handlers_publish():
    app = memory_app("kit")
    totals = []

    @app.task(queue="totals")
    def record(total: float) -> None:
        totals.append(total)

    @app.task(queue="orders", result_ttl=60, publish_to=record)
    def price(order: Order) -> float:
        return order.total * 2

    mid = price.send(Order(1, 4.25))
    assert drain(app) == Drained(ok=2)
    assert price.result(mid, timeout=1) == 8.5
    assert totals == [8.5]


def test_a_payload_that_does_not_validate_is_a_dead_letter_with_the_reason():
    app = memory_app("kit")

    @app.task(queue="orders")
    def charge(order: Order) -> None: ...

    app.broker.publish_sync(
        "orders",
        [fastq.broker.base.Message(fastq.message.encode(charge.name, ({"id": "x"},))[1], "m1")],
    )
    assert drain(app) == Drained(dead=1)
    (dead,) = app.broker.dead_letters("orders")
    assert dead.reason == (
        f"invalid arguments for {charge.name}: Expected `int`, got `str` - at `$[0].id`"
    )


def test_drain_async_runs_on_the_callers_loop_and_refuses_an_unknown_queue():
    app = memory_app("kit")
    done = []

    @app.task(queue="orders")
    async def charge(n: int) -> None:
        done.append(n)

    async def main():
        await charge.send_async(1)
        await charge.send_async(2)
        return await drain_async(app)

    assert asyncio.run(main()) == Drained(ok=2)
    assert done == [1, 2]
    with pytest.raises(
        ConfigError, match=r"^drain: the app consumes no queue 'nope'; it consumes \['orders'\]$"
    ):
        drain(app, queues=["nope"])


def test_drain_waits_for_a_delayed_message_only_until_its_timeout():
    app = memory_app("kit")

    @app.task(queue="orders")
    def charge(n: int) -> None: ...

    charge.send(1, delay=60)
    with pytest.raises(
        TimeoutError,
        match=r"^drain: messages of \['orders'\] still wait \(a delay, or the broker\) after "
        r"0\.05 s; raise timeout, or send without delay in tests$",
    ):
        drain(app, timeout=0.05)


def test_eager_send_runs_the_handler_at_once_and_validates_its_arguments():
    app = fastq.App("eager", broker="sqlite:///never-made.db")
    done = []

    @app.task(queue="orders", max_retries=1)
    def charge(order: Order) -> None:
        if order.total < 0:
            raise ValueError("negative total")
        done.append(order.id)

    with app.testing(eager=True):
        charge.send(Order(1, 9.5))
        assert done == [1]  # ran before send returned
        # the producer's validation, as without eager mode
        with pytest.raises(msgspec.ValidationError, match=r"Expected `float`, got `str`"):
            charge.send(Order(2, "lots"))  # type: ignore[arg-type]
        # a failure for good (after its retry) is the sender's to see
        with pytest.raises(
            TaskFailed,
            match=rf"^task {charge.name} \(message \w+\) failed for good: ValueError: negative "
            r"total \(after 2 attempts\)$",
        ):
            charge.send(Order(3, -1.0))
        assert done == [1]
        # what a handler sends runs too, before the outer send returns
        chained = []

        @app.task(queue="totals")
        def record(total: float) -> None:
            chained.append(total)

        @app.task(queue="orders")
        def price(order: Order) -> None:
            record.send(order.total)

        price.send(Order(4, 2.5))
        assert chained == [2.5]
    # the app's own broker is back; nothing reached it
    assert app.config.broker_url == "sqlite:///never-made.db"


def test_testing_puts_the_app_on_a_memory_broker_of_its_own_for_the_block():
    app = fastq.App("kit", broker="sqlite:///never-made.db")

    @app.task(queue="orders")
    def charge(n: int) -> None: ...

    with app.testing() as same:
        assert same is app
        assert app.broker.url.startswith("memory://testing-")
        charge.send(1)
        assert drain(app) == Drained(ok=1)
    assert app.config.broker_url == "sqlite:///never-made.db"


PLUGIN_TEST = """
from kitapp import charge, done

def test_the_plugin_fixtures(fastq_app, fastq_drain, fastq_wait_until):
    assert fastq_app.broker.url.startswith("memory://")
    charge.send(3)
    charge.send(4)
    assert fastq_drain(fastq_app).ok == 2
    fastq_wait_until(lambda: done == [3, 4], timeout=1)

def test_the_eager_fixture(fastq_eager_app):
    done.clear()
    charge.send(5)
    assert done == [5]
"""

KIT_APP = """
import fastq

app = fastq.App("kitapp", broker="sqlite:///never-made.db")
done = []

@app.task(queue="orders")
def charge(n: int) -> None:
    done.append(n)
"""


def _pytest(directory, *args):
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_the_pytest_plugin_is_loaded_by_its_entry_point_and_its_fixtures_work(tmp_path):
    (tmp_path / "kitapp.py").write_text(textwrap.dedent(KIT_APP))
    (tmp_path / "test_kit.py").write_text(textwrap.dedent(PLUGIN_TEST))
    (tmp_path / "pytest.ini").write_text("[pytest]\nfastq_app = kitapp:app\npythonpath = .\n")
    done = _pytest(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
    assert not (tmp_path / "never-made.db").exists()


def test_the_fastq_app_fixture_says_how_to_name_the_app(tmp_path):
    (tmp_path / "test_kit.py").write_text("def test_it(fastq_app):\n    pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    done = _pytest(tmp_path)
    assert done.returncode == 1
    assert (
        'the fastq_app fixture needs your app: set fastq_app = "module:app" in '
        "[tool.pytest.ini_options], or override the fastq_app fixture in conftest.py"
    ) in done.stdout
