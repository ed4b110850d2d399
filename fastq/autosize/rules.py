"""The controller's rules (ARCHITECTURE.md, "Sizing"): what one look at a queue decides, given
the step before it. Pure. ``Rules`` holds a queue's state as the rules read and move it, the
rules in order (``RULES``: the first that applies decides) and their helpers;
``fastq.autosize.controller.Controller`` builds that state from the plan and drives a look.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Literal

from fastq.autosize.look import Sample
from fastq.autosize.plan import IO_CONCURRENCY_MAX

#: (concurrency, prefetch, reason): what a rule decided ("" when nothing changed)
_Change = tuple[int, int, str]

#: share of the cores an increase of I/O concurrency aims at, from how busy they are now:
#: with idle cores it grows at once by as much as should fill them to this, as far as the
#: backlog can feed (``ramp``), never by less than x2
RAMP_TARGET = 0.75
#: an increase that raised throughput by this share or more is followed by x4 on busy cores
STRONG_GAIN = 0.20
IO_PREFETCH_FACTOR_MAX = 10
CPU_PREFETCH_FACTOR_MAX = 3
#: past x 3, a CPU queue's prefetch may hold this many seconds of its handlers' work per handler
#: (a handler's time a message read as concurrency / throughput while work waits): short
#: handlers then wait for no round trip of the supervisor, and long ones hoard nothing more
CPU_BUFFER_SECONDS = 0.02
#: the largest CPU prefetch factor the buffer may reach (handlers of 1 ms or less)
CPU_PREFETCH_FACTOR_CEILING = 20
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


def cpu_factor_max(s: Sample, concurrency: int) -> int:
    """The largest CPU prefetch factor for handlers as fast as ``s`` shows them: x 3, or as many
    messages per handler as CPU_BUFFER_SECONDS of their work, up to CPU_PREFETCH_FACTOR_CEILING.
    Read only while work waits (a backlog keeps every handler busy, so throughput / concurrency
    is a handler's rate); else x 3."""
    if s.backlog <= 0 or s.throughput <= 0:
        return CPU_PREFETCH_FACTOR_MAX
    per_handler = s.throughput / max(concurrency, 1)
    return max(
        CPU_PREFETCH_FACTOR_MAX,
        min(CPU_PREFETCH_FACTOR_CEILING, int(CPU_BUFFER_SECONDS * per_handler)),
    )


class Rules:
    """A queue's sizing state and the rules that move it (a ``Controller`` sets it up)."""

    kind: Literal["io", "cpu"]
    concurrency: int
    prefetch: int
    #: the user set the concurrency (``fixed_concurrency`` also covers CPU work), the prefetch
    user_fixed: bool
    fixed_prefetch: bool
    min_concurrency: int
    max_concurrency: int
    min_prefetch: int
    max_prefetch: int
    #: past the formula's IO_CONCURRENCY_MAX I/O handlers, the prefetch factor applies to
    #: those 100 only (the broker pays for what is delivered and unsettled: RabbitMQ)
    shallow: bool
    factor: int
    #: the kind's largest prefetch factor (a CPU queue's may go past it: ``_largest_factor``)
    factor_max: int
    #: the memory cap of the plan, and a lower one while memory is short
    prefetch_cap: int
    memory_cap: int | None
    cooldown: int
    #: where raising concurrency, or the prefetch factor, stopped paying, and the throughput
    #: then; forgotten when the load changes (throughput moves by a quarter) or PROBE_AFTER
    #: intervals pass
    capped: dict[str, bool]
    ceiling_throughput: float
    ceiling_age: int
    probing: bool
    sized_by_idle: bool
    raised: bool
    lowered: bool
    #: what the last increase started from: (concurrency, factor)
    before: tuple[int, int]

    @property
    def fixed_concurrency(self) -> bool:
        """Concurrency the steps do not move: set by the user, or CPU work (one handler per
        core; only its share of the cores moves it, in ``cap``)."""
        return self.user_fixed or self.kind == "cpu"

    def _prefetch_for(self, concurrency: int) -> int:
        if self.fixed_prefetch:
            return self.prefetch
        cap = min(
            self.prefetch_cap, self.memory_cap if self.memory_cap is not None else self.prefetch_cap
        )
        # With ``shallow``, past the formula's IO_CONCURRENCY_MAX handlers what waits beyond them
        # stays what the formula's ceiling had: the factor covers the supervisor's round trip,
        # which that many handlers already span (5 ms handlers on RabbitMQ: 1,000 / 1,000 ran
        # ~30,000/s, the same handlers with 5,000-6,000 delivered ~23,000/s; on memory:// the
        # deeper prefetch paid instead, so it is the broker's cost, not the handlers')
        shallow = self.shallow and self.kind == "io"
        depth = min(concurrency, IO_CONCURRENCY_MAX) if shallow else concurrency
        prefetch = max(concurrency, min(depth * self.factor, cap))
        return min(max(prefetch, self.min_prefetch), self.max_prefetch)  # the user's bounds win

    def _largest_factor(self, s: Sample, concurrency: int) -> int:
        """The prefetch factor an increase goes to: the kind's largest, for a CPU queue what its
        handlers' time allows now (``cpu_factor_max``), past x 3 only when that is twice the
        factor or more (one look's noise is no reason for a new consumer)."""
        if self.kind != "cpu":
            return self.factor_max
        bound = cpu_factor_max(s, concurrency)
        return (
            bound if bound <= CPU_PREFETCH_FACTOR_MAX or bound >= 2 * self.factor else self.factor
        )

    def _ceiling(self, s: Sample, *dimensions: str) -> None:
        for dimension in dimensions:
            self.capped[dimension] = True
        self.ceiling_throughput, self.ceiling_age = s.throughput, 0

    # -- the rules, in order ---------------------------------------------------------------

    def memory_short(self, s: Sample, look: _Look) -> _Change | None:
        """1. Memory headroom under MEMORY_HEADROOM_MIN: halve prefetch (down to the
        concurrency; it stays capped until headroom is back to twice that), else, with prefetch
        at its floor, cut I/O concurrency by a quarter."""
        if s.memory_headroom >= MEMORY_HEADROOM_MIN:
            return None
        c, p, reason = self.concurrency, self.prefetch, ""
        if not self.fixed_prefetch and p > max(c, self.min_prefetch):
            self.memory_cap = max(c, p // 2)
            p = self._prefetch_for(c)
            reason = (
                f"memory headroom {s.memory_headroom:.0%} < {MEMORY_HEADROOM_MIN:.0%}: "
                "prefetch halved"
            )
        elif not self.fixed_concurrency and c > self.min_concurrency:
            c = max(self.min_concurrency, c * 3 // 4)
            p = min(p, self._prefetch_for(c))
            reason = (
                f"memory headroom {s.memory_headroom:.0%} with prefetch at its floor: "
                "concurrency cut by a quarter"
            )
        self.cooldown = COOLDOWN
        return c, p, reason

    def increase_did_not_pay(self, s: Sample, look: _Look) -> _Change | None:
        """2. The last increase did not pay (throughput grew by under GAIN): take it back,
        whole (a halving, when concurrency had doubled), and climb no further that way until
        the load changes: that is the ceiling."""
        last = look.last
        if not (look.raised and last is not None and s.throughput < last.throughput * (1 + GAIN)):
            return None
        c, p, reason = self.concurrency, self.prefetch, ""
        before_c, before_factor = self.before
        dimension = "concurrency" if c != before_c else "prefetch"
        undone = []
        if c != before_c:  # with the larger prefetch it brought, if any
            c = min(max(before_c, self.min_concurrency), self.max_concurrency)
            undone.append(f"concurrency back to {c}")
        if self.factor != before_factor:
            self.factor = before_factor
            undone.append(f"prefetch back to concurrency x {self.factor}")
        if undone:
            p = self._prefetch_for(c)
            reason = (
                f"throughput {s.throughput:,.0f}/s did not grow (latency "
                f"{s.latency * 1e3:.1f} ms): {', '.join(undone)}"
            )
        self._ceiling(s, dimension)
        self.cooldown = COOLDOWN
        return c, p, reason

    def jump_paid_less_than_half(self, s: Sample, look: _Look) -> _Change | None:
        """3. An increase sized by idle cores paid less than half of itself: the knee lies
        between. Keep twice the concurrency that carried the gain (Little's law), no more."""
        last, c = look.last, self.concurrency
        if not (look.raised and last is not None and last.throughput > 0 and self.sized_by_idle):
            return None
        before_c = self.before[0]
        if c <= max(self.min_concurrency, math.ceil(2 * before_c * s.throughput / last.throughput)):
            return None
        gained = s.throughput / last.throughput
        c = max(before_c + 1, math.ceil(2 * before_c * gained), self.min_concurrency)
        reason = (
            f"concurrency x{self.concurrency / before_c:.1f} raised throughput only "
            f"x{gained:.2f} (to {s.throughput:,.0f}/s): concurrency trimmed to {c}"
        )
        self._ceiling(s, "concurrency")
        return c, self._prefetch_for(c), reason

    def decrease_lost_on_idle_cores(self, s: Sample, look: _Look) -> _Change | None:
        """4. A decrease lost more than GAIN of throughput and left the cores under SATURATED:
        back to where it was, and no lower until the load changes. (On cores still saturated
        the loss is not the decrease's doing: a neighbour's load, or noise; seen on a loaded CI
        machine.)"""
        last = look.last
        if not (
            look.lowered
            and last is not None
            and s.throughput < last.throughput * (1 - GAIN)
            and s.busy < SATURATED
        ):
            return None
        c = min(max(self.before[0], self.min_concurrency), self.max_concurrency)
        # judged by the throughput it goes back to: the lost one would read as a changed load
        # once it is back, and the decrease would be tried again at once (a swing)
        self._ceiling(last, "down")
        self.cooldown = COOLDOWN
        return (
            c,
            self._prefetch_for(c),
            f"throughput fell to {s.throughput:,.0f}/s: concurrency back to {c}",
        )

    def decrease_lost_on_saturated_cores(self, s: Sample, look: _Look) -> _Change | None:
        """5. A decrease lost throughput, but the cores are as saturated as before: not the
        decrease's doing, so it stays; and it holds there, neither lower nor higher, until the
        load changes or the probe time passes (no swinging either way)."""
        last = look.last
        if not (look.lowered and last is not None and s.throughput < last.throughput * (1 - GAIN)):
            return None
        self._ceiling(s, "down", "concurrency")
        return self.concurrency, self.prefetch, ""

    def saturated(self, s: Sample, look: _Look) -> _Change | None:
        """6. Cores saturated (SATURATED busy or more) while work waits, at the broker or in
        this host (more in flight than handlers: the prefetch holds what the broker no longer
        counts): more at once only adds waiting (the work turned CPU-bound, say); halve I/O
        concurrency, and keep it while throughput holds (the multiplicative decrease)."""
        c = self.concurrency
        if not (
            s.busy >= SATURATED
            and (s.backlog > 0 or s.in_flight > c)
            and not self.cooldown
            and not self.fixed_concurrency
            and not look.raised
            and c > self.min_concurrency
            and not self.capped["down"]
        ):
            return None
        self.before = (c, self.factor)
        c = max(self.min_concurrency, c // 2)
        self.lowered = True
        return (
            c,
            self._prefetch_for(c),
            f"cores {s.busy:.0%} busy: concurrency down to {c} while throughput holds",
        )

    def cpu_buffer_too_deep(self, s: Sample, look: _Look) -> _Change | None:
        """7. A CPU queue's prefetch factor is twice what its handlers' time allows now or more
        (they got slower: ``cpu_factor_max``; twice, so that one slow look on a noisy machine
        does not swing it): down to that, so that no more than CPU_BUFFER_SECONDS of work waits
        per handler while other hosts could run it."""
        if self.kind != "cpu" or self.fixed_prefetch:
            return None
        bound = cpu_factor_max(s, self.concurrency)
        if s.backlog <= 0 or self.factor < 2 * bound:
            return None
        self.factor = bound
        self.before = (self.concurrency, self.factor)
        p = self._prefetch_for(self.concurrency)
        reason = (
            f"handlers take {self.concurrency / s.throughput * 1e3:.1f} ms a message: prefetch "
            f"down to concurrency x {bound} ({CPU_BUFFER_SECONDS * 1e3:g} ms of work a handler)"
        )
        return self.concurrency, p, reason

    def backlog_waits(self, s: Sample, look: _Look) -> _Change | None:
        """8. A backlog waits: each step is tried and kept only if it pays. With idle cores more
        at once should: I/O concurrency grows by ``ramp`` (sized by the idle cores and the
        backlog; x2 on busy cores; x4 after a step that paid STRONG_GAIN, never in a probe),
        and the prefetch factor goes to its largest with it unless that was a ceiling (short
        handlers are carried by what is in flight around the supervisor's round trip, not by
        handlers: a step that raised both and did not pay goes back whole). Past the
        concurrency's ceiling, larger batches (less overhead per message) may: the prefetch
        factor goes straight to its largest (a CPU queue's: x 3, or what CPU_BUFFER_SECONDS of
        its handlers' work holds, ``cpu_factor_max``)."""
        if not (s.backlog > 0 and not self.cooldown):
            return None
        probing, self.probing = self.probing, False  # a probe is this one step
        c, p, reason = self.concurrency, self.prefetch, ""
        self.before = (c, self.factor)
        largest = self._largest_factor(s, c)
        if (
            not self.fixed_concurrency
            and c < self.max_concurrency
            and not self.capped["concurrency"]
        ):
            jump = 2.0 if probing else ramp(s.busy, s.backlog / max(c, 1))
            self.sized_by_idle = jump > 2.0
            if jump == 2.0 and look.strong and not probing:  # busy cores, but each step paid well
                jump = 4.0
            c = min(self.max_concurrency, max(c + 1, int(c * jump)))
            if not self.fixed_prefetch and not self.capped["prefetch"] and not probing:
                self.factor = largest
            p = self._prefetch_for(c)
            reason = (
                f"cores {s.busy:.0%} busy while {s.backlog} messages wait: "
                f"concurrency +{c - self.concurrency}"
            )
            self.raised = True
        elif not self.fixed_prefetch and self.factor < largest and not self.capped["prefetch"]:
            # Straight to the largest factor: the gain of larger batches flattens out, and a
            # step of +1 (x5 to x6) would pay less than the noise of one look.
            self.factor = largest
            p = self._prefetch_for(c)
            if p > self.prefetch:
                reason = (
                    f"cores {s.busy:.0%} busy while {s.backlog} messages wait: "
                    f"prefetch to concurrency x {self.factor}"
                )
                self.raised = True
            else:  # the memory cap or the user's maximum: nothing to try
                self.factor = self.before[1]
                self._ceiling(s, "prefetch")
        return c, p, reason

    RULES: ClassVar[tuple[Callable[[Rules, Sample, _Look], _Change | None], ...]] = (
        memory_short,
        increase_did_not_pay,
        jump_paid_less_than_half,
        decrease_lost_on_idle_cores,
        decrease_lost_on_saturated_cores,
        saturated,
        cpu_buffer_too_deep,
        backlog_waits,
    )


class _Look:
    """What the step before this one was, for the rules."""

    __slots__ = ("last", "lowered", "raised", "strong")

    def __init__(self, last: Sample | None, raised: bool, lowered: bool) -> None:
        self.last, self.raised, self.lowered, self.strong = last, raised, lowered, False


def ramp(busy: float, fed: float = 2.0) -> float:
    """How many times I/O concurrency grows in one increase with the cores ``busy`` (0..1) and
    a backlog of ``fed`` times the handlers there are: enough to take the cores to RAMP_TARGET
    if each handler keeps its share of the CPU, but no more handlers than the backlog can keep
    busy; at least x2 (a jump that pays less than half of itself is trimmed at the next look)."""
    return max(2.0, min(RAMP_TARGET / max(busy, 1e-3), fed))
