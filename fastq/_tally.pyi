"""The contract of fastq._tally (and of its twin, fastq._tally_py)."""

from collections.abc import Sequence
from typing import Any, TypeAlias

__all__ = ["MAX_BOUNDS", "Tally"]

MAX_BOUNDS: int

Counted: TypeAlias = tuple[str, str, int, int, int, int, list[int], float, list[int], float]

class Tally:
    def __init__(
        self, handler_bounds: Sequence[float], latency_bounds: Sequence[float]
    ) -> None: ...
    def before_process(self, message: Any) -> None: ...
    def after_process(self, message: Any, exc: BaseException | None) -> None: ...
    def after_reject(self, message: Any, reason: str) -> None: ...
    @property
    def pending(self) -> bool: ...
    def take(self) -> list[Counted]: ...
