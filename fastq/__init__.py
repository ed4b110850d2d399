"""fastq: message and background-task processing on pinned uvloop workers fed by shared-memory
rings."""

from fastq.app import App
from fastq.config import Config, Route
from fastq.errors import (
    BrokerConnectionError,
    BrokerStorageError,
    ConfigError,
    FastqError,
    FrameError,
    FrameTooLarge,
    LoadError,
    MessageError,
    PeerLost,
    PoolBroken,
    PoolClosed,
    RemoteError,
    ResultExpired,
    RingBusy,
    RingClosed,
    RingCorrupt,
    RingEmpty,
    RingFull,
    RingNotFound,
    TaskFailed,
    WorkerLost,
    WorkflowFailed,
)
from fastq.middleware import Middleware, TimingMiddleware
from fastq.pool import Pool
from fastq.task import Consumer, Task
from fastq.workflow.context import RunContext

__version__ = "0.1.0.dev0"

__all__ = [
    "App",
    "BrokerConnectionError",
    "BrokerStorageError",
    "Config",
    "ConfigError",
    "Consumer",
    "FastqError",
    "FrameError",
    "FrameTooLarge",
    "LoadError",
    "MessageError",
    "Middleware",
    "PeerLost",
    "Pool",
    "PoolBroken",
    "PoolClosed",
    "RemoteError",
    "ResultExpired",
    "RingBusy",
    "RingClosed",
    "RingCorrupt",
    "RingEmpty",
    "RingFull",
    "RingNotFound",
    "Route",
    "RunContext",
    "Task",
    "TaskFailed",
    "TimingMiddleware",
    "WorkerLost",
    "WorkflowFailed",
    "__version__",
]
