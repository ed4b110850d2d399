"""Wake-ups across processes for the SQLite broker: a send wakes the supervisors of the same file.

Without them a supervisor learns of a message another process sent at its next look, and an idle
one looks less often each time (1 ms doubling up to ``poll``, 50 ms by default): a lone ``call``
or a send into a quiet app waited for that. A consuming broker binds one of ``SLOTS`` datagram
sockets in Linux's abstract namespace, named by the database file's resolved path (no file to
clean up; gone with the process). A producer, once its transaction committed, sends a one-byte
datagram to the slots (``Bell.ring``): a name nobody bound refuses at once (and is skipped for
``PROBE_EVERY`` seconds), a full buffer means a wake-up is pending already. Nothing depends on a
datagram arriving: the looks stay, for a lost datagram, for a process in another network
namespace (a container sharing the file) and for systems without abstract sockets.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

__all__ = ["SLOTS", "Bell", "Door", "names"]

#: consuming brokers of one file on one host that can be woken (more still poll)
SLOTS = 8
#: seconds a slot that refused a wake-up (nobody bound it) is skipped
PROBE_EVERY = 0.1
#: abstract socket names are Linux's
ENABLED = sys.platform.startswith("linux")


def names(path: str) -> list[str]:
    """The slots' abstract names for the database file at ``path``."""
    digest = hashlib.blake2b(os.path.realpath(path).encode(), digest_size=8).hexdigest()
    return [f"\0fastq-sqlite-{digest}-{k}" for k in range(SLOTS)]


_sender: socket.socket | None = None
_sender_lock = threading.Lock()


def _socket() -> socket.socket:
    """The process's one sending socket (unbound, non-blocking; any thread may send on it)."""
    global _sender
    with _sender_lock:
        if _sender is None:
            _sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            _sender.setblocking(False)
            atexit.register(_sender.close)
        return _sender


class Bell:
    """A producer's side: rings every bound slot after a commit (any thread)."""

    def __init__(self, path: str) -> None:
        self.names = names(path) if ENABLED else []
        self.skip_until = [0.0] * len(self.names)
        #: the slot this process's own Door holds (-1: none): never rung, the process knows
        self.own = -1

    def ring(self) -> None:
        if not self.names:
            return
        sock = _sender or _socket()
        now = time.monotonic()
        for k, name in enumerate(self.names):
            if self.skip_until[k] > now or k == self.own:
                continue
            try:
                sock.sendto(b"!", name)
            except (ConnectionRefusedError, FileNotFoundError):
                self.skip_until[k] = now + PROBE_EVERY  # nobody there: look again later
            except OSError:  # a full buffer (a wake-up is pending) or anything else: the poll
                pass


class Door:
    """A consuming broker's side: the first free slot, read on the loop; ``on_ring`` is called
    once per readable burst. ``rung`` counts the bursts (statistics, tests)."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop, on_ring: Callable[[], None]):
        self.loop, self.on_ring = loop, on_ring
        self.rung = 0
        self.sock: socket.socket | None = None
        self.slot = -1
        for k, name in enumerate(names(path) if ENABLED else []):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.bind(name)
            except OSError:  # taken by another consumer of this file
                sock.close()
                continue
            sock.setblocking(False)
            self.sock, self.slot = sock, k
            loop.add_reader(sock.fileno(), self._read)
            break
        else:
            logger.debug("sqlite wake-ups: no free slot of %d; this broker polls only", SLOTS)

    def _read(self) -> None:
        assert self.sock is not None
        try:
            while self.sock.recv(64):
                pass
        except BlockingIOError:
            pass
        self.rung += 1
        self.on_ring()

    def close(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
