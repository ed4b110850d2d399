"""The contract of fastq._hooks (and of its twin, fastq._hooks_py)."""

from collections.abc import Sequence
from typing import Any, TypeAlias

__all__ = ["MAX_BOUNDS", "Processing", "Tally"]

MAX_BOUNDS: int

Counted: TypeAlias = tuple[str, str, int, int, int, int, list[int], float, list[int], float]

class Processing:
    handler: str
    message_id: str
    queue: str
    retries: int
    headers: dict[str, str]
    enqueued_at: float
    started_at: float
    clock: float
    result: object
    outcome: str
    span: Any
    def __init__(
        self,
        handler: str,
        message_id: str,
        queue: str,
        retries: int,
        headers: dict[str, str] | None = None,
        enqueued_at: float = 0.0,
    ) -> None: ...
    @property
    def id(self) -> str: ...
    @property
    def task(self) -> str: ...
    @property
    def attempt(self) -> int: ...

class Tally:
    def __init__(
        self, handler_bounds: Sequence[float], latency_bounds: Sequence[float]
    ) -> None: ...
    def before_process(self, message: Processing) -> None: ...
    def after_process(self, message: Processing, exc: BaseException | None) -> None: ...
    def after_reject(self, message: Processing, reason: str) -> None: ...
    @property
    def pending(self) -> bool: ...
    def take(self) -> list[Counted]: ...
