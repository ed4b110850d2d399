"""The async Broker interface every backend implements, and the values that cross it.

Only the supervisor talks to a broker (workers never do). It fetches deliveries in batches, hands
them to workers, and settles them in batches: ack when the handler finished, retry with a delay,
dead-letter with a reason, or release (give back, unfinished). Producers publish, synchronously
(``task.send``) or not. At-least-once: a delivery that is never settled comes back.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence

import msgspec

from fastq._aio import Signal, wait_either
from fastq.config import EXCHANGE_KINDS, QueueOptions
from fastq.errors import ConfigError
from fastq.url import mask_url

__all__ = [
    "EXCHANGE_KINDS",
    "Broker",
    "DeadLetter",
    "Delivery",
    "Message",
    "QueueDepth",
    "QueueOptions",
    "Retry",
    "Signal",
    "mask_url",
    "query_float",
    "wait_either",
]


class Message(msgspec.Struct, frozen=True, gc=False):
    """One message to publish."""

    body: bytes
    message_id: str
    headers: dict[str, str] | None = None
    #: seconds before it may be delivered
    delay: float = 0.0


class Delivery(msgspec.Struct, gc=False):
    """One message handed to this consumer; settle it by ``tag``."""

    tag: int
    queue: str
    body: bytes
    message_id: str
    #: deliveries so far, this one included (1 on the first); crashes and releases count
    attempts: int
    #: times it failed and was scheduled again (settle(retry=...)); what max_retries counts
    retries: int = 0
    headers: dict[str, str] | None = None


class Retry(msgspec.Struct, frozen=True, gc=False):
    tag: int
    delay: float
    reason: str


class DeadLetter(msgspec.Struct, frozen=True, gc=False):
    """A message that failed for good, kept with the reason."""

    id: int
    queue: str
    message_id: str
    body: bytes
    attempts: int
    retries: int
    reason: str
    failed_at: float
    headers: dict[str, str] | None = None


class QueueDepth(msgspec.Struct, frozen=True):
    #: deliverable now
    ready: int
    #: delivered and not settled yet
    unacked: int
    #: waiting for a retry delay to pass
    delayed: int = 0
    #: failed for good (dead letters kept)
    dead: int = 0
    #: consumers attached now, where the broker says (RabbitMQ)
    consumers: int | None = None
    #: where ``unacked`` comes from when it is not the whole broker's count: "this process"
    #: (RabbitMQ without its management API, which alone counts unacked messages of every host)
    unacked_scope: str = "all"


class Broker(abc.ABC):
    """A queue backend. Every method is safe to call from the one event loop that opened it,
    except ``publish_sync``, which any thread may call."""

    #: The URL with its password masked: the only form that goes into logs and errors.
    url: str

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and prepare storage; idempotent."""

    def configure(self, queue: str, options: QueueOptions) -> None:
        """How ``queue`` is declared and bound, and where ``publish`` to it goes (exchange and
        routing key); brokers without exchanges ignore it."""

    @abc.abstractmethod
    async def declare(self, queue: str) -> None:
        """Make sure ``queue`` exists (durable where the backend is)."""

    @abc.abstractmethod
    async def publish(self, queue: str, messages: Sequence[Message]) -> None:
        """Publish in order; returns once the broker holds them (durably, where it is durable)."""

    @abc.abstractmethod
    def publish_sync(self, queue: str, messages: Sequence[Message]) -> None:
        """``publish`` for code without an event loop, such as ``task.send()``."""

    @abc.abstractmethod
    async def fetch(
        self,
        queue: str,
        max_messages: int,
        *,
        timeout: float,
        wake: asyncio.Event | Signal | None = None,
    ) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, waiting at most ``timeout`` seconds for the first;
        a wait also ends (with what there is, maybe nothing) as soon as ``wake`` is set."""

    @abc.abstractmethod
    async def settle(
        self,
        queue: str,
        *,
        ack: Sequence[int] = (),
        retry: Sequence[Retry] = (),
        dead: Sequence[tuple[int, str]] = (),
        release: Sequence[int] = (),
    ) -> None:
        """Settle deliveries in one round trip: ack (done), retry (again after a delay),
        dead-letter (with a reason), release (unfinished: deliverable again now)."""

    async def exchange(
        self,
        queue: str,
        *,
        ack: Sequence[int] = (),
        retry: Sequence[Retry] = (),
        dead: Sequence[tuple[int, str]] = (),
        release: Sequence[int] = (),
        fetch: int = 0,
        timeout: float = 0.0,
        wake: asyncio.Event | Signal | None = None,
    ) -> list[Delivery]:
        """Settle as ``settle`` does, then take up to ``fetch`` deliveries as ``fetch`` does: what
        a consumer does after each batch of work. Backends that can do both in one round trip
        override this; the supervisor calls nothing else on its hot path.

        When it raises, the supervisor sends the same outcomes again later, so settling must be
        idempotent (a tag settled already is ignored), and deliveries taken before the error
        must come back to some consumer (a lease that lapses, a channel that closes). The
        default settles, then fetches: a failed fetch settles again next time, which the
        memory and SQLite brokers ignore.
        """
        if ack or retry or dead or release:
            await self.settle(queue, ack=ack, retry=retry, dead=dead, release=release)
        if fetch <= 0:
            return []
        return await self.fetch(queue, fetch, timeout=timeout, wake=wake)

    async def prefetch(self, queue: str, prefetch: int) -> None:
        """The host's budget of unsettled deliveries of ``queue`` (the supervisor's, whole):
        a broker that pushes (RabbitMQ's ``basic.qos``) holds no more than this. Brokers that
        are asked (``fetch``) need not do anything."""

    @abc.abstractmethod
    async def queue_depth(self, queue: str) -> QueueDepth:
        """How many messages are ready, unacked and delayed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; unsettled deliveries come back to some consumer later."""


def query_float(
    url: str, params: dict[str, list[str]], name: str, default: float, minimum: float
) -> float:
    """A number from a broker URL's query, checked; ConfigError names the URL (masked)."""
    if name not in params:
        return default
    raw = params[name][-1]
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= minimum:
        raise ConfigError(f"{name}={raw!r} in {mask_url(url)} must be a number >= {minimum}")
    return value
