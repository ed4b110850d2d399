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
    #: its share of the host's I/O handlers beside other busy queues (relative)
    weight: float = 1.0
    #: the user's bounds for what autosize may choose (None: the rules' own)
    min_concurrency: int | None = None
    max_concurrency: int | None = None
    min_prefetch: int | None = None
    max_prefetch: int | None = None


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
    #: set by the user: the controller never moves them
    user_concurrency: bool = False
    user_prefetch: bool = False
    #: the most prefetch the memory limit allows (a quarter of it in max-size messages)
    prefetch_cap: int = 1 << 62
    #: its share of the host's I/O handlers beside other busy queues (relative)
    weight: float = 1.0
    #: the user's bounds for the controller (host-wide); None: the rules' own
    min_concurrency: int | None = None
    max_concurrency: int | None = None
    min_prefetch: int | None = None
    max_prefetch: int | None = None


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
            bounds = [f"{k}={getattr(q, k)}" for k in ("min_concurrency", "max_concurrency", "min_prefetch",
                                                        "max_prefetch") if getattr(q, k) is not None]
            if q.weight != 1.0 or bounds:
                lines.append(f"queue {q.name!r}: autosize within {', '.join(bounds) or 'the rules'}; "
                             f"weight {q.weight:g} beside other busy I/O queues (set by you)")
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
                       concurrency=known[q].concurrency, prefetch=known[q].prefetch, weight=known[q].weight,
                       min_concurrency=known[q].min_concurrency, max_concurrency=known[q].max_concurrency,
                       min_prefetch=known[q].min_prefetch, max_prefetch=known[q].max_prefetch) for q in names]
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


def split(concurrency: int, workers: Sequence[int], processes: int) -> tuple[int, ...]:
    """A queue's host concurrency spread over its workers, as per-process counts."""
    per, extra = divmod(concurrency, len(workers))
    share = {w: per + (1 if i < extra else 0) for i, w in enumerate(workers)}
    return tuple(share.get(i, 0) for i in range(processes))


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
            p_rule += (f", capped to {prefetch}: a quarter of {t.memory_bytes / 2**20:,.0f} MiB of "
                       f"memory holds {cap} messages of max_message_bytes={config.max_message_bytes}")
    if user_prefetch is None:
        prefetch, p_rule = _bounded(prefetch, p_rule, q.min_prefetch, q.max_prefetch, "prefetch")
    per_process = split(concurrency, workers, processes)
    return QueuePlan(name=q.name, kind=kind, workers=workers, workers_rule=w_rule, concurrency=concurrency,
                     per_process=per_process, prefetch=prefetch, concurrency_rule=c_rule, prefetch_rule=p_rule,
                     user_concurrency=user_concurrency is not None, user_prefetch=user_prefetch is not None,
                     prefetch_cap=cap, weight=q.weight, min_concurrency=q.min_concurrency,
                     max_concurrency=q.max_concurrency,
                     min_prefetch=q.min_prefetch, max_prefetch=q.max_prefetch)


def _bounded(value: int, rule: str, low: int | None, high: int | None, name: str) -> tuple[int, str]:
    """``value`` within the user's bounds, and the rule saying so when they moved it."""
    if low is not None and value < low:
        return low, f"{rule}, raised to your min_{name}={low}"
    if high is not None and value > high:
        return high, f"{rule}, lowered to your max_{name}={high}"
    return value, rule


# -- the controller: from the starting plan, follow the load ----------------------------------

