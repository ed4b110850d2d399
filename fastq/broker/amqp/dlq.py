"""RabbitMQ's dead letters and purges, for ``fastq dlq`` and ``fastq purge``.

A queue's dead letters are the messages of ``<queue>.dlq`` (``settle``), their reason and counts
in ``x-fastq-*`` headers. RabbitMQ numbers nothing, so a dead letter is named by its message id;
``DeadLetter.id`` is its place in the dlq when it was read (1: the oldest). Reading takes the
messages with ``basic.get`` on a channel of its own and closes that channel without acking what
it leaves: RabbitMQ puts those back where they were. A requeue publishes each chosen message to
its queue (confirmed), fresh counts, then acks its dead copy: a crash between the two leaves a
duplicate, never a loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import aiormq
import aiormq.abc
from pamqp.commands import Basic

from fastq.broker.amqp.connection import Connection
from fastq.broker.amqp.consumer import HEADER_RETRIES
from fastq.broker.amqp.publish import Publisher
from fastq.broker.amqp.settle import HEADER_ATTEMPTS, HEADER_FAILED_AT, HEADER_REASON
from fastq.broker.base import DeadLetter, Message
from fastq.errors import ConfigError

#: dead letters read at most by one requeue or show (the rest stay where they are)
SCAN_LIMIT = 100_000


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _number(headers: dict[str, Any], name: str) -> float:
    try:
        return float(headers.get(name, 0) or 0)
    except (TypeError, ValueError):
        return 0.0


def _dead_letter(queue: str, place: int, m: aiormq.abc.DeliveredMessage) -> DeadLetter:
    properties = m.header.properties
    headers = dict(properties.headers or {})
    return DeadLetter(
        id=place,
        queue=queue,
        message_id=properties.message_id or "",
        body=bytes(m.body),
        attempts=int(_number(headers, HEADER_ATTEMPTS)),
        retries=int(_number(headers, HEADER_RETRIES)),
        reason=_text(headers.get(HEADER_REASON, "")),
        failed_at=_number(headers, HEADER_FAILED_AT),
        headers={k: _text(v) for k, v in headers.items()} or None,
    )


class DeadLetters:
    """Reads, requeues and purges on the broker's connection."""

    def __init__(self, connection: Connection, publisher: Publisher) -> None:
        self.connection, self.publisher = connection, publisher

    async def _channel(self) -> aiormq.abc.AbstractChannel:
        await self.connection.ready()
        return await self.connection.channel()

    def _unknown(self, queue: str, e: Exception) -> ConfigError:
        return ConfigError(
            f"RabbitMQ at {self.connection.url} has no queue {queue!r} "
            f"({self.connection.options.scrub(str(e))}); check the name (fastq stats lists them)"
        )

    async def _walk(
        self,
        queue: str,
        limit: int,
        pick: Callable[[DeadLetter], bool],
        requeue_to: str | None,
    ) -> tuple[list[DeadLetter], int]:
        dlq = f"{queue}.dlq"
        channel = await self._channel()
        found: list[DeadLetter] = []
        moved = 0
        try:
            try:
                await channel.queue_declare(dlq, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity as e:
                raise self._unknown(queue, e) from e
            place = 0
            while place < limit:
                m = await channel.basic_get(dlq, no_ack=False)
                if not isinstance(m.delivery, Basic.GetOk):
                    break  # empty
                place += 1
                dead = _dead_letter(queue, place, m)
                if not pick(dead):
                    continue
                found.append(dead)
                if requeue_to is not None:
                    fresh = {
                        k: v
                        for k, v in (dead.headers or {}).items()
                        if not k.startswith("x-fastq-")
                    }
                    await self.publisher.publish(
                        requeue_to, [Message(dead.body, dead.message_id, fresh or None)]
                    )
                    await channel.basic_ack(m.delivery.delivery_tag or 0)
                    moved += 1
        finally:
            if not channel.is_closed:
                await channel.close()  # what was read and not acked goes back in its place
        return found, moved

    async def list(self, queue: str, limit: int) -> list[DeadLetter]:
        found, _ = await self._walk(queue, limit, lambda d: True, None)
        return found

    async def find(self, message_id: str, queues: Sequence[str]) -> DeadLetter | None:
        for queue in queues:
            try:
                found, _ = await self._walk(
                    queue, SCAN_LIMIT, lambda d: d.message_id == message_id, None
                )
            except ConfigError:  # never declared: it holds no dead letters
                continue
            if found:
                return found[0]
        return None

    async def requeue(self, queue: str, message_ids: Sequence[str] | None) -> int:
        wanted = None if message_ids is None else set(message_ids)
        _, moved = await self._walk(
            queue, SCAN_LIMIT, lambda d: wanted is None or d.message_id in wanted, queue
        )
        return moved

    async def purge(self, queue: str) -> int:
        channel = await self._channel()
        try:
            ok = await channel.queue_purge(queue)
        except aiormq.exceptions.ChannelNotFoundEntity as e:
            raise self._unknown(queue.removesuffix(".dlq"), e) from e
        finally:
            if not channel.is_closed:
                await channel.close()
        return int(ok.message_count or 0) if ok is not None else 0
