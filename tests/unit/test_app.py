"""The user's API: App, @app.task with typed arguments, send, consumers, middleware."""

from __future__ import annotations

import asyncio
import logging

import msgspec
import pytest

import fastq
from fastq import message
from fastq.errors import ConfigError
from fastq.testing import Drained, drain, memory_app


class Order(msgspec.Struct):
    id: int
    total: float


@pytest.fixture
def app():
    return memory_app("shop")


def published(app, queue):
    async def take():
        return await app.broker.fetch(queue, 1000, timeout=0.1)

    return asyncio.run(take())


def test_a_task_is_registered_under_its_qualified_name_on_the_default_queue(app):
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    test = "test_a_task_is_registered_under_its_qualified_name_on_the_default_queue"
    assert app.tasks == {f"{__name__}.{test}.<locals>.add": add}
    assert (add.queue, add.options.kind, add.options.max_retries, add.is_async) == (
        "default",
        "auto",
        3,
        False,
    )
    assert add(2, 3) == 5  # still callable in place


def test_send_validates_encodes_and_returns_the_message_id(app):
    @app.task(queue="orders", kind="io", max_retries=5)
    async def charge(order: Order, note: str = "") -> None: ...

    mid = charge.send(Order(1, 9.5), note="first")
    (delivery,) = published(app, "orders")
    env = message.decode(delivery.body)
    assert (delivery.message_id, env.id, env.task) == (mid, mid, charge.name)
    assert charge.decode_args(env.args) == (Order(1, 9.5), "first")
    # Wrong types stop at the producer, with the path of the bad value
    with pytest.raises(
        msgspec.ValidationError, match=r"Expected `float`, got `str` - at `\$\[0\]\.total`"
    ):
        charge.send(Order(1, "lots"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"missing a required argument: 'order'"):
        charge.send()
    assert published(app, "orders") == []
    assert drain(app) == Drained()


def test_send_many_publishes_one_batch_in_order_and_send_async_works_in_a_loop(app):
    @app.task
    def square(x: int) -> int:
        return x * x

    ids = square.send_many((i,) for i in range(100))
    got = published(app, "default")
    assert [d.message_id for d in got] == ids
    assert [square.decode_args(message.decode(d.body).args) for d in got] == [
        (i,) for i in range(100)
    ]

    async def main():
        return await square.send_async(7)

    mid = asyncio.run(main())
    (d,) = published(app, "default")
    assert d.message_id == mid


def test_a_consumer_owns_its_queue(app):
    @app.consumer("task_queue", kind="io")
    def handle(body: bytes) -> None: ...

    assert app.consumers["task_queue"] is handle and handle.queue == "task_queue"
    with pytest.raises(ConfigError, match=r"^queue 'task_queue' already has a handler"):
        app.consumer("task_queue")(lambda body: None)
    with pytest.raises(ConfigError, match=r"belongs to consumer"):
        app.task(queue="task_queue")(lambda: None)
    assert set(app.queues()) == {"task_queue"}


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"kind": "gpu"}, r"^kind must be one of \('io', 'cpu', 'auto'\), got 'gpu'$"),
        ({"max_retries": -1}, r"^max_retries must be >= 0, got -1$"),
        ({"timeout": 0}, r"^timeout must be > 0 seconds or None, got 0$"),
        ({"concurrency": 0}, r"^concurrency must be >= 1 or None, got 0$"),
    ],
)
def test_bad_task_options_are_refused_with_the_range(app, options, error):
    with pytest.raises(ConfigError, match=error):
        app.task(**options)


def test_untyped_star_arguments_and_duplicate_names_are_refused(app):
    with pytest.raises(ConfigError, match=r"\*args and \*\*kwargs cannot be typed for the wire"):
        app.task(lambda *a: None)

    @app.task(name="same")
    def one() -> None: ...

    with pytest.raises(
        ConfigError, match=r"^a task named 'same' is registered already; pass name=$"
    ):
        app.task(name="same")(lambda: None)


