"""What one look at a queue sees, and how a look is timed and judged (ARCHITECTURE.md,
"Sizing"): the tuning loop (fastq.engine.tuning) reads the settled counts every LOOK_TICK
seconds, and each queue's controller looks when its interval has passed, judged on its window
without the settling start, at the trimmed mean rate of its slices. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import msgspec

#: seconds between two looks at the load
CONTROL_INTERVAL = 2.0
#: seconds until the next look after an increase: a climb is judged sooner (only while
#: messages spend well under a quarter of it in flight, so that it can show)
RAMP_INTERVAL = 1.0
#: seconds until a queue's first look: a backlog met at the start is sized within a second
FIRST_LOOK = 0.375
#: of which the first RAMP_SETTLE seconds are not judged (a change takes hold); a look of
#: CONTROL_INTERVAL judges its second half (settle_for)
RAMP_SETTLE = 0.25
#: seconds between two readings of the settled counts and the cores: a look judges the slices
#: of its window by their mean rate without the highest and the lowest (steady_rate), so that a
#: burst of a neighbour's work that dips one slice does not decide a step
LOOK_TICK = 0.125
#: a queue whose work waited at the broker within this many seconds presses for the cores
PRESS_MEMORY = 4.0


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
    #: messages delivered to this host and not settled, at the look (beyond the concurrency,
    #: they wait in the host: a backlog the broker no longer counts)
    in_flight: int = 0
    #: share of the memory limit still available, 0..1
    memory_headroom: float = 1.0


def steady_rate(times: Sequence[float], counts: Sequence[int]) -> float:
    """Messages per second between the first and the last of ``times`` (ascending), given the
    count settled by each: with four slices or more and four messages a slice or more, the mean
    rate of the slices without the highest and the lowest, else the plain rate (a slow queue's
    slices are mostly empty: trimming them would throw its signal away). Pure."""
    rates = [
        (b - a) / (t1 - t0) for a, b, t0, t1 in zip(counts, counts[1:], times, times[1:]) if t1 > t0
    ]
    if len(rates) < 4 or counts[-1] - counts[0] < 4 * len(rates):
        span = times[-1] - times[0]
        return (counts[-1] - counts[0]) / span if span > 0 else 0.0
    rates.sort()
    return sum(rates[1:-1]) / (len(rates) - 2)


def settle_for(interval: float) -> float:
    """Seconds at the start of a look of ``interval`` that are not judged: a change takes hold."""
    if interval < RAMP_INTERVAL:  # the first look: one tick for the start to take hold
        return LOOK_TICK
    return RAMP_SETTLE if interval <= RAMP_INTERVAL else interval / 2


class Cadence:
    """When each queue's controller looks next: ``due[queue]`` is (when it last looked, seconds
    until the next look). A new queue looks FIRST_LOOK after the loop first sees it (the start
    is a change of load), and so does a queue whose last look saw nothing waiting and nothing
    in flight once work reaches it (a burst after a quiet spell: at CONTROL_INTERVAL it might be
    over before its first look); otherwise the controller says (``Controller.next_look``). Pure.
    """

    def __init__(self) -> None:
        self.due: dict[str, tuple[float, float]] = {}
        #: queues whose last look saw no work
        self.idle: set[str] = set()

    def tick(self, now: float, names: Iterable[str], in_flight: Mapping[str, int]) -> list[str]:
        """The queues due for a look at ``now`` (within half a tick), after taking in the new
        ones and the idle ones that have work in flight now."""
        for name in names:
            self.due.setdefault(name, (now, FIRST_LOOK))
        for name in [n for n in self.idle if in_flight.get(n, 0) > 0]:
            self.idle.discard(name)
            self.due[name] = (now, FIRST_LOOK)
        return [n for n, (at, wait) in self.due.items() if now - at >= wait - LOOK_TICK / 2]

    def saw(self, name: str, *, backlog: int, in_flight: int) -> None:
        """What a look at ``name`` found: no work at all makes it idle until work comes."""
        if backlog == 0 and in_flight == 0:
            self.idle.add(name)
        else:
            self.idle.discard(name)
