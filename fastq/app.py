"""App: the task registry, its settings and its broker; where users start.

    app = fastq.App("shop")

    @app.task(queue="email", kind="io", max_retries=5)
    async def send_receipt(order: Order) -> None: ...

    send_receipt.send(Order(id=1, total=9.5))      # from anywhere: returns the message id

Run its workers with ``fastq worker module:app``, or ``app.run()`` from the module itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

import msgspec

from fastq.broker import Broker, QueueDepth, mask_url, open_broker
from fastq.config import Config, HandlerOptions, Route
from fastq.errors import ConfigError
from fastq.middleware import Hooks, Middleware
from fastq.schedule import Schedule, build
from fastq.task import Consumer, Task, importable_name, module_name

if TYPE_CHECKING:
    from fastq.workflow.graph import Workflow

F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger(__name__)
#: numbers the memory:// brokers of ``App.testing``
_testing = itertools.count()
#: seconds a workflow keeps an ended run, unless ``app.workflow(name, keep=...)`` says otherwise
KEEP_RUNS = 7 * 86400.0

#: The queue of a task that names none.
DEFAULT_QUEUE = "default"


class App:
    """A set of tasks and consumers sharing one broker and one Config.

    Parameters:
        name: shown in logs and plans.
        broker: broker URL; default ``FASTQ_BROKER_URL``, else ``sqlite:///fastq.db``.
        config: settings; default ``Config.from_env()`` (``broker`` wins over its URL).
        middleware: hooks around every message, in order.
        result_store: where results are kept when the broker keeps none (RabbitMQ):
            ``sqlite:///results.db`` (or ``memory://`` in one process). Default: the broker.
    """

    def __init__(
        self,
        name: str,
        broker: str | None = None,
        *,
        config: Config | None = None,
        middleware: Sequence[Middleware] = (),
        result_store: str | None = None,
    ) -> None:
        self.name = name
        if config is None:
            config = Config.from_env(broker_url=broker)
        elif broker is not None:
            config = msgspec.structs.replace(config, broker_url=broker)
        self.config = config
        self.middleware = list(middleware)
        self._hooks = Hooks(self.middleware)  # an async before_send is refused here
        self._hooks_of = list(self.middleware)
        self.tasks: dict[str, Task] = {}
        self.consumers: dict[str, Consumer] = {}
        #: periodic tasks by task name (``@app.periodic``)
        self.schedules: dict[str, Schedule] = {}
        #: workflows by name (``app.workflow``)
        self.workflows: dict[str, Workflow] = {}
        self._broker: Broker | None = None
        self._broker_url: str | None = None  # the URL self._broker was made for
        self.result_store_url = result_store
        self._result_store: Broker | None = None
        #: the module that made this App: workers import it from there (see ``run``)
        self._module = sys._getframe(1).f_globals.get("__name__", "__main__")

    @property
    def hooks(self) -> Hooks:
        """The hooks of ``middleware`` that do something (found again when the list changed).

        Raises:
            ConfigError: a ``before_send`` is ``async def``.
        """
        if self._hooks_of != self.middleware:
            self._hooks, self._hooks_of = Hooks(self.middleware), list(self.middleware)
        return self._hooks

    @property
    def broker(self) -> Broker:
        """The broker of ``config.broker_url``, made on first use (and again if the URL changes)."""
        if self._broker is None or self._broker_url != self.config.broker_url:
            self._broker = open_broker(self.config.broker_url)
            self._broker_url = self.config.broker_url
            for queue, options in self.queues().items():
                self._broker.configure(queue, options.amqp)
        return self._broker

    @property
    def result_store(self) -> Broker:
        """Where results are kept and read: ``result_store`` if given, else the broker.

        Raises:
            ConfigError: the broker keeps no results and no ``result_store`` was given, or the
                one given keeps none.
        """
        if self.result_store_url is None:
            broker = self.broker
            if not broker.keeps_results:
                raise ConfigError(broker.no_results())
            return broker
        if self._result_store is None:
            store = open_broker(self.result_store_url)
            if not store.keeps_results:
                raise ConfigError(
                    f"result_store={store.url} keeps no results; give a sqlite:/// URL "
                    "(or memory:// for one process)"
                )
            self._result_store = store
        return self._result_store

    def _check_topology(self, options: HandlerOptions) -> None:
        """Tasks that share a queue share its exchange and binding: they are one queue."""
        other = self.queues().get(options.queue)
        if other is not None and other.amqp != options.amqp:
            raise ConfigError(
                f"queue {options.queue!r} is declared with {other.amqp} by another task; "
                "give this task the same exchange and queue options, or another queue"
            )

    @overload
    def task(self, fn: F, /) -> Task: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        publish_to: str | Route | Task | None = None,
        **options: Any,
    ) -> Callable[[F], Task]: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        publish_to: str | Route | Task | None = None,
        **options: Any,
    ) -> Any:
        """Register a function (``async def`` or plain) as a task; use bare or with options.

        Parameters:
            name: the task's name on the wire (default: ``module.qualname``).
            publish_to: where the return value goes, published by the supervisor before the
                input is acked: a queue name (``bytes`` as they are, a list of them one message
                each, None nothing, other values their msgpack), a ``fastq.Route`` (the same,
                to an exchange: RabbitMQ) or another Task (the value is its one argument; the
                types are checked here).
            options: ``fastq.config.HandlerOptions`` by name (``queue`` default ``"default"``,
                ``kind``, ``max_retries``, ``retry_backoff``, ``timeout``, ``processes``,
                ``concurrency``, ``prefetch``, ``weight``, the autosize bounds and ``result_ttl``:
                seconds to keep each outcome for ``task.result``), and where the
                broker has exchanges (RabbitMQ) ``fastq.config.QueueOptions`` by name:
                ``exchange=``, ``exchange_kind=`` (direct, topic, fanout, headers),
                ``routing_key=``, ``binding_arguments=``, ``quorum=``, ``delivery_limit=``,
                ``single_active_consumer=``.
            unique: a send whose arguments equal those of a message still queued or running
                enqueues nothing and returns that message's id (the key: the task's name and
                its encoded arguments); ``unique_for`` seconds cap how long a key holds.

        Raises:
            ConfigError: an option is unknown or out of range, or the name is taken.
        """
        unique = bool(options.pop("unique", False))
        unique_for = options.pop("unique_for", None)
        handler = HandlerOptions.build(options.pop("queue", None) or DEFAULT_QUEUE, options)

        def register(fn: Callable[..., Any]) -> Task:
            task_name = name or f"{module_name(fn)}.{fn.__qualname__}"
            if task_name in self.tasks:
                raise ConfigError(f"a task named {task_name!r} is registered already; pass name=")
            if handler.queue in self.consumers:
                raise ConfigError(
                    f"queue {handler.queue!r} belongs to consumer "
                    f"{self.consumers[handler.queue].name}; give the task another queue"
                )
            self._check_topology(handler)
            task = Task(
                self, fn, task_name, handler, publish_to, unique=unique, unique_for=unique_for
            )
            self.tasks[task_name] = task
            if self._broker is not None:
                self._broker.configure(handler.queue, handler.amqp)
            return task

        return register(fn) if fn is not None else register

    def periodic(
        self,
        *,
        cron: str | None = None,
        every: float | dt.timedelta | None = None,
        timezone: str = "UTC",
        catch_up: str = "latest",
        args: Sequence[Any] = (),
    ) -> Callable[[Task], Task]:
        """Send a task on a schedule; stack it above ``@app.task``::

            @app.periodic(cron="*/5 * * * *", timezone="Europe/Paris")
            @app.task(queue="reports")
            def hourly_report() -> None: ...

        Every supervisor runs the scheduler, and each tick is enqueued once whatever their
        number (see the README's "Scheduling").

        Parameters:
            cron: a five-field cron expression, read in ``timezone`` (an IANA name).
            every: a period (seconds or a timedelta, at least 1 s), counted from the Unix
                epoch: ``every=timedelta(minutes=5)`` fires at :00, :05, ...
            catch_up: the ticks missed while every supervisor was down: ``"skip"`` none,
                ``"latest"`` the last one, ``"all"`` each one.
            args: the fixed arguments each tick sends (the task's parameters without them).

        Raises:
            ConfigError: neither or both of cron and every, a bad expression or time zone,
                ``args`` that do not fit the task, the task scheduled twice, or not a Task.
        """

        def register(task: Task) -> Task:
            if not isinstance(task, Task):
                raise ConfigError(
                    f"@app.periodic goes above @app.task, got {type(task).__name__}; stack "
                    "@app.periodic(...) over @app.task(...)"
                )
            if task.name in self.schedules:
                raise ConfigError(f"task {task.name} is periodic already; one schedule a task")
            try:
                task.checked(tuple(args), {})
            except (TypeError, msgspec.ValidationError) as e:
                raise ConfigError(
                    f"@app.periodic on {task.name}: args={tuple(args)!r} do not fit its "
                    f"parameters ({e}); give every argument in args="
                ) from None
            self.schedules[task.name] = build(
                task.name,
                cron=cron,
                every=every,
                timezone=timezone,
                catch_up=catch_up,
                args=tuple(args),
            )
            return task

        return register

    def workflow(self, name: str, *, keep: float | None = KEEP_RUNS) -> Workflow:
        """A new workflow of this App: a typed DAG of steps, each a task (see the README's
        "Workflows"); ``@wf.step(...)`` defines them. ``keep``: seconds an ended run (done or
        failed) is kept, for ``status``, ``result`` and ``resume`` (7 days by default; None:
        until ``wf.forget``); older ones are deleted as the workflow starts runs.

        Raises:
            ConfigError: the name is taken, or is not a word (it is part of the steps' names);
                ``keep`` is not a number of seconds > 0 or None.
        """
        from fastq.workflow.graph import Workflow

        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"workflow name {name!r} must be letters, digits, - and _")
        if name in self.workflows:
            raise ConfigError(f"a workflow named {name!r} is defined already; one per name")
        if keep is not None and (
            isinstance(keep, bool) or not isinstance(keep, int | float) or not keep > 0
        ):
            raise ConfigError(
                f"workflow {name}: keep must be the seconds an ended run is kept (> 0), or None "
                f"to keep runs until wf.forget; got {keep!r}"
            )
        wf = self.workflows[name] = Workflow(self, name, None if keep is None else float(keep))
        return wf

    def consumer(
        self, queue: str, /, *, publish_to: str | Route | Task | None = None, **options: Any
    ) -> Callable[[F], Consumer]:
        """Register a handler for every message on ``queue``, whoever produced it; it receives
        the raw body ``bytes``. The way to put fastq behind an existing queue. ``options`` are
        ``task``'s, but ``queue`` and ``result_ttl``; ``publish_to`` as ``task``'s (a returned
        ``bytes`` is published as it is, for other programs to read)."""
        handler = HandlerOptions.build(queue, options)

        def register(fn: Callable[[bytes], Any]) -> Consumer:
            if queue in self.consumers or any(t.queue == queue for t in self.tasks.values()):
                raise ConfigError(f"queue {queue!r} already has a handler; one consumer per queue")
            c = Consumer(self, fn, handler, publish_to)
            self.consumers[queue] = c
            if self._broker is not None:
                self._broker.configure(queue, handler.amqp)
            return c

        return register

    def run(
        self,
        queues: Sequence[str] | None = None,
        *,
        log_level: str = "WARNING",
        metrics: str | None = None,
    ) -> int:
        """Run this app's workers, with this process as their supervisor, until SIGTERM or
        SIGINT; return the exit code (0 after a clean drain). The same as
        ``fastq worker module:app``, from Python: ``if __name__ == "__main__": app.run()``.

        Parameters:
            queues: consume only these (default: every queue with a task or consumer).
            log_level: the workers' log level; this process logs through the handlers you set up.
            metrics: serve Prometheus ``/metrics`` at this ``host:port`` (a port alone: on
                127.0.0.1), as ``Config.metrics``; needs the metrics extra.

        Raises:
            ConfigError: a queue has no handler, the broker URL is bad, or the App is not a
                module-level global (workers import it by ``module:attribute``); metrics without
                the metrics extra.
        """
        from fastq.engine.supervisor import run_app

        if metrics is not None:
            self.config = msgspec.structs.replace(self.config, metrics=metrics)
        return run_app(
            self, self.import_spec(), list(queues) if queues else None, log_level=log_level
        )

    async def queue_depth(self, queue: str) -> QueueDepth:
        """How many messages of ``queue`` are ready, unacked, delayed and dead, as the broker
        counts them (RabbitMQ: see ``QueueDepth.unacked_scope``)."""
        broker = self.broker
        await broker.open()
        return await broker.queue_depth(queue)

    @contextlib.contextmanager
    def testing(self, *, eager: bool = False) -> Iterator[App]:
        """This app on a ``memory://`` broker of its own for the ``with`` block (its broker is
        back after it): nothing reaches a real broker. ``fastq.testing.drain(app)`` runs what
        was sent; with ``eager=True`` each ``send()`` runs its message at once, in this
        process, through the workers' handler path (the same validation), and raises
        ``TaskFailed`` when it failed for good.
        """
        from fastq import inline

        saved = self.config, self._broker, self._broker_url
        broker = inline.EagerBroker(self) if eager else None
        url = broker.url if broker is not None else f"memory://testing-{id(self)}-{next(_testing)}"
        self.config = msgspec.structs.replace(self.config, broker_url=url)
        self._broker, self._broker_url = broker, (url if broker is not None else None)
        try:
            yield self
        finally:
            self.config, self._broker, self._broker_url = saved

    def import_spec(self) -> str:
        """``module:attribute`` by which worker processes import this App."""
        module = sys.modules.get(self._module)
        names = [k for k, v in vars(module).items() if v is self] if module is not None else []
        if not names:
            raise ConfigError(
                f"App {self.name!r} is not a global of module {self._module!r}; workers import it "
                "by "
                "module:attribute, so create it at module level (or run `fastq worker module:app`)"
            )
        return f"{importable_name(self._module)}:{names[0]}"

    def queues(self) -> dict[str, HandlerOptions]:
        """Every queue this app consumes, with the options that size it (the first task's)."""
        found: dict[str, HandlerOptions] = {}
        handlers: list[Task | Consumer] = [*self.tasks.values(), *self.consumers.values()]
        for handler in handlers:
            found.setdefault(handler.queue, handler.options)
        return found

    def __repr__(self) -> str:
        return (
            f"<App {self.name!r} broker={mask_url(self.config.broker_url)!r} "
            f"tasks={len(self.tasks)} consumers={len(self.consumers)}>"
        )
