"""The FastqError tree. Each class mixes in the standard-library exception users already catch."""

from __future__ import annotations

import queue


class FastqError(Exception):
    """Base class for all fastq errors."""


class ConfigError(FastqError, ValueError):
    """Raised when a setting is invalid: a Config field, a broker URL, a ring's size or name."""


class MessageError(FastqError, ValueError):
    """A body that is not a fastq envelope; the reason says what was expected and what was seen."""


class LoadError(FastqError, ImportError):
    """A ``module:attribute`` spec that names no importable object; the message says what to
    change."""


class FrameTooLarge(FastqError, ValueError):
    """Raised by ``put_many`` before anything is written when a frame can never fit in the ring."""


class FrameError(FastqError, ValueError):
    """Bytes off an AMQP connection that are not a frame where one was due: the stream is out of
    step, and the connection is closed (what it carried is redelivered)."""


class RingFull(FastqError, queue.Full):
    """Raised by ``*_nowait`` puts, or on timeout, when the ring has no room.

    ``written`` is how many frames of the call, counted from the first, were written before the
    ring filled up: those are committed and the caller resends only ``frames[written:]``.
    """

    def __init__(self, message: str = "", written: int = 0) -> None:
        super().__init__(message)
        self.written = written


class RingEmpty(FastqError, queue.Empty):
    """Raised by ``*_nowait`` gets, or on timeout, when the ring holds no frame."""


class RingClosed(FastqError):
    """Raised when using a ring that was closed, by this handle or by the process at the other
    end."""


class RingNotFound(FastqError, FileNotFoundError):
    """Raised by ``Ring.attach`` when no ring has that name."""


class RingBusy(FastqError):
    """Raised when a second producer (or consumer) tries to use a single-producer
    single-consumer ring."""


class RingCorrupt(FastqError):
    """Raised when shared memory does not hold a ring of this fastq version, or was overwritten."""


class PeerLost(RingClosed):
    """The process at the other end of a ring died while this side waited on it."""


class BrokerConnectionError(FastqError, ConnectionError):
    """The broker cannot be reached or opened, or went away; the message says what was tried
    (the password masked) and what to check; ``__cause__`` holds the client's exception."""


class BrokerStorageError(FastqError, OSError):
    """The broker's storage refused a write (a full disk, a read-only file system, an I/O
    error): what was being written was not stored; the message says which and what to do."""


class WorkerLost(FastqError):
    """A worker process died while running this call (``fastq.Pool``): the call ran alone on a
    worker that died, after the batches holding it had each lost a worker too."""


class RemoteError(FastqError):
    """A ``fastq.Pool`` call raised an exception that could not be pickled back: its type name
    and message are the text, the remote traceback is ``__cause__``."""


class PoolClosed(FastqError, ValueError):
    """The ``fastq.Pool`` was closed or terminated: it takes no more calls."""


class PoolBroken(PoolClosed):
    """The ``fastq.Pool``'s workers cannot start, or its driver failed: every call fails with it."""


class TaskFailed(FastqError):
    """The task of a result failed for good (its retries spent, or dead at once): ``error_type``,
    ``error_message`` and ``traceback`` are the worker's, as text; ``reason`` is the dead
    letter's."""

    def __init__(
        self,
        message_id: str,
        task: str,
        error_type: str,
        error_message: str,
        traceback: str,
        reason: str,
    ) -> None:
        super().__init__(
            f"task {task} (message {message_id}) failed for good: {reason}"
            + (f"\n\nremote traceback:\n{traceback}" if traceback else "")
        )
        self.message_id, self.task = message_id, task
        self.error_type, self.error_message, self.traceback = error_type, error_message, traceback
        self.reason = reason


class ResultExpired(FastqError, LookupError):
    """A result was kept and its ``result_ttl`` passed: it is gone."""


class WorkflowFailed(FastqError):
    """A workflow run ended failed: ``failed`` maps each failed step to why (its error, after
    how many attempts); ``skipped`` names the steps that did not run because of it."""

    def __init__(
        self, workflow: str, run_id: str, failed: dict[str, str], skipped: list[str]
    ) -> None:
        why = "; ".join(f"{name}: {error}" for name, error in failed.items())
        super().__init__(
            f"workflow {workflow} run {run_id} failed at {', '.join(failed)} ({why})"
            + (f"; skipped {', '.join(skipped)}" if skipped else "")
            + f"; fix the cause and resume it: wf.resume({run_id!r})"
        )
        self.workflow, self.run_id, self.failed, self.skipped = workflow, run_id, failed, skipped
