"""Which cores the fastq supervisors and pools of one host pinned their workers to, so that two
of them with fewer processes than cores do not pile onto the same ones.

Each holds a claim: a file ``<pid>-<start time>.json`` listing its cores, in a directory of the
host's runtime dir (``$XDG_RUNTIME_DIR/fastq-cores``, else ``/tmp/fastq-cores-<uid>``). A new one
takes, under an exclusive ``flock``, the cores with the fewest live claims (the lowest first on a
tie), writes its claim, and removes it when it stops; a claim whose owner is gone (pid and start
time, as for rings) is ignored and removed. One that needs every core takes every core: the
claims only decide among the cores when there is a choice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence

from fastq._segment import start_time

logger = logging.getLogger(__name__)


def default_directory() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "fastq-cores")
    return os.path.join(tempfile.gettempdir(), f"fastq-cores-{os.getuid()}")


class CoreClaim:
    """This process's claim on some cores of the host (see the module docstring)."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory or default_directory()
        pid = os.getpid()
        self.path = os.path.join(self.directory, f"{pid}-{start_time(pid) or '0'}.json")
        self.cpus: tuple[int, ...] = ()

    def take(self, wanted: int, cpus: Sequence[int]) -> tuple[int, ...]:
        """``wanted`` of ``cpus`` (all of them, cycled, when it wants as many or more), the
        least claimed by the other live fastq processes of this host first; claimed until
        ``release``. A runtime dir that cannot be used leaves the choice to the order of
        ``cpus`` (logged)."""
        if wanted >= len(cpus):
            self.cpus = tuple(cpus[i % len(cpus)] for i in range(wanted))
            return self.cpus
        try:
            with self._locked():
                held = self._held_by_others()
                rank = {cpu: (held[cpu], n) for n, cpu in enumerate(cpus)}
                chosen = tuple(sorted(sorted(cpus, key=rank.__getitem__)[:wanted]))
                self._write(chosen)
        except OSError as e:
            logger.warning(
                "cores: no claim in %s (%s); pinning to the first %d cores",
                self.directory,
                e,
                wanted,
            )
            chosen = tuple(cpus[:wanted])
        else:
            others = {c: held[c] for c in cpus if held[c]}
            if others:
                logger.info(
                    "cores: pinning to %s; other fastq processes on this host hold "
                    "{core: claims} %s",
                    list(chosen),
                    others,
                )
        self.cpus = chosen
        return chosen

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        with open(os.path.join(self.directory, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _held_by_others(self) -> Counter[int]:
        held = Counter[int]()
        for name in os.listdir(self.directory):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.directory, name)
            pid, _, start = name.removesuffix(".json").partition("-")
            if not pid.isdigit() or start_time(int(pid)) != start:  # its owner is gone
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            if path == self.path:
                continue
            try:
                with open(path) as f:
                    held.update(int(c) for c in json.load(f))
            except (OSError, ValueError, TypeError):  # half written by a crash: not a claim
                continue
        return held

    def _write(self, cpus: tuple[int, ...]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(list(cpus), f)
        os.replace(tmp, self.path)
