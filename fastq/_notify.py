"""Wake-ups for result waiters: one Unix datagram socket per waiting process, poked by the
supervisor that stored a result.

A process that waits for results (``task.call``, ``task.result`` of a message it sent) binds one
socket in Linux's abstract namespace (no file to clean up; gone with the process) and names it in
the messages it sends (``fastq.results.NOTIFY``). The supervisor, once results are committed,
sends that socket one datagram per batch: a zero byte, then msgpack pairs of message id and
outcome (the stored bytes themselves when they are at most ``INLINE_BYTES``, else nil: the
waiter reads the store). A thread of the waiting process reads them and wakes the waiters of
those ids, sync or async, handing them the outcome, so that a ``call`` needs no read of the store
after its wake-up. A datagram that cannot go (the waiter left, its buffer is full) is dropped:
the waiter's store look every ``FALLBACK`` seconds covers it. (Datagrams of ids one per line,
without the zero byte, are what fastq sent before: they still wake.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Iterable

import msgspec

logger = logging.getLogger(__name__)

#: seconds between a waiter's looks at the store while no wake-up came (a lost datagram)
FALLBACK = 0.5
#: the most a wake-up datagram carries (ids of one batch for one waiting process)
DATAGRAM_BYTES = 8192
#: the largest outcome a wake-up carries (a larger one is read from the store)
INLINE_BYTES = 2048
_PREFIX = "fastq-wait-"
_V2 = b"\x00"
_pairs = msgspec.msgpack.Decoder(list[tuple[str, bytes | None]])
_encoder = msgspec.msgpack.Encoder()


class _Waiter:
    __slots__ = ("event", "future", "loop", "outcome")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.event = threading.Event() if loop is None else None
        self.future: asyncio.Future[None] | None = None if loop is None else loop.create_future()
        #: the stored outcome, when the wake-up carried it
        self.outcome: bytes | None = None

    def wake(self, outcome: bytes | None = None) -> None:
        if outcome is not None:
            self.outcome = outcome  # before the wake: the waiter reads it once woken
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
            for message_id, outcome in _parse(data):
                with self.lock:
                    waiters = list(self.waiting.get(message_id, ()))
                for w in waiters:
                    w.wake(outcome)


def _parse(data: bytes) -> list[tuple[str, bytes | None]]:
    """A wake-up's (message id, outcome or None) pairs; nothing for bytes that do not parse."""
    if data[:1] != _V2:  # ids one per line (what fastq sent before)
        return [(i, None) for i in data.decode("ascii", "replace").split("\n")]
    try:
        return _pairs.decode(data[1:])
    except msgspec.DecodeError:
        logger.warning("a result wake-up that does not parse (%d bytes); ignored", len(data))
        return []


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

    def poke(self, pokes: Iterable[tuple[str, str, bytes]]) -> None:
        """Tell each waiting process that the outcomes of ``(address, message_id, outcome)``
        are stored, with the outcome itself when it is small: datagrams of at most
        DATAGRAM_BYTES per address; ones that cannot go are dropped."""
        by_address: dict[str, list[tuple[str, bytes | None]]] = {}
        for address, message_id, outcome in pokes:
            if address.startswith(_PREFIX):  # never write to another program's socket
                inline = outcome if len(outcome) <= INLINE_BYTES else None
                by_address.setdefault(address, []).append((message_id, inline))
        for address, pairs in by_address.items():
            batch: list[tuple[str, bytes | None]] = []
            size = 1
            for pair in pairs:
                more = len(pair[0]) + len(pair[1] or b"") + 16
                if batch and size + more > DATAGRAM_BYTES:
                    self._send(address, batch)
                    batch, size = [], 1
                batch.append(pair)
                size += more
            self._send(address, batch)

    def _send(self, address: str, pairs: list[tuple[str, bytes | None]]) -> None:
        try:
            self.sock.sendto(_V2 + _encoder.encode(pairs), "\0" + address)
        except OSError:  # gone (ECONNREFUSED), full (EAGAIN): its fallback look covers it
            pass

    def close(self) -> None:
        self.sock.close()
