"""Settling, on each delivery's own channel.

Acks go as one ``basic.ack`` with ``multiple`` over the completed prefix of delivery tags
(``fastq.ring.AckWindow``); completed tags past a gap ("stragglers") are acked one by one once
``STRAGGLERS`` of them wait or ``STRAGGLER_SECONDS`` passed. A retry is published, confirmed, to
``<queue>.retry.<ms>``, a durable queue whose message TTL dead-letters it back to ``<queue>``
(one such queue per delay, rounded to two significant digits, so a long delay never blocks a
short one), with the retry count in the ``x-fastq-retries`` header; then the original is acked. A
dead letter is published, confirmed, to ``<queue>.dlq`` with ``x-fastq-reason``,
``x-fastq-exception`` and ``x-fastq-attempts`` headers, then acked. A release is a
``basic.nack`` with requeue. Settling a delivery of a connection that is gone is a no-op:
RabbitMQ requeued it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import aiormq.abc
from pamqp.commands import Basic

from fastq.broker.amqp.connection import CONNECTION_ERRORS, Connection
from fastq.broker.amqp.consumer import HEADER_RETRIES, Consumer, Consumers, Held
from fastq.broker.amqp.publish import Publisher
from fastq.broker.base import Retry

logger = logging.getLogger(__name__)

HEADER_REASON = "x-fastq-reason"
HEADER_EXCEPTION = "x-fastq-exception"
HEADER_ATTEMPTS = "x-fastq-attempts"
#: when it was dead-lettered (epoch seconds), for ``fastq dlq list``
HEADER_FAILED_AT = "x-fastq-failed-at"
#: a reason is cut to this many characters in a header
REASON_CHARS = 1000

#: a copy to publish before its original is acked: (held, routing key, delay, headers)
_Copy = tuple[Held, str, float, dict[str, Any]]


def exception_type(reason: str) -> str:
    """``ValueError`` of ``"ValueError: bad input"``; empty when the reason names none."""
    head = reason.partition(":")[0].strip()
    return head if head.replace(".", "").replace("_", "").isalnum() and " " not in head else ""


class Settler:
    """Acks, retries, dead letters and releases of the consumers' deliveries."""

    def __init__(self, connection: Connection, consumers: Consumers, publisher: Publisher) -> None:
        self.connection, self.consumers, self.publisher = connection, consumers, publisher

    async def settle(
        self,
        queue: str,
        *,
        ack: Sequence[int] = (),
        retry: Sequence[Retry] = (),
        dead: Sequence[tuple[int, str]] = (),
        release: Sequence[int] = (),
    ) -> None:
        copies = [self.retry_copy(r) for r in retry] + [self.dead_copy(t, why) for t, why in dead]
        ready = [c for c in copies if c is not None]
        if ready:  # published and confirmed before the originals are acked
            channel = await self.connection.ready()
            # again, if a returned copy found its topology gone
            await self.connection.declare(queue)
            await asyncio.gather(*[self.republish(channel, *c) for c in ready])
        done = list(ack) + [r.tag for r in retry] + [t for t, _ in dead]
        by_consumer: dict[int, tuple[Consumer, list[int], list[int]]] = {}
        for tags, requeue in ((done, False), (release, True)):
            for tag in tags:
                held = self.consumers.held.pop(tag, None)
                if (
                    held is None or not held.consumer.alive
                ):  # settled already, or its connection is gone
                    continue
                entry = by_consumer.setdefault(id(held.consumer), (held.consumer, [], []))
                (entry[2] if requeue else entry[1]).append(held.delivery_tag)
        for consumer, acks, releases in by_consumer.values():
            self.settle_on(consumer, acks, releases)

    def settle_on(self, consumer: Consumer, acks: list[int], releases: list[int]) -> None:
        window, channel = consumer.window, consumer.channel
        try:
            if acks:
                window.done(acks)
                last = window.ack_prefix()
                if last:
                    channel.basic_ack(last, multiple=True)
            if releases:
                window.done(releases)
                requeue = set(releases)
                for tag in window.take_stragglers():  # the releases, and what waited past a gap
                    if tag in requeue:
                        channel.basic_nack(tag, multiple=False, requeue=True)
                    else:
                        channel.basic_ack(tag, multiple=False)
                last = window.ack_prefix()  # a release may have closed a gap
                if last:
                    channel.basic_ack(last, multiple=True)
            consumer.flush_stragglers(force=False)
        except CONNECTION_ERRORS as e:
            # the connection went: RabbitMQ requeues what this channel held, settled or not
            logger.warning(
                "settling on %r failed (%s); RabbitMQ redelivers what was not acked",
                consumer.queue,
                type(e).__name__,
            )

    def copy_of(self, tag: int) -> tuple[Held, dict[str, Any]] | None:
        """The held delivery to copy (retry, dead letter) and its headers; None when it is
        settled, its connection is gone, or its copy is confirmed already."""
        held = self.consumers.held.get(tag)
        if held is None or not held.consumer.alive or held.copied:
            return None
        return held, dict(held.message[8] or {})

    def retry_copy(self, r: Retry) -> _Copy | None:
        found = self.copy_of(r.tag)
        if found is None:
            return None
        held, headers = found
        headers[HEADER_RETRIES] = int(headers.get(HEADER_RETRIES, 0) or 0) + 1
        headers[HEADER_REASON] = r.reason[:REASON_CHARS]
        return held, held.consumer.queue, max(r.delay, 0.001), headers

    def dead_copy(self, tag: int, reason: str) -> _Copy | None:
        found = self.copy_of(tag)
        if found is None:
            return None
        held, headers = found
        retries = int(headers.get(HEADER_RETRIES, 0) or 0)
        headers.update(
            {
                HEADER_REASON: reason[:REASON_CHARS],
                HEADER_EXCEPTION: exception_type(reason),
                HEADER_ATTEMPTS: retries + 1,
                HEADER_FAILED_AT: round(time.time(), 3),
            }
        )
        return held, f"{held.consumer.queue}.dlq", 0.0, headers

    async def republish(
        self,
        channel: aiormq.abc.AbstractChannel,
        held: Held,
        target: str,
        delay: float,
        headers: dict[str, Any],
    ) -> None:
        _, _, _, _, message_id, reply_to, correlation_id, content_type, _, body = held.message
        routing_key = target
        if delay > 0:
            routing_key = await self.connection.declare_retry(channel, target, delay)
        properties = Basic.Properties(
            delivery_mode=2,
            message_id=message_id or None,
            content_type=content_type or None,
            headers=headers,
            reply_to=reply_to or None,  # a call's reply still finds its caller after a retry
            correlation_id=correlation_id or None,
        )
        await self.publisher.confirmed(
            channel, held.consumer.queue, body, properties, "", routing_key
        )
        held.copied = True
