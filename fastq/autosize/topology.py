"""What this process may use of the machine, read once at start, and read again while it runs.

``Topology.detect()`` reads the affinity mask, the cgroup (v2, else v1) CPU quota and memory
limit, and physical memory; ``LoadMeter`` reads how busy the worker cores were and how much memory
is left, for the controller. This module is the one importer of psutil (worker pinning uses
``pin`` below).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

logger = logging.getLogger(__name__)


class Topology(msgspec.Struct, frozen=True, kw_only=True):
    """What this process may use of the machine."""

    #: CPUs in this process's affinity mask, ascending
    cpus: tuple[int, ...]
    #: cgroup CPU quota in cores; None when there is none
    cpu_quota: float | None = None
    #: memory this process may use: the cgroup limit, else physical memory
    memory_bytes: int

    @property
    def cores(self) -> float:
        """Usable cores: the affinity mask, cut by the quota."""
        n = float(len(self.cpus))
        return n if self.cpu_quota is None else max(min(n, self.cpu_quota), 0.01)

    @classmethod
    def detect(cls) -> Topology:
        """Read the affinity mask, the cgroup (v2, else v1) limits and physical memory."""
        import psutil

        cpus = tuple(sorted(os.sched_getaffinity(0)))
        root = Path("/sys/fs/cgroup")
        group = _cgroup_v2_path(_read(Path("/proc/self/cgroup")))
        v2 = root / group.lstrip("/") if group is not None else None
        quota = cpu_quota(
            _read(v2 / "cpu.max") if v2 else None,
            _read(root / "cpu" / "cpu.cfs_quota_us"),
            _read(root / "cpu" / "cpu.cfs_period_us"),
        )
        physical = psutil.virtual_memory().total
        limit = memory_limit(
            _read(v2 / "memory.max") if v2 else None,
            _read(root / "memory" / "memory.limit_in_bytes"),
        )
        return cls(cpus=cpus, cpu_quota=quota, memory_bytes=min(physical, limit or physical))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _cgroup_v2_path(proc_self_cgroup: str | None) -> str | None:
    for line in (proc_self_cgroup or "").splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def cpu_quota(
    v2_cpu_max: str | None, v1_quota_us: str | None, v1_period_us: str | None
) -> float | None:
    """Cores of CPU quota from cgroup v2 ``cpu.max`` ("150000 100000", "max 100000") or v1
    ``cfs_quota_us``/``cfs_period_us`` (-1: none); None when unlimited or unreadable."""
    if v2_cpu_max:
        quota, _, period = v2_cpu_max.strip().partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        if quota == "max":
            return None
    if v1_quota_us and v1_period_us and int(v1_quota_us) > 0:
        return int(v1_quota_us) / int(v1_period_us)
    return None


def memory_limit(v2_memory_max: str | None, v1_limit_in_bytes: str | None) -> int | None:
    """Bytes of cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``); None when
    unlimited (v2 "max", v1's near-2**63 "no limit" value)."""
    for raw in (v2_memory_max, v1_limit_in_bytes):
        if raw and raw.strip() != "max":
            value = int(raw)
            if value < 1 << 60:
                return value
    return None


class LoadMeter:
    """Reads the machine for the controller: how busy the pinned worker cores were between two
    snapshots, and how much of the memory limit is still available."""

    def __init__(self, topology: Topology, cpus: Sequence[int]) -> None:
        import psutil

        self._psutil: Any = psutil
        self.topology = topology
        self.cpus = list(cpus) or list(topology.cpus)

    def snapshot(self) -> tuple[float, float]:
        """The cores' seconds of work and of time so far (for ``busy_between``)."""
        per_cpu = self._psutil.cpu_times(percpu=True)
        used = total = 0.0
        for cpu in self.cpus:
            t = per_cpu[cpu] if cpu < len(per_cpu) else per_cpu[-1]
            used += sum(t) - t.idle - getattr(t, "iowait", 0.0)
            total += sum(t)
        return used, total

    @staticmethod
    def busy_between(a: tuple[float, float], b: tuple[float, float]) -> float:
        """Share of the cores' time spent on work between two snapshots, 0..1."""
        total = b[1] - a[1]
        return min(1.0, max(0.0, (b[0] - a[0]) / total)) if total > 0 else 0.0

    def memory_headroom(self) -> float:
        """Share of the memory limit still available, 0..1: under a cgroup limit, what its own
        usage leaves (the machine's free memory says nothing about a container's), else the
        machine's available memory."""
        memory = self._psutil.virtual_memory()
        limit = self.topology.memory_bytes
        if not limit:
            return 1.0
        if limit < memory.total:
            used = _cgroup_memory_used()
            if used is not None:
                return min(1.0, max(0.0, 1.0 - used / limit))
        return min(1.0, float(memory.available) / limit)


def _cgroup_memory_used() -> int | None:
    """Bytes this process's cgroup uses (v2 ``memory.current``, v1 ``memory.usage_in_bytes``)."""
    root = Path("/sys/fs/cgroup")
    group = _cgroup_v2_path(_read(Path("/proc/self/cgroup")))
    for raw in (
        (_read(root / group.lstrip("/") / "memory.current") if group is not None else None),
        _read(root / "memory" / "memory.usage_in_bytes"),
    ):
        if raw and raw.strip().isdigit():
            return int(raw)
    return None


def pin(cpu: int | None) -> str | None:
    """Pin this process to ``cpu``; None when it worked (or there is nothing to pin), else why
    it did not (reported by the caller, never fatal)."""
    if cpu is None:
        return None
    import psutil

    try:
        psutil.Process().cpu_affinity([cpu])
    except (OSError, AttributeError, ValueError) as e:
        return str(e)
    return None


def resident_bytes() -> int:
    """This process's resident set size."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def resident_bytes_of(pids: list[int]) -> dict[int, int]:
    """The resident set size of each of ``pids`` that is still there."""
    import psutil

    found = {}
    for pid in pids:
        try:
            found[pid] = int(psutil.Process(pid).memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found