def test_the_broker_url_comes_from_the_argument_else_the_environment(monkeypatch):
    monkeypatch.setenv("FASTQ_BROKER_URL", "memory://from-env")
    assert fastq.App("a").config.broker_url == "memory://from-env"
    assert fastq.App("a", broker="memory://given").config.broker_url == "memory://given"
    assert (
        fastq.App("a", broker="memory://x", config=fastq.Config(processes=2)).config.processes == 2
    )
    monkeypatch.delenv("FASTQ_BROKER_URL")
    assert fastq.App("a").config.broker_url == "sqlite:///fastq.db"


def test_timing_middleware_logs_failures_with_the_handler(caplog):
    # Given: an app with TimingMiddleware and a task that fails once, then works (test kit)
    app = memory_app("shop")
    app.middleware.append(fastq.TimingMiddleware())
    failures = []

    @app.task(queue="orders", max_retries=1)
    def charge(n: int) -> None:
        if not failures:
            failures.append(n)
            raise ValueError("card declined")

    mid = charge.send(1)
    # When: it runs through the workers' handler path, in this process
    with caplog.at_level(logging.WARNING, logger="fastq.middleware"):
        assert drain(app) == Drained(ok=1, retried=1)
    # Then: the failure is logged once, with the handler and message id
    (record,) = caplog.records
    assert record.getMessage().startswith(f"{charge.name} {mid} failed after ")
    assert record.getMessage().endswith(" s: ValueError: card declined")


def test_tasks_of_a_script_run_as_main_get_the_name_workers_import(tmp_path):
    import subprocess
    import sys

    (tmp_path / "script_shop.py").write_text(
        "import fastq\napp = fastq.App('s', broker='memory://s')\n"
        "@app.task\ndef ship(n: int) -> None: ...\nprint(ship.name)\n"
    )
    out = subprocess.run(
        [sys.executable, "script_shop.py"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "script_shop.ship"  # not __main__.ship


def test_the_broker_follows_the_config_url():
    import msgspec

    app = fastq.App("a", broker="memory://first")
    first = app.broker
    assert app.broker is first  # made once
    app.config = msgspec.structs.replace(app.config, broker_url="memory://second")
    assert app.broker is not first and app.broker.url == "memory://second"


def test_run_needs_an_app_that_workers_can_import():
    def make():
        return fastq.App("local", broker="memory://local-app")

    app = make()
    with pytest.raises(
        ConfigError,
        match=r"^App 'local' is not a global of module 'test_app'; workers import it by "
        r"module:attribute",
    ):
        app.import_spec()


MODULE_APP = fastq.App("module-level", broker="memory://module-app")


def test_import_spec_names_the_module_and_the_global():
    assert MODULE_APP.import_spec() == "test_app:MODULE_APP"


def test_positional_arguments_never_fill_keyword_only_parameters():
    app = fastq.App("kw", broker="memory://kw-only")

    @app.task
    def tag(name: str, *, color: str) -> None: ...

    with pytest.raises(TypeError):
        tag.message("a", "red")
    assert tag.message("a", color="red").message_id


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (
            {"min_concurrency": 9, "max_concurrency": 3},
            "min_concurrency=9 is above max_concurrency=3",
        ),
        ({"concurrency": 4, "max_concurrency": 8}, "concurrency=4 is fixed"),
        ({"max_prefetch": 0}, "max_prefetch must be >= 1"),
        ({"weight": 0}, "weight must be a number > 0"),
        (
            {"min_concurrency": 8, "max_prefetch": 4},
            "max_prefetch=4 is below the handlers it must feed",
        ),
    ],
)
def test_autosize_bounds_that_cannot_hold_are_refused(options, error):
    import fastq

    app = fastq.App("bounds", broker="memory://bounds")
    with pytest.raises(fastq.ConfigError, match=error):

        @app.task(**options)
        def f(x: int) -> None: ...
