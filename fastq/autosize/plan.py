"""How many worker processes, and how much concurrency and prefetch each queue starts with.

``plan(topology, queues, config)`` is pure: the same inputs give the same Plan, and every number
in it carries the rule that produced it, so ``fastq plan`` and the worker's start-up log can say
why.

The starting rules (ARCHITECTURE.md, "Sizing"), per host:

| kind | concurrency | prefetch |
|---|---|---|
| io (and auto, until measured) | min(100, cores x 2), may grow to 1,000 | concurrency x 5..10 (*) |
| cpu | cores (one handler per pinned core) | concurrency x 2 (may grow to x 3) (**) |

(*) on RabbitMQ (``Broker.unsettled_costs``), past 100 handlers: at least the concurrency, and
100 x 5..10 (the controller's ``_prefetch_for``).

(**) past x 3 only while work waits and its handlers are short: as many messages a handler as
20 ms of their work, up to x 20 (the controller's ``cpu_factor_max``; 1 ms handlers: about x 16).

``cores`` is what this process may really use: the affinity mask, cut by a cgroup CPU quota
(1.5 cores of quota counts as 1.5 for concurrency and as 1 worker process, as Go's automaxprocs
rounds down). A value the user set is never changed. Prefetch is also capped so that a full
prefetch of the largest allowed messages takes at most a quarter of the memory limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from fastq.autosize.topology import Topology
from fastq.config import Config, HandlerOptions
from fastq.errors import ConfigError

#: ceiling of the I/O formula (the "high concurrency" tier), per host: where a queue starts
#: (the controller may go past it, to Config.io_concurrency_ceiling)
IO_CONCURRENCY_MAX = 100
IO_PREFETCH_FACTOR = 5
CPU_PREFETCH_FACTOR = 2
#: share of the memory limit a full prefetch of max-size messages may take
PREFETCH_MEMORY_SHARE = 0.25


class QueuePlan(msgspec.Struct, frozen=True, kw_only=True):
    """One queue's starting numbers, each with its rule, and the options they came from."""

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
    #: what the task or consumer declared (its weight and autosize bounds among them)
    options: HandlerOptions
    #: set by the user (on the handler or the Config): the controller never moves them
    user_concurrency: bool = False
    user_prefetch: bool = False
    #: the most prefetch the memory limit allows (a quarter of it in max-size messages)
    prefetch_cap: int = 1 << 62


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
        memory = f"memory {t.memory_bytes / 2**20:,.0f} MiB"
        lines = [
            f"cpus {list(t.cpus)}, cgroup cpu quota {quota}, {memory}",
            f"processes: {self.processes} ({self.processes_rule})",
            f"pinned to cpus: {list(self.pinned) if self.pinned else 'not pinned'}",
        ]
        for q in self.queues:
            if len(q.workers) < self.processes:
                lines.append(
                    f"queue {q.name!r}: worker processes {list(q.workers)} ({q.workers_rule})"
                )
            lines.append(
                f"queue {q.name!r} ({q.kind}): concurrency {q.concurrency} "
                f"({q.concurrency_rule}), per process {list(q.per_process)}"
            )
            lines.append(f"queue {q.name!r}: prefetch {q.prefetch} ({q.prefetch_rule})")
            o = q.options
            bounds = [
                f"{k}={getattr(o, k)}"
                for k in ("min_concurrency", "max_concurrency", "min_prefetch", "max_prefetch")
                if getattr(o, k) is not None
            ]
            if o.weight != 1.0 or bounds:
                lines.append(
                    f"queue {q.name!r}: autosize within {', '.join(bounds) or 'the rules'}; "
                    f"weight {o.weight:g} beside other busy I/O queues (set by you)"
                )
        return "\n".join(lines)


def plan(
    topology: Topology, queues: Sequence[HandlerOptions], config: Config | None = None
) -> Plan:
    """Size processes, concurrency and prefetch from ``topology``; what ``config`` or a queue's
    options set wins over the formulas. Pure."""
    config = config or Config()
    cores = topology.cores
    if config.processes is not None:
        processes, processes_rule = config.processes, "set by you"
    else:
        processes = max(1, math.floor(cores + 1e-9))
        processes_rule = _cores_rule(topology, processes)
    cpus = topology.cpus
    pinned = tuple(cpus[i % len(cpus)] for i in range(processes)) if config.pin_cpus else ()
    return Plan(
        processes=processes,
        processes_rule=processes_rule,
        pinned=pinned,
        queues=_plan_queues(queues, cores, processes, topology, config),
        topology=topology,
    )