#: seconds between two looks at the load
CONTROL_INTERVAL = 2.0
#: seconds until the next look after an increase, or at the start: a climb is judged sooner
#: (only while messages spend well under a quarter of it in flight, so that it can show)
RAMP_INTERVAL = 1.0
#: of which the first RAMP_SETTLE seconds are not judged (a change takes hold); a look of
#: CONTROL_INTERVAL judges its second half (settle_for)
RAMP_SETTLE = 0.25
#: seconds between two readings of the settled counts and the cores: a look judges the slices
#: of its window by their mean rate without the highest and the lowest (steady_rate), so that a
#: burst of a neighbour's work that dips one slice does not decide a step
LOOK_TICK = 0.125
#: a queue whose work waited at the broker within this many seconds presses for the cores
PRESS_MEMORY = 4.0
#: share of the cores an increase of I/O concurrency aims at, from how busy they are now:
#: with idle cores it grows by up to RAMP_MAX at once, never by less than x2
RAMP_TARGET = 0.75
RAMP_MAX = 8
#: an increase that raised throughput by this share or more is followed by x4 on busy cores
STRONG_GAIN = 0.20
IO_PREFETCH_FACTOR_MAX = 10
CPU_PREFETCH_FACTOR_MAX = 3
#: memory headroom (share of the limit still available) under which prefetch comes down
MEMORY_HEADROOM_MIN = 0.10
#: an increase is kept when throughput grew by at least this share (noise is about half that)
GAIN = 0.05
#: intervals without an increase after a decrease or a step that did not pay
COOLDOWN = 3
#: intervals after which a ceiling is probed again (one step up, kept only if it pays)
PROBE_AFTER = 15
#: at or above this share of busy time the cores are saturated: fewer at once may do as well
SATURATED = 0.95


def share_slots(weights: dict[str, float], demand: dict[str, bool], budget: int = IO_CONCURRENCY_MAX,
                floors: dict[str, int] | None = None, cores: dict[str, int] | None = None,
                pressing: set[str] | None = None) -> dict[str, int]:
    """What each queue may have at once now, host-wide, from its weight and who has demand (a
    backlog, or work in flight). Pure.

    I/O queues split ``budget`` handlers in proportion to the weights of the I/O queues with
    demand; one without keeps only its floor (its minimum, at least 1), so that its share goes to
    the busy ones. CPU queues (``cores``: each one's name and the cores it runs on) share the
    cores instead, weighed against every other queue that presses for them: CPU queues with
    demand, and the others in ``pressing`` (work waiting at the broker of late: they do not keep
    up; default: those with demand). A busy CPU queue gets its weight's share of its cores,
    rounded, at least one; an idle one, or one that nobody presses, keeps them all (an I/O queue
    that keeps up with a trickle needs no core of its own).
    """
    floors, cores = floors or {}, cores or {}
    busy = [q for q in weights if demand.get(q)]
    pressing = set(busy) if pressing is None else pressing
    total_io = sum(weights[q] for q in busy if q not in cores)
    contending = sum(weights[q] for q in busy if q in cores or q in pressing)
    caps = {}
    for q, weight in weights.items():
        if q in cores:
            own = cores[q]
            caps[q] = max(1, min(own, math.floor(own * weight / contending + 0.5))) if q in busy else own
            continue
        share = int(budget * weight / total_io) if q in busy and total_io > 0 else 0
        caps[q] = max(floors.get(q, 1), share, 1)
    return caps


class Sample(msgspec.Struct, frozen=True, kw_only=True):
    """What the supervisor saw of one queue over one interval."""

    #: share of the pinned worker cores' time spent on the CPU, 0..1
    busy: float
    #: messages ready at the broker and not delivered yet
    backlog: int
    #: messages settled per second over the interval
    throughput: float
    #: mean seconds a message spent delivered and unsettled (in flight / throughput)
    latency: float
    #: share of the memory limit still available, 0..1
    memory_headroom: float = 1.0


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    concurrency: int
    prefetch: int
    #: why it changed, in words; empty when nothing did
    reason: str = ""


