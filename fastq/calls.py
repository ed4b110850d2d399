"""What a task's caller waits for: ``result`` of a message, and ``call`` (send, then wait).

A mixin of ``fastq.task.Task``: the waiting itself is ``fastq.results``' (a look at the store, a
wake-up from the supervisor through ``fastq._notify``), and on a broker that replies directly
(RabbitMQ's direct reply-to) the broker's own ``call``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from fastq import _notify, results
from fastq.broker.base import Message
from fastq.config import HandlerOptions

if TYPE_CHECKING:
    from fastq.app import App

#: seconds a ``call``'s result is kept when its task keeps none (``result_ttl`` unset)
CALL_KEEP = 60.0


class Calls:
    """``result``, ``result_async``, ``call`` and ``call_async`` of a task."""

    app: App
    name: str
    options: HandlerOptions
    result_decoder: msgspec.msgpack.Decoder[Any]

    # what Task defines, for the methods below
    @property
    def queue(self) -> str:
        raise NotImplementedError("defined by fastq.task.Task")

    def message(self, *args: Any, _headers: dict[str, str] | None = None, **kwargs: Any) -> Message:
        raise NotImplementedError("defined by fastq.task.Task")

    def _notify_headers(self, keep: float | None = None) -> dict[str, str]:
        """The headers of a message whose result this process may wait for: its supervisor
        pokes this process's wake-up address once the result is stored."""
        headers = {results.NOTIFY: _notify.listener().address}
        if keep is not None:
            headers[results.KEEP] = repr(keep)
        return headers

    def result(self, message_id: str, timeout: float | None = None) -> Any:
        """The return value of message ``message_id`` (decoded as the return annotation says),
        waiting up to ``timeout`` seconds (None: as long as it takes) for it. Needs
        ``result_ttl`` on the task (or a message sent by ``call``).

        Raises:
            TaskFailed: the task failed for good (the remote type, message and traceback).
            TimeoutError: no result within ``timeout``.
            ResultExpired: it was kept and ``result_ttl`` passed.
            ConfigError: the broker keeps no results and the App has no ``result_store``.
        """
        return results.wait(
            self.app.result_store,
            message_id,
            self.result_decoder,
            self.name,
            timeout,
            announced=False,
        )

    async def result_async(self, message_id: str, timeout: float | None = None) -> Any:
        """``result`` for coroutines: the loop runs while it waits."""
        return await results.wait_async(
            self.app.result_store,
            message_id,
            self.result_decoder,
            self.name,
            timeout,
            announced=False,
        )

    def call(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Send one call and wait for its return value: ``send`` then ``result`` (RabbitMQ's RPC
        tutorial, for any broker that keeps results). The result is kept ``result_ttl``, else
        ``CALL_KEEP`` seconds (or the timeout, if longer)."""
        broker = self.app.broker
        if broker.replies_directly:  # RabbitMQ: direct reply-to, no store
            m = self.message(*args, _headers=self._keep_headers(timeout), **kwargs)
            outcome = self._replied(lambda: broker.call_sync(self.queue, m, timeout), m, timeout)
            return self._read(outcome, m)
        store = self.app.result_store  # before sending: a ConfigError sends nothing
        m = self.message(*args, _headers=self._notify_headers(self._call_keep(timeout)), **kwargs)
        broker.publish_sync(self.queue, [m])
        return results.wait(
            store, m.message_id, self.result_decoder, self.name, timeout, announced=True
        )

    async def call_async(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """``call`` for coroutines."""
        broker = self.app.broker
        if broker.replies_directly:
            m = self.message(*args, _headers=self._keep_headers(timeout), **kwargs)
            try:
                outcome = await broker.call_async(self.queue, m, timeout)
            except TimeoutError:
                raise self._no_reply(m, timeout) from None
            return self._read(outcome, m)
        store = self.app.result_store
        m = self.message(*args, _headers=self._notify_headers(self._call_keep(timeout)), **kwargs)
        await asyncio.get_running_loop().run_in_executor(
            None, self.app.broker.publish_sync, self.queue, [m]
        )
        return await results.wait_async(
            store, m.message_id, self.result_decoder, self.name, timeout, announced=True
        )

    def _read(self, outcome: bytes, m: Message) -> Any:
        return results.read(outcome, self.result_decoder, message_id=m.message_id, task=self.name)

    def _keep_headers(self, timeout: float | None) -> dict[str, str]:
        return {results.KEEP: repr(self._call_keep(timeout))}

    def _replied(self, wait: Callable[[], bytes], m: Message, timeout: float | None) -> bytes:
        try:
            return wait()
        except TimeoutError:
            raise self._no_reply(m, timeout) from None

    def _no_reply(self, m: Message, timeout: float | None) -> TimeoutError:
        return TimeoutError(
            f"no reply to the call of {self.name} (message {m.message_id}) within {timeout:g} s: "
            "it is still queued or running; wait longer, or check that a worker consumes "
            f"{self.queue!r}"
        )

    def _call_keep(self, timeout: float | None) -> float:
        return self.options.result_ttl or max(CALL_KEEP, timeout or 0.0)
