"""Wake-ups for result waiters: one Unix datagram socket per waiting process, poked by the
supervisor that stored a result.

A process that waits for results (``task.call``, ``task.result`` of a message it sent) binds one
socket in Linux's abstract namespace (no file to clean up; gone with the process) and names it in
the messages it sends (``fastq.results.NOTIFY``). The supervisor, once results are committed,
sends that socket one datagram per batch: their message ids, one per line. A thread of the
waiting process reads them and wakes the waiters of those ids, sync or async. A datagram that
cannot go (the waiter left, its buffer is full) is dropped: the waiter's store look every
``FALLBACK`` seconds covers it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Iterable

logger = logging.getLogger(__name__)

#: seconds between a waiter's looks at the store while no wake-up came (a lost datagram)
FALLBACK = 0.5
#: the most a wake-up datagram carries (ids of one batch for one waiting process)
DATAGRAM_BYTES = 8192
_PREFIX = "fastq-wait-"


class _Waiter:
    __slots__ = ("event", "future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.event = threading.Event() if loop is None else None
        self.future: asyncio.Future[None] | None = None if loop is None else loop.create_future()

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()
        elif self.loop is not None and self.future is not None:
            try:
                self.loop.call_soon_threadsafe(_resolve, self.future)
            except RuntimeError:  # its loop is closed: nobody waits any more
                pass


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Listener:
    """This process's wake-up socket and the ids waited for (``listener()`` makes it)."""

    def __init__(self) -> None:
        self.address = f"{_PREFIX}{os.getpid()}-{os.urandom(6).hex()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.lock = threading.Lock()
        self.waiting: dict[str, list[_Waiter]] = {}
        self.thread = threading.Thread(target=self._read, name="fastq-result-wakeups", daemon=True)
        self.thread.start()

    def expect(self, message_id: str, loop: asyncio.AbstractEventLoop | None = None) -> _Waiter:
        """Register a waiter of ``message_id`` (before looking at the store: a result stored
        between the look and the wait still wakes it); ``done`` unregisters it."""
        w = _Waiter(loop)
        with self.lock:
            self.waiting.setdefault(message_id, []).append(w)
        return w

    def done(self, message_id: str, waiter: _Waiter) -> None:
        with self.lock:
            waiters = self.waiting.get(message_id)
            if waiters is not None:
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters:
                    del self.waiting[message_id]

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(DATAGRAM_BYTES)
            except OSError:  # closed
                return
            for message_id in data.decode("ascii", "replace").split("\n"):
                with self.lock:
                    waiters = list(self.waiting.get(message_id, ()))
                for w in waiters:
                    w.wake()


_listener: Listener | None = None
_listener_lock = threading.Lock()


def listener() -> Listener:
    """This process's listener, made on first use (again in a forked child)."""
    global _listener
    with _listener_lock:
        if _listener is None:
            _listener = Listener()
        return _listener


def current() -> Listener | None:
    """This process's listener if it made one (it sent messages that name it)."""
    return _listener


def _forget_after_fork() -> None:
    global _listener, _listener_lock
    _listener, _listener_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


class Poker:
    """The supervisor's side: one unbound datagram socket that pokes waiters."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def poke(self, pokes: Iterable[tuple[str, str]]) -> None:
        """Tell each waiting process the ids of ``(address, message_id)`` that are stored: one
        datagram per address (per DATAGRAM_BYTES of ids); ones that cannot go are dropped."""
        by_address: dict[str, list[str]] = {}
        for address, message_id in pokes:
            if address.startswith(_PREFIX):  # never write to another program's socket
                by_address.setdefault(address, []).append(message_id)
        for address, ids in by_address.items():
            per = max(1, DATAGRAM_BYTES // (max(map(len, ids)) + 1))
            for i in range(0, len(ids), per):
                data = "\n".join(ids[i : i + per]).encode("ascii", "replace")
                try:
                    self.sock.sendto(data, "\0" + address)
                except OSError:  # gone (ECONNREFUSED), full (EAGAIN): its fallback look covers it
                    pass

    def close(self) -> None:
        self.sock.close()