class Controller:
    """Moves one queue's concurrency and prefetch with the load, within the documented bounds.

    Rules, first match wins, once per interval:
    1. memory headroom under 10%: halve prefetch (down to the concurrency; it stays capped until
       headroom is back to 20%), then, for I/O, cut concurrency by a quarter;
    2. the last increase did not pay (throughput grew by under 5%): take it back, whole (the
       multiplicative decrease); that is the ceiling; likewise a decrease that lost
       more than 5% of throughput and left the cores under 95% busy is taken back and becomes
       the floor;
    2b. cores saturated (95% busy or more) while a backlog waits: halve I/O concurrency, kept
       while throughput holds (the work turned CPU-bound: more at once only adds waiting);
    3. a backlog waits: multiply I/O concurrency by what should take the cores to RAMP_TARGET
       busy if each handler keeps its share of the CPU (x2 at least, x8 at most, up to 100 per
       host: with idle cores 4 reaches 100 in two intervals), else raise the prefetch factor
       to its largest (I/O x5 to x10; CPU x2 to x3, as CPU work never gets more than one
       handler per pinned core). Idle cores should make the step pay; with busy ones, larger
       batches (less overhead per message) may: there an increase that follows one that paid
       STRONG_GAIN or more is x4 (a slow start). An increase sized by idle cores that paid less
       than half of itself is trimmed to twice the concurrency that carried the gain (the knee
       lies between).
    A ceiling (kept apart for concurrency and for prefetch, so that one that stopped paying
    leaves the other to try) holds until the load changes (throughput moves by a quarter) or
    PROBE_AFTER intervals pass, when one doubling is tried again; decreases hold
    increases for COOLDOWN intervals. So it settles instead of swinging, and a value the user
    set never moves. ``next_look`` says when to look again: sooner after an increase.
    """

    def __init__(self, queue: QueuePlan, *, user_concurrency: bool = False, user_prefetch: bool = False,
                 concurrency_max: int | None = None) -> None:
        self.kind = queue.kind
        self.concurrency, self.prefetch = queue.concurrency, queue.prefetch
        #: the user set the concurrency: nothing moves it (fixed_concurrency also covers CPU work)
        self.user_fixed = user_concurrency
        #: a CPU queue's handlers when it has the cores it runs on to itself (its share may be less)
        self.cpu_cores = queue.concurrency
        self.fixed_prefetch = user_prefetch
        self.min_concurrency = 1 if self.kind == "io" else queue.concurrency
        self.max_concurrency = queue.concurrency if self.fixed_concurrency else (concurrency_max or IO_CONCURRENCY_MAX)
        if not self.fixed_concurrency:  # the user's bounds (checked against each other by the options)
            self.min_concurrency = max(self.min_concurrency, queue.min_concurrency or 1)
            self.max_concurrency = min(self.max_concurrency, queue.max_concurrency or self.max_concurrency)
            self.max_concurrency = max(self.max_concurrency, self.min_concurrency)
        self.min_prefetch, self.max_prefetch = queue.min_prefetch or 1, queue.max_prefetch or (1 << 62)
        if not self.fixed_concurrency:  # handlers beyond what may be delivered would idle
            self.max_concurrency = max(self.min_concurrency, min(self.max_concurrency, self.max_prefetch))
        self.user_max_concurrency = queue.max_concurrency
        base = IO_PREFETCH_FACTOR if self.kind == "io" else CPU_PREFETCH_FACTOR
        self.factor_min, self.factor = base, base
        self.factor_max = IO_PREFETCH_FACTOR_MAX if self.kind == "io" else CPU_PREFETCH_FACTOR_MAX
        #: the memory cap of the plan, and a lower one while memory is short
        self.prefetch_cap = queue.prefetch_cap
        self.memory_cap: int | None = None
        self.cooldown = 0
        self.last: Sample | None = None
        self.raised = False  # the last step was an increase
        #: where raising concurrency, or the prefetch factor, stopped paying, and the throughput
        #: then; forgotten when the load changes (throughput moves by a quarter) or PROBE_AFTER
        #: intervals pass
        self.capped = {"concurrency": False, "prefetch": False, "down": False}
        self.lowered = False  # the last step was a decrease on saturated cores
        self.ceiling_throughput = 0.0
        self.ceiling_age = 0
        self.probing = False  # the next increase tries a ceiling again
        self.sized_by_idle = False  # the last increase was sized by how idle the cores were
        self.before = (self.concurrency, self.factor)  # what the last increase started from

    @property
    def fixed_concurrency(self) -> bool:
        """Concurrency the steps do not move: set by the user, or CPU work (one handler per
        core; only its share of the cores moves it, in ``cap``)."""
        return self.user_fixed or self.kind == "cpu"

    def next_look(self, latency: float) -> float:
        """Seconds until this queue wants its next look: RAMP_INTERVAL after an increase of
        concurrency (or before the first look) while ``latency``, the seconds messages spend in
        flight, is under RAMP_SETTLE, so that the change has shown by the time it is judged; else
        CONTROL_INTERVAL (a larger prefetch gains a few percent at most: a longer look tells)."""
        climbing = (self.raised and self.concurrency != self.before[0]) or self.last is None
        return RAMP_INTERVAL if climbing and latency < RAMP_SETTLE else CONTROL_INTERVAL

    def cap(self, ceiling: int) -> Decision:
        """The most handlers at once this queue's share of the host allows now (``share_slots``);
        a concurrency above it comes down at once. A CPU queue's share is of cores: its
        concurrency follows it down and back up (one handler per core it may use). A
        concurrency the user set is not moved."""
        if self.user_fixed:
            return Decision(concurrency=self.concurrency, prefetch=self.prefetch)
        if self.kind == "cpu":
            new = max(1, min(self.cpu_cores, ceiling))
            if new == self.concurrency:
                return Decision(concurrency=self.concurrency, prefetch=self.prefetch)
            old, self.concurrency = self.concurrency, new
            self.min_concurrency = self.max_concurrency = new
            self._forget_step()
            self.prefetch = self._prefetch_for(new)
            return Decision(concurrency=new, prefetch=self.prefetch,
                            reason=f"its share of the host's {self.cpu_cores} cores beside the other busy queues is "
                                   f"{ceiling}: concurrency {'down' if new < old else 'up'} to {new}")
        user_max = self.user_max_concurrency or IO_CONCURRENCY_MAX
        self.max_concurrency = max(self.min_concurrency, min(user_max, ceiling))
        if self.concurrency <= self.max_concurrency:
            return Decision(concurrency=self.concurrency, prefetch=self.prefetch)
        self.concurrency = self.max_concurrency
        self._forget_step()
        self.prefetch = self._prefetch_for(self.concurrency)
        return Decision(concurrency=self.concurrency, prefetch=self.prefetch,
                        reason=f"its share of the host's handlers is {ceiling}: concurrency down to {self.concurrency}")

    def _forget_step(self) -> None:
        """The share moved this queue: its last step cannot be judged against the next look. A
        larger prefetch factor it was trying goes back (it is tried again later, and judged)."""
        if self.raised and self.factor != self.before[1]:
            self.factor = self.before[1]
        self.raised = self.lowered = False
        self.last = None
        self.before = (self.concurrency, self.factor)

    def reclassify(self, kind: Literal["io", "cpu"], cores: int) -> Decision:
        """The queue's handlers were measured as ``kind`` (its plan said io, as "auto" starts):
        for cpu, one handler per core it runs on (``cores``) and the cpu prefetch factors,
        within the user's bounds; a concurrency the user fixed stays."""
        if kind == "cpu" and self.kind != "cpu":
            self.kind = "cpu"
            if not self.user_fixed:  # the user's maximum, not a share of the I/O handlers
                self.concurrency = self.cpu_cores = max(1, min(cores, self.user_max_concurrency or cores))
                self.min_concurrency = self.max_concurrency = self.concurrency
            self.factor_min = self.factor = CPU_PREFETCH_FACTOR
            self.factor_max = CPU_PREFETCH_FACTOR_MAX
            self.capped = dict.fromkeys(self.capped, False)
            self.raised = self.lowered = False
            self.cooldown = COOLDOWN
            self.prefetch = self._prefetch_for(self.concurrency)
        return Decision(concurrency=self.concurrency, prefetch=self.prefetch,
                        reason=f"measured {kind}-bound" if kind == self.kind else "")

    def _prefetch_for(self, concurrency: int) -> int:
        if self.fixed_prefetch:
            return self.prefetch
        cap = min(self.prefetch_cap, self.memory_cap if self.memory_cap is not None else self.prefetch_cap)
        prefetch = max(concurrency, min(concurrency * self.factor, cap))
        return min(max(prefetch, self.min_prefetch), self.max_prefetch)  # the user's bounds win

    def step(self, s: Sample) -> Decision:
        """The concurrency and prefetch for the next interval, given what this one looked like."""
        last, self.last = self.last, s
        raised, self.raised = self.raised, False
        lowered, self.lowered = self.lowered, False
        # the last increase paid by STRONG_GAIN or more: the next may be larger (slow start)
        strong = (raised and last is not None and last.throughput > 0
                  and s.throughput >= last.throughput * (1 + STRONG_GAIN))
        if self.cooldown:
            self.cooldown -= 1
        if self.memory_cap is not None and s.memory_headroom >= 2 * MEMORY_HEADROOM_MIN:
            self.memory_cap = None  # memory is back (with a margin, so as not to swing)
        if any(self.capped.values()):
            self.ceiling_age += 1
            if abs(s.throughput - self.ceiling_throughput) > 0.25 * self.ceiling_throughput:
                self.capped = dict.fromkeys(self.capped, False)  # the load changed
                self.probing = False
            elif self.ceiling_age > PROBE_AFTER:  # time to try one step up again: a doubling at most
                self.capped = dict.fromkeys(self.capped, False)
                self.probing = True
        if s.backlog == 0:
            self.probing = False  # a probe is for a load that waits; the next one climbs afresh
        c, p, reason = self.concurrency, self.prefetch, ""
        if s.memory_headroom < MEMORY_HEADROOM_MIN:
            if not self.fixed_prefetch and p > max(c, self.min_prefetch):
                self.memory_cap = max(c, p // 2)
                p = self._prefetch_for(c)
                reason = f"memory headroom {s.memory_headroom:.0%} < {MEMORY_HEADROOM_MIN:.0%}: prefetch halved"
            elif not self.fixed_concurrency and c > self.min_concurrency:
                c = max(self.min_concurrency, c * 3 // 4)
                p = min(p, self._prefetch_for(c))
                reason = f"memory headroom {s.memory_headroom:.0%} with prefetch at its floor: concurrency cut by a quarter"
            self.cooldown = COOLDOWN
        elif raised and last is not None and s.throughput < last.throughput * (1 + GAIN):
            # The last increase did not pay: take it back (a halving, when concurrency had
            # doubled), and climb no further that way until the load changes.
            before_c, before_factor = self.before
            dimension = "concurrency" if c != before_c else "prefetch"
            if self.factor != before_factor:
                self.factor = before_factor
                p = self._prefetch_for(c)
                reason = (f"throughput {s.throughput:,.0f}/s did not grow (latency {s.latency * 1e3:.1f} ms): "
                          f"prefetch back to concurrency x {self.factor}")
            elif c != before_c:
                c = min(max(before_c, self.min_concurrency), self.max_concurrency)
                p = self._prefetch_for(c)
                reason = (f"throughput {s.throughput:,.0f}/s did not grow (latency {s.latency * 1e3:.1f} ms): "
                          f"concurrency back to {c}")
            self.capped[dimension] = True
            self.ceiling_throughput, self.ceiling_age = s.throughput, 0
            self.cooldown = COOLDOWN
        elif raised and last is not None and last.throughput > 0 and self.sized_by_idle and (
                c > max(self.min_concurrency, math.ceil(2 * self.before[0] * s.throughput / last.throughput))):
            # A jump sized by idle cores paid less than half of itself: the knee lies between.
            # Keep twice the concurrency that carried the gain (Little's law), no more.
            before_c = self.before[0]
            gained = s.throughput / last.throughput
            c = max(before_c + 1, math.ceil(2 * before_c * gained), self.min_concurrency)
            p = self._prefetch_for(c)
            reason = (f"concurrency x{self.concurrency / before_c:.1f} raised throughput only x{gained:.2f} "
                      f"(to {s.throughput:,.0f}/s): concurrency trimmed to {c}")
            self.capped["concurrency"] = True
            self.ceiling_throughput, self.ceiling_age = s.throughput, 0
        elif lowered and last is not None and s.throughput < last.throughput * (1 - GAIN) and s.busy < SATURATED:
            # Fewer at once lost throughput and left the cores idle: back to where it was, and no
            # lower until the load changes. (On cores still saturated the loss is not the
            # decrease's doing: a neighbour's load, or noise; seen on a loaded CI machine.)
            c = min(max(self.before[0], self.min_concurrency), self.max_concurrency)
            p = self._prefetch_for(c)
            reason = f"throughput fell to {s.throughput:,.0f}/s: concurrency back to {c}"
            self.capped["down"] = True
            self.ceiling_throughput, self.ceiling_age = s.throughput, 0
            self.cooldown = COOLDOWN
        elif lowered and last is not None and s.throughput < last.throughput * (1 - GAIN):
            # It lost throughput, but the cores are as saturated as before: not the decrease's
            # doing, so it stays; and it holds here, neither lower nor higher, until the load
            # changes or the probe time passes (no swinging either way)
            self.capped["down"] = self.capped["concurrency"] = True
            self.ceiling_throughput, self.ceiling_age = s.throughput, 0
        elif (s.busy >= SATURATED and s.backlog > 0 and not self.cooldown and not self.fixed_concurrency
              and not raised and c > self.min_concurrency and not self.capped["down"]):
            # Saturated cores: more at once only adds waiting (the work turned CPU-bound, say);
            # halve, and keep it while throughput holds (the multiplicative decrease).
            self.before = (c, self.factor)
            c = max(self.min_concurrency, c // 2)
            p = self._prefetch_for(c)
            reason = f"cores {s.busy:.0%} busy: concurrency down to {c} while throughput holds"
            self.lowered = True
        elif s.backlog > 0 and not self.cooldown:
            probing, self.probing = self.probing, False  # a probe is this one step
            # Each step is tried and kept only if it pays: with idle cores more at once should,
            # with busy ones larger batches (less overhead per message) may.
            self.before = (c, self.factor)
            if not self.fixed_concurrency and c < self.max_concurrency and not self.capped["concurrency"]:
                jump = 2.0 if probing else ramp(s.busy)
                self.sized_by_idle = jump > 2.0
                if jump == 2.0 and strong and not probing:  # busy cores, but each step paid well: x4
                    jump = 4.0  # (never when probing: that follows a step that did not pay)
                c = min(self.max_concurrency, max(c + 1, int(c * jump)))
                p = self._prefetch_for(c)
                reason = f"cores {s.busy:.0%} busy while {s.backlog} messages wait: concurrency +{c - self.concurrency}"
                self.raised = True
            elif not self.fixed_prefetch and self.factor < self.factor_max and not self.capped["prefetch"]:
                # Straight to the largest factor: the gain of larger batches flattens out, and
                # a step of +1 (x5 to x6) would pay less than the noise of one look.
                self.factor = self.factor_max
                p = self._prefetch_for(c)
                if p > self.prefetch:
                    reason = (f"cores {s.busy:.0%} busy while {s.backlog} messages wait: "
                              f"prefetch to concurrency x {self.factor}")
                    self.raised = True
                else:  # the memory cap or the user's maximum: nothing to try
                    self.factor = self.before[1]
                    self.capped["prefetch"] = True
                    self.ceiling_throughput, self.ceiling_age = s.throughput, 0
        self.concurrency, self.prefetch = c, p
        return Decision(concurrency=c, prefetch=p, reason=reason)


def steady_rate(times: Sequence[float], counts: Sequence[int]) -> float:
    """Messages per second between the first and the last of ``times`` (ascending), given the
    count settled by each: with four slices or more and four messages a slice or more, the mean
    rate of the slices without the highest and the lowest, else the plain rate (a slow queue's
    slices are mostly empty: trimming them would throw its signal away). Pure."""
    rates = [(b - a) / (t1 - t0) for a, b, t0, t1 in zip(counts, counts[1:], times, times[1:]) if t1 > t0]
    if len(rates) < 4 or counts[-1] - counts[0] < 4 * len(rates):
        span = times[-1] - times[0]
        return (counts[-1] - counts[0]) / span if span > 0 else 0.0
    rates.sort()
    return sum(rates[1:-1]) / (len(rates) - 2)


def settle_for(interval: float) -> float:
    """Seconds at the start of a look of ``interval`` that are not judged: a change takes hold."""
    return RAMP_SETTLE if interval <= RAMP_INTERVAL else interval / 2


def ramp(busy: float) -> float:
    """How many times I/O concurrency grows in one increase with the cores ``busy`` (0..1):
    enough to take them to RAMP_TARGET if each handler keeps its share of the CPU, at least x2
    and at most x RAMP_MAX."""
    return min(float(RAMP_MAX), max(2.0, RAMP_TARGET / max(busy, 1e-3)))


class LoadMeter:
    """Reads the machine for the controller: how busy the pinned worker cores were between two
    snapshots, and how much of the memory limit is still available (psutil, read here only)."""

    def __init__(self, topology: Topology, cpus: Sequence[int]) -> None:
        import psutil

        self._psutil = psutil
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
        return min(1.0, memory.available / limit)


def _cgroup_memory_used() -> int | None:
    """Bytes this process's cgroup uses (v2 ``memory.current``, v1 ``memory.usage_in_bytes``)."""
    root = Path("/sys/fs/cgroup")
    group = _cgroup_v2_path(_read(Path("/proc/self/cgroup")))
    for raw in ((_read(root / group.lstrip("/") / "memory.current") if group is not None else None),
                _read(root / "memory" / "memory.usage_in_bytes")):
        if raw and raw.strip().isdigit():
            return int(raw)
    return None
