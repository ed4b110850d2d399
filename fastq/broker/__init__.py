"""Brokers by URL: ``sqlite:///path`` (the embedded default), ``memory://``, ``postgresql://``,
``amqp://`` (RabbitMQ).

Each backend is imported only when its URL is opened, so ``import fastq`` loads none of them.
"""

from __future__ import annotations

from fastq.broker.base import Broker, QueueDepth, QueueOptions, mask_url
from fastq.errors import ConfigError

__all__ = ["Broker", "QueueDepth", "QueueOptions", "mask_url", "open_broker"]

_memory: dict[str, Broker] = {}


def open_broker(url: str) -> Broker:
    """The broker for ``url`` (not yet opened: ``await broker.open()``).

    Raises:
        ConfigError: the scheme is unknown or the URL is malformed (the password is masked).
    """
    scheme = url.partition("://")[0].lower()
    if scheme == "sqlite":
        from fastq.broker.sqlite import SqliteBroker

        return SqliteBroker(url)
    if scheme == "memory":
        from fastq.broker.memory import MemoryBroker

        if url not in _memory:  # one per name and process, so producer and supervisor share it
            _memory[url] = MemoryBroker(url)
        return _memory[url]
    if scheme in ("postgresql", "postgres"):
        from fastq.broker.postgres import PostgresBroker

        return PostgresBroker(url)
    if scheme in ("amqp", "amqps"):
        from fastq.broker.amqp import AMQPBroker

        return AMQPBroker(url)
    raise ConfigError(
        f"unknown broker URL {mask_url(url)!r}; expected sqlite:///path, memory://, "
        "postgresql://user:pass@host:port/db or amqp://user:pass@host:port/vhost"
    )