def plan_app(
    app: Any, queues: Sequence[str] | None = None, topology: Topology | None = None
) -> Plan:
    """The plan for ``app``'s queues (all of them by default) with ``app.config``, on this
    machine unless ``topology`` is given; what ``fastq plan`` prints and ``fastq worker`` runs.

    Raises:
        ConfigError: a queue has no task or consumer in the app.
    """
    known: dict[str, HandlerOptions] = app.queues()
    names = list(queues or known)
    unknown = [q for q in names if q not in known]
    if unknown or not names:
        raise ConfigError(
            f"queues {unknown or names} have no task or consumer in app "
            f"{app.name!r}; known: {sorted(known)}"
        )
    return plan(topology or Topology.detect(), [known[q] for q in names], app.config)


def _cores_rule(t: Topology, processes: int) -> str:
    if t.cpu_quota is not None and t.cpu_quota < len(t.cpus):
        return f"one per usable core: cgroup quota {t.cpu_quota:g} cores, rounded down, at least 1"
    return f"one per usable core: {len(t.cpus)} cpus in the affinity mask"


def _plan_queues(
    queues: Sequence[HandlerOptions], cores: float, processes: int, t: Topology, config: Config
) -> tuple[QueuePlan, ...]:
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
            w_rule = (
                f"set by you: {n} of {processes}"
                if n == q.processes
                else f"set by you: {q.processes}, capped to the {processes} processes this host "
                "runs"
            )
        planned.append(_plan_queue(q, cores, processes, workers, w_rule, t, config))
    return tuple(planned)


def split(concurrency: int, workers: Sequence[int], processes: int) -> tuple[int, ...]:
    """A queue's host concurrency spread over its workers, as per-process counts."""
    per, extra = divmod(concurrency, len(workers))
    share = {w: per + (1 if i < extra else 0) for i, w in enumerate(workers)}
    return tuple(share.get(i, 0) for i in range(processes))


def _plan_queue(
    q: HandlerOptions,
    cores: float,
    processes: int,
    workers: tuple[int, ...],
    w_rule: str,
    t: Topology,
    config: Config,
) -> QueuePlan:
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
    if user_concurrency is None:  # CPU work never gets more than one handler per core: no minimum
        low = q.min_concurrency if kind == "io" else None
        concurrency, c_rule = _bounded(concurrency, c_rule, low, q.max_concurrency, "concurrency")
    user_prefetch = q.prefetch if q.prefetch is not None else config.prefetch
    cap = max(1, int(t.memory_bytes * PREFETCH_MEMORY_SHARE) // config.max_message_bytes)
    if user_prefetch is not None:
        prefetch, p_rule = user_prefetch, "set by you"
    else:
        factor = IO_PREFETCH_FACTOR if kind == "io" else CPU_PREFETCH_FACTOR
        prefetch, p_rule = concurrency * factor, f"{kind}: concurrency x {factor}"
        if prefetch > cap:
            prefetch = max(concurrency, cap)
            p_rule += (
                f", capped to {prefetch}: a quarter of {t.memory_bytes / 2**20:,.0f} MiB "
                f"of memory holds {cap} messages of "
                f"max_message_bytes={config.max_message_bytes}"
            )
    if user_prefetch is None:
        prefetch, p_rule = _bounded(prefetch, p_rule, q.min_prefetch, q.max_prefetch, "prefetch")
    return QueuePlan(
        name=q.queue,
        kind=kind,
        workers=workers,
        workers_rule=w_rule,
        concurrency=concurrency,
        per_process=split(concurrency, workers, processes),
        prefetch=prefetch,
        concurrency_rule=c_rule,
        prefetch_rule=p_rule,
        options=q,
        user_concurrency=user_concurrency is not None,
        user_prefetch=user_prefetch is not None,
        prefetch_cap=cap,
    )


def _bounded(
    value: int, rule: str, low: int | None, high: int | None, name: str
) -> tuple[int, str]:
    """``value`` within the user's bounds, and the rule saying so when they moved it."""
    if low is not None and value < low:
        return low, f"{rule}, raised to your min_{name}={low}"
    if high is not None and value > high:
        return high, f"{rule}, lowered to your max_{name}={high}"
    return value, rule
