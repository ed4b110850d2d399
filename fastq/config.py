"""Frozen settings; the only reader of FASTQ_* environment variables.

``Config`` is how an App and its worker run; ``HandlerOptions`` is what one task or consumer
declares (the one definition of those options: the decorators, the plan and the controller all
take it), and ``QueueOptions`` how its queue is declared where the broker has exchanges.

Every duration is float seconds and every size ends in ``_bytes``. Settings of one broker go in
its URL's query (``sqlite:///fastq.db?lease=60``), parsed by that broker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from fastq.errors import ConfigError
from fastq.url import mask_url

#: The most I/O handlers autosize raises a host to, all its queues together (the default of
#: ``io_concurrency_ceiling``): past the formula's min(100, cores x 2) only while cores stay idle
#: with a backlog waiting and each step pays (a 5 ms wait needs 100 handlers for 20,000 messages
#: a second: a host that can do more must not stop there); the queues' shares split it.
DEFAULT_IO_CONCURRENCY_CEILING = 1000

#: The embedded default: a SQLite file in the working directory.
DEFAULT_BROKER_URL = "sqlite:///fastq.db"

#: How a handler's work is sized: waiting (io), computing (cpu), or measured at run time (auto).
Kind = Literal["io", "cpu", "auto"]
KINDS = ("io", "cpu", "auto")
EXCHANGE_KINDS = ("direct", "topic", "fanout", "headers")


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How an App and its worker run. ``None`` means "autosize decides" (see fastq.autosize).

    Raises:
        ConfigError: a value is out of range (the message names the field and the range).
    """

    broker_url: str = DEFAULT_BROKER_URL
    processes: int | None = None
    concurrency: int | None = None
    prefetch: int | None = None
    pin_cpus: bool = True
    #: follow the load: move concurrency and prefetch that you did not set (see fastq.autosize)
    autosize: bool = True
    #: the most I/O handlers autosize raises the host to, its queues' shares together
    io_concurrency_ceiling: int = DEFAULT_IO_CONCURRENCY_CEILING
    ring_size_bytes: int = 2 << 20
    batch_max: int = 256
    max_message_bytes: int = 1 << 20
    shutdown_timeout: float = 30.0
    #: a worker stopped (SIGSTOP) this long is killed and replaced; what it held goes elsewhere
    worker_stopped_timeout: float = 10.0
    max_tasks_per_child: int | None = None
    max_memory_per_child_bytes: int | None = None
    #: serve Prometheus /metrics at this ``host:port`` (a bare port: on 127.0.0.1); None: off.
    #: Needs the metrics extra (prometheus_client).
    metrics: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "processes",
            "concurrency",
            "prefetch",
            "max_tasks_per_child",
            "io_concurrency_ceiling",
        ):
            _at_least(name, getattr(self, name), 1)
        _at_least("ring_size_bytes", self.ring_size_bytes, 64 << 10)
        _at_least("batch_max", self.batch_max, 1)
        _at_least("max_message_bytes", self.max_message_bytes, 1)
        _at_least("max_memory_per_child_bytes", self.max_memory_per_child_bytes, 1 << 20)
        if self.max_message_bytes > self.ring_size_bytes // 2:
            raise ConfigError(
                f"max_message_bytes={self.max_message_bytes} exceeds half of ring_size_bytes="
                f"{self.ring_size_bytes}; raise ring_size_bytes or lower max_message_bytes"
            )
        if not self.worker_stopped_timeout > 0:
            raise ConfigError(
                f"worker_stopped_timeout must be > 0 seconds, got {self.worker_stopped_timeout!r}"
            )
        if not self.shutdown_timeout >= 0:
            raise ConfigError(
                f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout!r}"
            )
        if self.metrics is not None:
            metrics_address(self.metrics)
        if "://" not in self.broker_url:
            raise ConfigError(
                f"broker_url must look like sqlite:///path, memory:// or amqp://host, got "
                f"{mask_url(self.broker_url)!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Settings from ``FASTQ_<FIELD>`` variables (``FASTQ_BROKER_URL``, ``FASTQ_PROCESSES``...),
        then ``overrides`` (keyword arguments that are not None win).

        Raises:
            ConfigError: a variable does not parse; the message names it.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in cls.__struct_fields__:
            raw = environ.get("FASTQ_" + field.upper())
            if raw is None:
                continue
            try:
                values[field] = _parse(cls, field, raw)
            except ValueError as e:
                raise ConfigError(
                    f"FASTQ_{field.upper()}={mask_url(raw)!r} is not valid: {e}"
                ) from e
        from_env = set(values)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as e:
            if isinstance(e.__cause__, ConfigError):
                raise e.__cause__ from None
            field = str(e).rpartition("$.")[2].strip("`")
            if field in from_env:
                raise ConfigError(
                    f"FASTQ_{field.upper()}={mask_url(environ['FASTQ_' + field.upper()])!r} is not "
                    "valid: "
                    f"{str(e).partition(' - at ')[0]}"
                ) from e
            raise ConfigError(str(e)) from e


def metrics_address(value: str) -> tuple[str, int]:
    """``(host, port)`` of a metrics address: ``host:port``, ``[v6]:port``, or a port alone
    (loopback: metrics are served to another host only when its address is given).

    Raises:
        ConfigError: not of that form, or the port is not 0..65535.
    """
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"metrics must be host:port or a port (e.g. 127.0.0.1:9464), got {value!r}"
        )
    return host, int(port)


