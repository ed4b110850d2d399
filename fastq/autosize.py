"""How many worker processes, and how much concurrency and prefetch each queue gets.

``plan(topology, queues, ...)`` is pure: the same inputs give the same Plan, and every number in it
carries the rule that produced it, so ``fastq plan`` and the worker's start-up log can say why.
``Topology.detect()`` is the one place that reads the machine (affinity mask, cgroup v2 or v1 CPU
quota and memory limit, psutil for physical memory).

The starting rules (ARCHITECTURE.md, "Sizing"), per host:

| kind | concurrency | prefetch |
|---|---|---|
| io (and auto, until measured) | min(100, cores x 2) | concurrency x 5 (may grow to x 10) |
| cpu | cores (one handler per pinned core) | concurrency x 2 (may grow to x 3) |

``cores`` is what this process may really use: the affinity mask, cut by a cgroup CPU quota
(1.5 cores of quota counts as 1.5 for concurrency and as 1 worker process, as Go's automaxprocs
rounds down). A value the user set is never changed. Prefetch is also capped so that a full
prefetch of the largest allowed messages takes at most a quarter of the memory limit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec

from fastq.config import Config
from fastq.errors import ConfigError

Kind = Literal["io", "cpu", "auto"]

#: ceiling of the I/O formula (the "high concurrency" tier), per host
IO_CONCURRENCY_MAX = 100
IO_PREFETCH_FACTOR = 5
CPU_PREFETCH_FACTOR = 2
#: share of the memory limit a full prefetch of max-size messages may take
PREFETCH_MEMORY_SHARE = 0.25


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
            _read(v2 / "memory.max") if v2 else None, _read(root / "memory" / "memory.limit_in_bytes")
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


def cpu_quota(v2_cpu_max: str | None, v1_quota_us: str | None, v1_period_us: str | None) -> float | None:
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


class QueueSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A queue to plan for: its kind and what the user set on its task or consumer."""

    name: str
    kind: Kind = "auto"
    #: how many of the host's worker processes run this queue (None: all of them)
    processes: int | None = None
    concurrency: int | None = None
    prefetch: int | None = None


