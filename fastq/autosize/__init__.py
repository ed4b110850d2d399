"""Autosize: how many worker processes, and how much concurrency and prefetch each queue gets,
at the start and then following the load (ARCHITECTURE.md, "Sizing").

- ``topology``: what this process may use of the machine (the one psutil importer);
- ``plan``: the starting numbers from the documented formulas, each with its rule (pure);
- ``share``: the host's handlers and cores shared among the busy queues (pure);
- ``look``: what a look at a queue sees, and how looks are timed and judged (pure);
- ``rules``: the rules a look applies, in order, one method each, and the state they move (pure);
- ``controller``: one queue's steps within its share: its start, its share, its looks (pure).

The supervisor's loop that measures and applies them is ``fastq.engine.tuning``.
"""

from fastq.autosize.controller import Controller, Decision
from fastq.autosize.look import (
    CONTROL_INTERVAL,
    FIRST_LOOK,
    LOOK_TICK,
    PRESS_MEMORY,
    RAMP_INTERVAL,
    RAMP_SETTLE,
    Cadence,
    Sample,
    settle_for,
    steady_rate,
)
from fastq.autosize.plan import (
    CPU_PREFETCH_FACTOR,
    IO_CONCURRENCY_MAX,
    IO_PREFETCH_FACTOR,
    PREFETCH_MEMORY_SHARE,
    Plan,
    QueuePlan,
    plan,
    plan_app,
    split,
)
from fastq.autosize.rules import (
    COOLDOWN,
    CPU_BUFFER_SECONDS,
    CPU_PREFETCH_FACTOR_CEILING,
    CPU_PREFETCH_FACTOR_MAX,
    GAIN,
    IO_PREFETCH_FACTOR_MAX,
    MEMORY_HEADROOM_MIN,
    PROBE_AFTER,
    RAMP_TARGET,
    SATURATED,
    STRONG_GAIN,
    cpu_factor_max,
    ramp,
)
from fastq.autosize.share import share_slots
from fastq.autosize.topology import LoadMeter, Topology, cpu_quota, memory_limit

__all__ = [
    "CONTROL_INTERVAL",
    "COOLDOWN",
    "CPU_BUFFER_SECONDS",
    "CPU_PREFETCH_FACTOR",
    "CPU_PREFETCH_FACTOR_CEILING",
    "CPU_PREFETCH_FACTOR_MAX",
    "FIRST_LOOK",
    "GAIN",
    "IO_CONCURRENCY_MAX",
    "IO_PREFETCH_FACTOR",
    "IO_PREFETCH_FACTOR_MAX",
    "LOOK_TICK",
    "MEMORY_HEADROOM_MIN",
    "PREFETCH_MEMORY_SHARE",
    "PRESS_MEMORY",
    "PROBE_AFTER",
    "RAMP_INTERVAL",
    "RAMP_SETTLE",
    "RAMP_TARGET",
    "SATURATED",
    "STRONG_GAIN",
    "Cadence",
    "Controller",
    "Decision",
    "LoadMeter",
    "Plan",
    "QueuePlan",
    "Sample",
    "Topology",
    "cpu_factor_max",
    "cpu_quota",
    "memory_limit",
    "plan",
    "plan_app",
    "ramp",
    "settle_for",
    "share_slots",
    "split",
    "steady_rate",
]
