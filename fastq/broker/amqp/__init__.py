"""RabbitMQ (``amqp://``, ``amqps://``) on aiormq: ``broker.AMQPBroker`` is the facade."""

from fastq.broker.amqp.broker import AMQPBroker

__all__ = ["AMQPBroker"]