def _parse(cls: type[Config], field: str, raw: str) -> Any:
    value: Any = None if raw.strip().lower() in ("", "none") else raw
    annotation = cls.__annotations__[field]
    if value is not None and "bool" in str(annotation):
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
        value = raw.lower() in ("1", "true", "yes", "on")
    return value


def _at_least(name: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum} or None, got {value}")


class QueueOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How a queue is declared and bound where the broker has exchanges (RabbitMQ); the
    embedded brokers have one queue per name and ignore these.

    ``routing_key`` is the binding key (a pattern, for topic) and also what ``send`` publishes
    with; None is the queue's name. For a headers exchange, ``binding_arguments`` are the
    binding's (``x-match`` and the headers), and ``send`` puts the same headers on its messages.
    """

    exchange: str = ""
    exchange_kind: str = "direct"
    routing_key: str | None = None
    binding_arguments: dict[str, str] | None = None
    #: a quorum queue (``x-queue-type=quorum``), replicated; ``delivery_limit`` caps redeliveries
    quorum: bool = False
    delivery_limit: int | None = None
    #: one consumer of all those attached gets the messages (``x-single-active-consumer``)
    single_active_consumer: bool = False

    def __post_init__(self) -> None:
        if self.exchange_kind not in EXCHANGE_KINDS:
            raise ConfigError(
                f"exchange_kind must be one of {EXCHANGE_KINDS}, got {self.exchange_kind!r}"
            )
        if not self.exchange and self.exchange_kind != "direct":
            raise ConfigError(
                f"exchange_kind={self.exchange_kind!r} needs an exchange= name; the "
                "default exchange is direct"
            )
        if self.exchange.startswith("amq."):
            raise ConfigError(
                f"exchange {self.exchange!r}: names starting with 'amq.' are RabbitMQ's own"
            )
        if self.delivery_limit is not None and (not self.quorum or self.delivery_limit < 1):
            raise ConfigError(
                f"delivery_limit={self.delivery_limit!r} needs quorum=True and a value >= 1"
            )
        if self.binding_arguments is not None and self.exchange_kind != "headers":
            raise ConfigError("binding_arguments are for exchange_kind='headers'")

    def arguments(self) -> dict[str, Any]:
        """The queue's declare arguments."""
        args: dict[str, Any] = {}
        if self.quorum:
            args["x-queue-type"] = "quorum"
            if self.delivery_limit is not None:
                args["x-delivery-limit"] = self.delivery_limit
        if self.single_active_consumer:
            args["x-single-active-consumer"] = True
        return args


class Route(msgspec.Struct, frozen=True):
    """Where ``publish_to`` sends a return value on a broker with exchanges (RabbitMQ): the
    exchange (declared durable, of ``exchange_kind``, if it does not exist) and the routing key.
    Unlike a queue name, a route may lead nowhere: RabbitMQ drops what no binding takes."""

    exchange: str
    routing_key: str = ""
    exchange_kind: str = "direct"
    #: headers put on each message (a headers exchange routes by them)
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if not self.exchange or not isinstance(self.exchange, str):
            raise ConfigError(f"Route needs an exchange name, got {self.exchange!r}")
        if self.exchange.startswith("amq."):
            raise ConfigError(
                f"exchange {self.exchange!r}: names starting with 'amq.' are RabbitMQ's own"
            )
        if self.exchange_kind not in EXCHANGE_KINDS:
            raise ConfigError(
                f"exchange_kind must be one of {EXCHANGE_KINDS}, got {self.exchange_kind!r}"
            )


class HandlerOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What a task or consumer declared (``@app.task(...)``, ``@app.consumer(queue, ...)``);
    None means "the app's setting, else autosize". The one definition of these options: the
    decorators take them by name (``build``), the plan sizes each queue from them and the
    controller keeps within their bounds.

    Raises:
        ConfigError: a value is out of range, or two of them contradict each other.
    """

    queue: str
    kind: Kind = "auto"
    max_retries: int = 3
    #: first retry delay in seconds; doubles each retry, with jitter
    retry_backoff: float = 1.0
    #: seconds a handler may run; past it, the call fails as if it raised
    timeout: float | None = None
    #: how many of the host's worker processes run this queue (None: all)
    processes: int | None = None
    concurrency: int | None = None
    prefetch: int | None = None
    #: its share of the host's I/O handlers beside other busy queues (relative; autosize)
    weight: float = 1.0
    #: bounds for autosize, host-wide (a fixed ``concurrency``/``prefetch`` leaves no room)
    min_concurrency: int | None = None
    max_concurrency: int | None = None
    min_prefetch: int | None = None
    max_prefetch: int | None = None
    #: seconds to keep each message's outcome for ``task.result`` (None: keep nothing)
    result_ttl: float | None = None
    #: exchange, binding and queue type, where the broker has them (RabbitMQ)
    amqp: QueueOptions = QueueOptions()

    @classmethod
    def build(cls, queue: str, given: Mapping[str, Any]) -> HandlerOptions:
        """The options of a decorator call: its own names, and ``QueueOptions``' names, which
        go to ``amqp``.

        Raises:
            ConfigError: a name is neither; or what ``__post_init__`` refuses.
        """
        own = {k: v for k, v in given.items() if k in _HANDLER_FIELDS}
        amqp = {k: v for k, v in given.items() if k in _QUEUE_FIELDS}
        unknown = sorted(set(given) - set(own) - set(amqp))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown}; a task or consumer takes "
                f"{sorted(_HANDLER_FIELDS)}, and where the broker has exchanges "
                f"{sorted(_QUEUE_FIELDS)}"
            )
        return cls(queue=queue, **own, amqp=QueueOptions(**amqp))

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.queue or not isinstance(self.queue, str):
            raise ConfigError(f"queue must be a non-empty string, got {self.queue!r}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if not self.retry_backoff >= 0:
            raise ConfigError(f"retry_backoff must be >= 0 seconds, got {self.retry_backoff!r}")
        if self.result_ttl is not None and not (
            isinstance(self.result_ttl, (int, float)) and self.result_ttl > 0
        ):
            raise ConfigError(
                f"result_ttl must be > 0 seconds or None (keep no results), got {self.result_ttl!r}"
            )
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds or None, got {self.timeout!r}")
        for name in (
            "processes",
            "concurrency",
            "prefetch",
            "min_concurrency",
            "max_concurrency",
            "min_prefetch",
            "max_prefetch",
        ):
            _at_least(name, getattr(self, name), 1)
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ConfigError(
                f"weight must be a number > 0 (a share beside other queues), got {self.weight!r}"
            )
        feeds = self.min_concurrency or self.concurrency or 0
        if self.max_prefetch is not None and feeds > self.max_prefetch:
            raise ConfigError(
                f"max_prefetch={self.max_prefetch} is below the handlers it must "
                f"feed ({feeds} at once); raise it"
            )
        for what in ("concurrency", "prefetch"):
            low, high = getattr(self, f"min_{what}"), getattr(self, f"max_{what}")
            if low is not None and high is not None and low > high:
                raise ConfigError(f"min_{what}={low} is above max_{what}={high}; swap them")
            if getattr(self, what) is not None and (low is not None or high is not None):
                raise ConfigError(
                    f"{what}={getattr(self, what)} is fixed, so min_{what}/max_{what} have "
                    "nothing to bound; set one or the other"
                )


_HANDLER_FIELDS = frozenset(HandlerOptions.__struct_fields__) - {"queue", "amqp"}
_QUEUE_FIELDS = frozenset(QueueOptions.__struct_fields__)
