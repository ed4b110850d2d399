"""Frozen settings; the only reader of FASTQ_* environment variables.

Every duration is float seconds and every size ends in ``_bytes``. Settings of one broker go in
its URL's query (``sqlite:///fastq.db?lease=60``), parsed by that broker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import msgspec

from fastq.errors import ConfigError

#: The embedded default: a SQLite file in the working directory.
DEFAULT_BROKER_URL = "sqlite:///fastq.db"


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
    ring_size_bytes: int = 2 << 20
    batch_max: int = 256
    max_message_bytes: int = 1 << 20
    shutdown_timeout: float = 30.0
    max_tasks_per_child: int | None = None
    max_memory_per_child_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("processes", "concurrency", "prefetch", "max_tasks_per_child"):
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
        if not self.shutdown_timeout >= 0:
            raise ConfigError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout!r}")
        if "://" not in self.broker_url:
            raise ConfigError(
                f"broker_url must look like sqlite:///path, memory:// or amqp://host, got "
                f"{self.broker_url!r}"
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
                raise ConfigError(f"FASTQ_{field.upper()}={raw!r} is not valid: {e}") from e
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
                    f"FASTQ_{field.upper()}={environ['FASTQ_' + field.upper()]!r} is not valid: "
                    f"{str(e).partition(' - at ')[0]}"
                ) from None
            raise ConfigError(str(e)) from None


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