class QueuePlan(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    #: the kind the numbers follow ("auto" starts as io until measured)
    kind: Literal["io", "cpu"]
    #: the worker processes (indexes) that run this queue's handlers
    workers: tuple[int, ...]
    workers_rule: str
    #: handlers at once on the whole host
    concurrency: int
    #: of which, per worker process (index = process; 0 for processes that do not run it)
    per_process: tuple[int, ...]
    #: unacked messages the host holds (the broker's qos for its one consumer)
    prefetch: int
    concurrency_rule: str
    prefetch_rule: str


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    processes: int
    processes_rule: str
    #: the CPU each worker process is pinned to (index = process); empty when not pinning
    pinned: tuple[int, ...]
    queues: tuple[QueuePlan, ...]
    topology: Topology

    def explain(self) -> str:
        """The plan in words, one line per number, as ``fastq plan`` prints it."""
        t = self.topology
        quota = "none" if t.cpu_quota is None else f"{t.cpu_quota:g} cores"
        lines = [
            f"cpus {list(t.cpus)}, cgroup cpu quota {quota}, memory {t.memory_bytes / 2**20:,.0f} MiB",
            f"processes: {self.processes} ({self.processes_rule})",
            f"pinned to cpus: {list(self.pinned) if self.pinned else 'not pinned'}",
        ]
        for q in self.queues:
            if len(q.workers) < self.processes:
                lines.append(f"queue {q.name!r}: worker processes {list(q.workers)} ({q.workers_rule})")
            lines.append(f"queue {q.name!r} ({q.kind}): concurrency {q.concurrency} ({q.concurrency_rule}), "
                         f"per process {list(q.per_process)}")
            lines.append(f"queue {q.name!r}: prefetch {q.prefetch} ({q.prefetch_rule})")
        return "\n".join(lines)


def plan(
    topology: Topology,
    queues: Sequence[QueueSpec],
    config: Config | None = None,
) -> Plan:
    """Size processes, concurrency and prefetch from ``topology``; what ``config`` or a queue sets
    wins over the formulas. Pure."""
    config = config or Config()
    cores = topology.cores
    if config.processes is not None:
        processes, processes_rule = config.processes, "set by you"
    else:
        processes = max(1, math.floor(cores + 1e-9))
        processes_rule = _cores_rule(topology, processes)
    pinned = tuple(topology.cpus[i % len(topology.cpus)] for i in range(processes)) if config.pin_cpus else ()
    return Plan(
        processes=processes,
        processes_rule=processes_rule,
        pinned=pinned,
        queues=_plan_queues(queues, cores, processes, topology, config),
        topology=topology,
    )


def plan_app(app: Any, queues: Sequence[str] | None = None, topology: Topology | None = None) -> Plan:
    """The plan for ``app``'s queues (all of them by default) with ``app.config``, on this
    machine unless ``topology`` is given; what ``fastq plan`` prints and ``fastq worker`` runs.

    Raises:
        ConfigError: a queue has no task or consumer in the app.
    """
    known = app.queues()
    names = list(queues or known)
    unknown = [q for q in names if q not in known]
    if unknown or not names:
        raise ConfigError(f"queues {unknown or names} have no task or consumer in app {app.name!r}; "
                          f"known: {sorted(known)}")
    specs = [QueueSpec(name=q, kind=known[q].kind, processes=known[q].processes,
                       concurrency=known[q].concurrency, prefetch=known[q].prefetch) for q in names]
    return plan(topology or Topology.detect(), specs, app.config)


def _cores_rule(t: Topology, processes: int) -> str:
    if t.cpu_quota is not None and t.cpu_quota < len(t.cpus):
        return f"one per usable core: cgroup quota {t.cpu_quota:g} cores, rounded down, at least 1"
    return f"one per usable core: {len(t.cpus)} cpus in the affinity mask"


def _plan_queues(queues: Sequence[QueueSpec], cores: float, processes: int, t: Topology,
                 config: Config) -> tuple[QueuePlan, ...]:
    """Queues that run on fewer processes than the host has take consecutive workers, each
    starting where the previous one ended, so that two such queues do not crowd one core."""
    planned, start = [], 0
    for q in queues:
        if q.processes is None:
            workers, w_rule = tuple(range(processes)), "all of them"
        else:
            n = min(q.processes, processes)
            workers = tuple(sorted((start + k) % processes for k in range(n)))
            start = (start + n) % processes
            w_rule = (f"set by you: {n} of {processes}" if n == q.processes else
                      f"set by you: {q.processes}, capped to the {processes} processes this host runs")
        planned.append(_plan_queue(q, cores, processes, workers, w_rule, t, config))
    return tuple(planned)


def _plan_queue(q: QueueSpec, cores: float, processes: int, workers: tuple[int, ...], w_rule: str,
                t: Topology, config: Config) -> QueuePlan:
    kind: Literal["io", "cpu"] = "cpu" if q.kind == "cpu" else "io"
    user_concurrency = q.concurrency if q.concurrency is not None else config.concurrency
    if user_concurrency is not None:
        concurrency, c_rule = user_concurrency, "set by you"
    elif kind == "io":
        concurrency = max(1, min(IO_CONCURRENCY_MAX, round(cores * 2)))
        c_rule = f"io: min({IO_CONCURRENCY_MAX}, cores x 2) with {cores:g} cores"
        if q.kind == "auto":
            c_rule += "; auto starts as io until its handlers are measured"
    else:
        concurrency, c_rule = len(workers), "cpu: one handler per pinned core it runs on"
    user_prefetch = q.prefetch if q.prefetch is not None else config.prefetch
    if user_prefetch is not None:
        prefetch, p_rule = user_prefetch, "set by you"
    else:
        factor = IO_PREFETCH_FACTOR if kind == "io" else CPU_PREFETCH_FACTOR
        prefetch, p_rule = concurrency * factor, f"{kind}: concurrency x {factor}"
        cap = int(t.memory_bytes * PREFETCH_MEMORY_SHARE) // config.max_message_bytes
        if prefetch > cap:
            prefetch = max(concurrency, cap)
            p_rule += (f", capped to {prefetch}: a quarter of {t.memory_bytes / 2**20:,.0f} MiB of "
                       f"memory holds {cap} messages of max_message_bytes={config.max_message_bytes}")
    per, extra = divmod(concurrency, len(workers))
    share = {w: per + (1 if i < extra else 0) for i, w in enumerate(workers)}
    per_process = tuple(share.get(i, 0) for i in range(processes))
    return QueuePlan(name=q.name, kind=kind, workers=workers, workers_rule=w_rule, concurrency=concurrency,
                     per_process=per_process, prefetch=prefetch, concurrency_rule=c_rule, prefetch_rule=p_rule)
