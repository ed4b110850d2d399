"""The operating-system side of a ring, shared by fastq._core and its twin: the shared-memory
segment's life cycle and the wake-up sockets. Slow paths only (create, attach, close, a
sleeping peer); the hot path never comes here.

A generated ring name says who made it: ``fq-<pid>-<start>-<random>``, the creator's pid and its
start time (in clock ticks since boot, from /proc), so that ``sweep`` can tell the segments of
a process that is gone (a tree killed whole: the resource tracker with it) from those of a live
one, even when the pid was reused since.
"""

from __future__ import annotations

import _posixshmem
import errno
import mmap
import os
import re
import secrets
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


SHM = "/dev/shm"
#: a name new_name made: creator pid, its start time (hex), random
_OWNED = re.compile(r"fq-(\d+)-([0-9a-f]+)-[0-9a-f]+")
_owner: tuple[int, str] | None = None


def start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, hex), None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) ": state is field 3
    return f"{int(fields[19]):x}"  # field 22


def new_name() -> str:
    """A fresh ring name that says which process made it (see the module docstring)."""
    global _owner
    pid = os.getpid()
    if _owner is None or _owner[0] != pid:  # first use here, or a forked child
        _owner = (pid, start_time(pid) or "0")
    return f"fq-{pid}-{_owner[1]}-{secrets.token_hex(6)}"


def sweep(directory: str = SHM) -> list[str]:
    """Unlink the ring segments whose creator is gone (what a tree SIGKILLed whole leaves),
    never one of a live process; returns their names."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _OWNED.fullmatch(name)
        if m is None or start_time(int(m[1])) == m[2]:
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:  # another sweeper was first, or it is not ours to remove
            continue
        removed.append(name)
    return removed
