# The contract of fastq._amqp (and of its twin fastq._amqp_py); tests/typing/test_stubs.py keeps
# the three in step.
from typing import Any, TypeAlias

from typing_extensions import Buffer

__all__ = ["FRAME_HEARTBEAT", "FRAME_METHOD", "FrameReader", "decode_table"]

FRAME_METHOD: int
FRAME_HEARTBEAT: int

#: (channel, delivery_tag, redelivered, consumer_tag, message_id, reply_to, correlation_id,
#: content_type, headers, body); a returned message (basic.return) has delivery_tag 0 and its
#: reply code and text in place of the consumer tag
Delivered: TypeAlias = tuple[int, int, bool, str, str, str, str, str, dict[str, Any] | None, bytes]

class FrameReader:
    frame_max: int
    delivered: int
    def __init__(self, frame_max: int = 131072) -> None: ...
    @property
    def buffered(self) -> int: ...
    def feed(self, data: Buffer) -> tuple[list[Delivered], list[tuple[int, int, bytes]]]: ...

def decode_table(data: Buffer) -> dict[str, Any]: ...
