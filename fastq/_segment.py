"""The operating-system side of a ring, shared by fastq._core and its twin: the shared-memory
segment's life cycle and the wake-up sockets. Slow paths only (create, attach, close, a
sleeping peer); the hot path never comes here.
"""

from __future__ import annotations

import _posixshmem
import errno
import mmap
import os
import socket
from multiprocessing import resource_tracker, util

from fastq._layout import HEADER_BYTES, MIN_SIZE_BYTES, too_small, wakeup_address
from fastq.errors import ConfigError, RingBusy, RingNotFound


def register_creator(name: str) -> util.Finalize:
    """Make sure the segment of a ring this process created is unlinked when the process ends.

    Normal exit and an exception in a multiprocessing child run the finalizer; SIGKILL leaves it
    to the resource tracker, which unlinks the segment when the last process sharing it is gone.
    """
    resource_tracker.register("/" + name, "shared_memory")
    return util.Finalize(None, unlink_segment, args=(name, True), exitpriority=0)


def unlink_segment(name: str, creator: bool) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        return
    if creator:
        resource_tracker.unregister("/" + name, "shared_memory")


def open_segment(name: str, size: int | None) -> mmap.mmap:
    """Create (``size`` given) or open (``size=None``) the shared-memory segment of ring
    ``name``."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if size is not None else 0)
    try:
        fd = _posixshmem.shm_open("/" + name, flags, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"a ring named {name!r} already exists; attach to it or pick another name"
        ) from None
    except FileNotFoundError:
        raise RingNotFound(f"no ring named {name!r}; create it first or check the name") from None
    try:
        if size is not None:
            os.ftruncate(fd, size)
        else:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES + MIN_SIZE_BYTES:
                raise too_small(name, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def bind_wakeup(name: str, role: str, holder_pid: int) -> socket.socket:
    """Take the ``role`` end of ring ``name``: bind its wake-up address, or raise RingBusy."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    try:
        sock.bind(wakeup_address(name, role))
    except OSError as e:
        sock.close()
        if e.errno != errno.EADDRINUSE:
            raise
        raise RingBusy(
            f"ring {name!r} already has a {role} (pid {holder_pid}); a ring carries frames "
            "from one producer to one consumer: give each pair its own ring"
        ) from None
    return sock


def send_wakeup(address: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"\1", socket.MSG_DONTWAIT, address)
        except OSError:
            pass  # its buffer is full of wake-ups already, or it is gone: both fine


def probe(address: bytes) -> bool:
    """True when some process has ``address`` bound; sends nothing."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(address)
        except OSError:
            return False
    return True
