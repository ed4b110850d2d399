"""One channel of fastq's consuming connection (fastq.broker.amqp.stream): its synchronous
methods (one queue of waiters, answered in order), its consumers, and its acks.

Acks are coalesced: a ``basic.ack`` with ``multiple`` is held back for at most ``ack_seconds``
(the consumers' channels: ``ACK_SECONDS``, 1 ms), or until it covers ``ack_batch`` deliveries,
then goes as one frame for all of them. At a low rate, where each completion would otherwise
be a write of its own (and a wake-up of RabbitMQ, and one delivery back per ack), this makes
one write and one batch of deliveries of several; at a high rate the batch fills first and
nothing waits. The bound is a timer, not the next message: an ack never waits longer than
``ack_seconds``. Anything else written on the channel (a single ack, a nack, a synchronous
method such as ``basic.cancel`` or ``channel.close``) first writes the held ack, so frames keep
their order; a channel that closes drops it (RabbitMQ requeues what was not acked).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pamqp import commands, frame
from pamqp.base import Frame

from fastq.errors import FrameError

if TYPE_CHECKING:
    from fastq._amqp import Delivered
    from fastq.broker.amqp.stream import Stream

__all__ = ["ACK_SECONDS", "ChannelClosed", "StreamChannel"]

logger = logging.getLogger(__name__)

#: the longest a consumer's ``basic.ack multiple`` is held back to go with the next ones (seconds)
ACK_SECONDS = 0.001
_ACK = struct.Struct(">BHIHHQBB")  # method frame: basic.ack / basic.nack, then the frame end

F = TypeVar("F", bound=Frame)


class ChannelClosed(ConnectionError):
    """RabbitMQ closed the channel (or the connection under it); the reason says why."""


class StreamChannel:
    """One channel of the consuming connection: its consumers, and the callback that takes each
    read's deliveries for it as one list."""

    def __init__(self, stream: Stream, number: int) -> None:
        self.stream, self.number = stream, number
        self.is_closed = False
        self.closed_because = ""
        #: the consumer tags RabbitMQ knows on this channel (a server's basic.cancel removes one)
        self.consumers: set[str] = set()
        self.on_deliveries: Callable[[list[Delivered]], None] | None = None
        #: in confirm mode (fastq.broker.amqp.outbox): basic.ack / basic.nack (tag, multiple,
        #: ack), and a returned message (basic.return with its content)
        self.on_confirm: Callable[[int, bool, bool], None] | None = None
        self.on_return: Callable[[Delivered], None] | None = None
        #: told why, once, when it closes
        self.on_closed: list[Callable[[str], None]] = []
        self._waiters: collections.deque[tuple[type[Frame], asyncio.Future[Any]]] = (
            collections.deque()
        )
        #: coalesced acks (see the module docstring): 0 seconds writes each at once
        self.ack_seconds = 0.0
        self.ack_batch = 1
        #: the newest tag to ack (multiple) not written yet, and the newest written
        self._ack_due = self._ack_sent = 0
        self._ack_timer: asyncio.TimerHandle | None = None

    async def basic_qos(self, prefetch_count: int) -> None:
        await self.rpc(commands.Basic.Qos(prefetch_count=prefetch_count), commands.Basic.QosOk)

    async def basic_consume(
        self, queue: str, callback: Callable[[list[Delivered]], None] | None = None
    ) -> str:
        """Consume ``queue`` (acks on); its deliveries go to ``callback`` (the channel's)."""
        if callback is not None:
            self.on_deliveries = callback
        ok = await self.rpc(commands.Basic.Consume(queue=queue), commands.Basic.ConsumeOk)
        tag = str(ok.consumer_tag)
        self.consumers.add(tag)
        return tag

    async def basic_cancel(self, consumer_tag: str) -> None:
        await self.rpc(commands.Basic.Cancel(consumer_tag=consumer_tag), commands.Basic.CancelOk)
        self.consumers.discard(consumer_tag)

    def basic_ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        if multiple and self.ack_seconds > 0:
            if self.is_closed:  # nothing to hold an ack for: RabbitMQ requeued what it held
                raise ChannelClosed(f"channel {self.number} is closed ({self.closed_because})")
            if self.stream.is_closed:
                raise ChannelClosed(
                    f"the consuming connection is closed ({self.stream.closed_because})"
                )
            self._ack_due = max(self._ack_due, delivery_tag)
            if self._ack_due - self._ack_sent >= self.ack_batch:
                self.flush_acks()
            elif self._ack_timer is None:
                self._ack_timer = self.stream.timer(self.ack_seconds, self._ack_late)
            return
        self.flush_acks()
        self.stream.write(_ACK.pack(1, self.number, 13, 60, 80, delivery_tag, multiple, 0xCE))

    def basic_nack(
        self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True
    ) -> None:
        self.flush_acks()
        bits = (1 if multiple else 0) | (2 if requeue else 0)
        self.stream.write(_ACK.pack(1, self.number, 13, 60, 120, delivery_tag, bits, 0xCE))

    def flush_acks(self) -> None:
        """Write the held ``basic.ack multiple`` now, if there is one."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._ack_due > self._ack_sent:
            self._ack_sent = self._ack_due
            self.stream.write(_ACK.pack(1, self.number, 13, 60, 80, self._ack_due, 1, 0xCE))

    def _ack_late(self) -> None:
        self._ack_timer = None
        try:
            self.flush_acks()
        except ChannelClosed:  # gone meanwhile: RabbitMQ requeues what it held
            pass

    async def close(self) -> None:
        if self.is_closed:
            return
        try:
            await self.rpc(commands.Channel.Close(200, "", 0, 0), commands.Channel.CloseOk)
        finally:
            self.closed("closed by us")

    async def rpc(self, method: Frame, reply: type[F]) -> F:
        """Send ``method`` and wait for its ``reply`` (RabbitMQ answers a channel's synchronous
        methods in order, so one queue of waiters per channel)."""
        if self.is_closed:
            raise ChannelClosed(f"channel {self.number} is closed ({self.closed_because})")
        data = frame.marshal(method, self.number)
        self.flush_acks()
        waiter: asyncio.Future[F] = asyncio.get_running_loop().create_future()
        self._waiters.append((reply, waiter))
        self.stream.write(data)
        return await waiter

    def expect(self, reply: type[F]) -> asyncio.Future[F]:
        """A waiter for a frame RabbitMQ sends unasked (the handshake's start and tune)."""
        waiter: asyncio.Future[F] = asyncio.get_running_loop().create_future()
        self._waiters.append((reply, waiter))
        return waiter

    def answered(self, value: Frame) -> None:
        if not self._waiters:
            logger.warning("unexpected %s on channel %d; ignored", value.name, self.number)
            return
        reply, waiter = self._waiters.popleft()
        if waiter.done():
            return
        if isinstance(value, reply):
            waiter.set_result(value)
        else:
            waiter.set_exception(
                FrameError(f"RabbitMQ answered {value.name} where {reply.name} was due")
            )

    def closed(self, because: str) -> None:
        """RabbitMQ closed it (or the connection went): every waiter fails, no more consumers."""
        if self.is_closed:
            return
        self.is_closed, self.closed_because = True, because
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self.consumers.clear()
        self.stream.channels.pop(self.number, None)
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ChannelClosed(f"channel {self.number}: {because}"))
        for tell in self.on_closed:
            tell(because)
