"""The periodic scheduler's leader on RabbitMQ, and the last ticks it enqueued.

Every supervisor of an App consumes the queue ``fastq.schedule.<app>`` (durable, single active
consumer, at most one ready message) with a prefetch of 1. The queue holds a token: RabbitMQ
delivers it to the active consumer only, which keeps it unacked for as long as it lives; that
consumer is the leader and alone publishes the ticks. When its connection goes (the process
died, the network went), RabbitMQ takes the token back and hands it to the next consumer: the
next leader. A supervisor that finds the queue empty adds a token; the queue's length limit
keeps at most one waiting, so tokens never pile up.

The last ticks live in ``fastq.schedule.<app>.last``, a durable queue of length 1 (RabbitMQ
drops the older message when a newer one comes: a last-value queue). After each tick the leader
publishes there, confirmed, one message with the latest tick of every schedule; a new leader
reads it (get, then reject back) before it publishes. A leader killed between a tick's publish
and its record's leaves the previous record: the next leader publishes that tick again (at least
once under faults, exactly once without).
"""

from __future__ import annotations

import logging
from typing import Any

import aiormq
import aiormq.abc
import msgspec

from fastq.broker.amqp.connection import Connection
from fastq.errors import ConfigError

logger = logging.getLogger(__name__)

_record = msgspec.msgpack.Encoder()
_read = msgspec.msgpack.Decoder(dict[str, float])
_PERSISTENT = aiormq.spec.Basic.Properties(delivery_mode=2)


class Election:
    """One group's election (``Broker.lead``) on this process's connection."""

    def __init__(self, connection: Connection, group: str) -> None:
        self.connection, self.group = connection, group
        #: the connection generation whose channel holds the token (-1: none)
        self.holds = -1
        self.channel: aiormq.abc.AbstractChannel | None = None
        #: schedule -> latest tick, as this leader knows it (read from the record first)
        self.ticks: dict[str, float] = {}

    @property
    def leading(self) -> bool:
        c = self.connection
        return (
            self.holds == c.generation
            and c.connected.is_set()
            and c.connection is not None
            and not c.connection.is_closed
            and self.channel is not None
            and not self.channel.is_closed
        )

    async def join(self) -> None:
        """Consume the token queue on a channel of its own (again after a reconnect: called
        while the connection is being restored, so it does not wait for it to be ready)."""
        conn = self.connection
        assert conn.connection is not None
        generation = conn.generation
        self.holds = -1
        self.channel = None  # set once it consumes: a join that failed half-way is made again
        channel = await conn.connection.channel(publisher_confirms=True)
        await channel.basic_qos(prefetch_count=1)
        limited: dict[str, Any] = {"x-max-length": 1}
        ok = await channel.queue_declare(
            self.group, durable=True, arguments={**limited, "x-single-active-consumer": True}
        )
        await channel.queue_declare(f"{self.group}.last", durable=True, arguments=limited)
        if ok is not None and not ok.message_count:
            await channel.basic_publish(b"token", routing_key=self.group, properties=_PERSISTENT)

        async def token(message: aiormq.abc.DeliveredMessage) -> None:
            if generation == conn.generation:
                self.holds = generation
                logger.info("scheduler: this supervisor leads %s", self.group)

        await channel.basic_consume(self.group, token, no_ack=False)
        self.channel = channel

    async def last(self) -> dict[str, float]:
        """The record of the last ticks (read afresh: this process may just have become
        leader)."""
        channel = self._channel()
        got = await channel.basic_get(f"{self.group}.last", no_ack=False)
        if isinstance(got.delivery, aiormq.spec.Basic.GetEmpty):
            ticks: dict[str, float] = {}
        else:
            try:
                ticks = _read.decode(got.body)
            except msgspec.DecodeError:
                logger.warning("scheduler: ignoring an unreadable record in %s.last", self.group)
                ticks = {}
            assert got.delivery_tag is not None
            await channel.basic_reject(got.delivery_tag, requeue=True)
        for name, tick in self.ticks.items():  # what this process published itself
            ticks[name] = max(tick, ticks.get(name, tick))
        self.ticks = ticks
        return ticks

    async def record(self, schedule: str, tick: float) -> None:
        """``tick`` of ``schedule`` was published: the record says so (confirmed)."""
        self.ticks[schedule] = max(tick, self.ticks.get(schedule, tick))
        await self._channel().basic_publish(
            _record.encode(self.ticks), routing_key=f"{self.group}.last", properties=_PERSISTENT
        )

    def _channel(self) -> aiormq.abc.AbstractChannel:
        if self.channel is None or self.channel.is_closed:
            raise ConnectionError(f"the channel of the election {self.group} is gone")
        return self.channel


class Elections:
    """This process's elections, joined again after every reconnect."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.by_group: dict[str, Election] = {}

    async def lead(self, group: str) -> None:
        election = self.by_group.get(group)
        if election is None or election.channel is None or election.channel.is_closed:
            await self.connection.ready()
            election = self.by_group[group] = election or Election(self.connection, group)
            await election.join()

    async def restore(self) -> None:
        for election in self.by_group.values():
            if election.channel is None or election.channel.is_closed:
                await election.join()

    def lost(self) -> None:
        for election in self.by_group.values():
            election.holds, election.channel = -1, None

    def leading(self, group: str) -> bool:
        election = self.by_group.get(group)
        return election is not None and election.leading

    def of(self, schedule: str) -> Election:
        """The election whose leader publishes ``schedule`` (the one this process joined)."""
        if len(self.by_group) != 1:
            raise ConfigError(
                f"periodic ticks on RabbitMQ are published by the leader of one election; "
                f"expected one Broker.lead(group) before publish_tick({schedule!r}), got "
                f"{len(self.by_group)}"
            )
        return next(iter(self.by_group.values()))
