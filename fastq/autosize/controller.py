"""The controller: from the starting plan, follow the load (ARCHITECTURE.md, "Sizing").

Pure: the supervisor's tuning loop (fastq.engine.tuning) measures, this module decides. Each
queue has a ``Controller``; ``share_slots`` splits the host among the busy queues first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Literal

import msgspec

from fastq.autosize.look import CONTROL_INTERVAL, RAMP_INTERVAL, RAMP_SETTLE, Sample
from fastq.autosize.plan import (
    CPU_PREFETCH_FACTOR,
    IO_CONCURRENCY_MAX,
    IO_PREFETCH_FACTOR,
    QueuePlan,
)

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


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    concurrency: int
    prefetch: int
    #: why it changed, in words; empty when nothing did
    reason: str = ""
    #: which rule decided it: a method of ``RULES``, or "cap", "reclassify", "start"
    rule: str = ""


class Controller:
    """Moves one queue's concurrency and prefetch with the load, within the documented bounds.

    Once per look, ``step`` applies the first rule of ``RULES`` that fits (each is a method
    below, with its own docstring): memory short; an increase that did not pay; a jump sized by
    idle cores that paid less than half of itself; a decrease that lost throughput on idle
    cores, or on saturated ones; saturated cores; a CPU queue's prefetch deeper than its
    handlers' time allows; a backlog waiting (more concurrency, the prefetch factor to its
    largest with it; at the concurrency's ceiling, the factor alone). A
    ceiling (kept apart for concurrency and for prefetch, so that one that stopped paying
    leaves the other to try) holds until the load changes (throughput moves by a quarter) or
    PROBE_AFTER intervals pass, when one doubling is tried again; decreases hold increases for
    COOLDOWN intervals.
    So it settles instead of swinging, and a value the user set never moves. ``cap`` applies
    the queue's share of the host (``share_slots``), ``reclassify`` a kind measured at run time,
    and ``next_look`` says when to look again: sooner after an increase.
    """

    def __init__(
        self,
        queue: QueuePlan,
        *,
        user_concurrency: bool = False,
        user_prefetch: bool = False,
        concurrency_max: int | None = None,
        shallow: bool = False,
    ) -> None:
        self.kind = queue.kind
        self.concurrency, self.prefetch = queue.concurrency, queue.prefetch
        #: the user set the concurrency: nothing moves it (fixed_concurrency also covers CPU work)
        self.user_fixed = user_concurrency
        #: a CPU queue's handlers when it has the cores it runs on to itself (its share may be less)
        self.cpu_cores = queue.concurrency
        self.fixed_prefetch = user_prefetch
        #: the most I/O handlers the steps may reach: the formula's ceiling, or the host's
        #: (the engine passes Config.io_concurrency_ceiling)
        self.ceiling = concurrency_max or IO_CONCURRENCY_MAX
        self.min_concurrency = 1 if self.kind == "io" else queue.concurrency
        self.max_concurrency = queue.concurrency if self.fixed_concurrency else self.ceiling
        bounds = queue.options
        if not self.fixed_concurrency:  # the user's bounds (checked against each other already)
            self.min_concurrency = max(self.min_concurrency, bounds.min_concurrency or 1)
            self.max_concurrency = min(
                self.max_concurrency, bounds.max_concurrency or self.max_concurrency
            )
            self.max_concurrency = max(self.max_concurrency, self.min_concurrency)
        self.min_prefetch = bounds.min_prefetch or 1
        self.max_prefetch = bounds.max_prefetch or (1 << 62)
        if not self.fixed_concurrency:  # handlers beyond what may be delivered would idle
            self.max_concurrency = max(
                self.min_concurrency, min(self.max_concurrency, self.max_prefetch)
            )
        self.user_max_concurrency = bounds.max_concurrency
        #: past the formula's IO_CONCURRENCY_MAX I/O handlers, the prefetch factor applies to
        #: those 100 only (the broker pays for what is delivered and unsettled: RabbitMQ)
        self.shallow = shallow
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
            return Decision(
                concurrency=new,
                prefetch=self.prefetch,
                reason=f"its share of the host's {self.cpu_cores} cores beside the other busy "
                "queues is "
                f"{ceiling}: concurrency {'down' if new < old else 'up'} to {new}",
                rule="cap",
            )
        user_max = self.user_max_concurrency or self.ceiling
        self.max_concurrency = max(self.min_concurrency, min(user_max, ceiling))
        if self.concurrency <= self.max_concurrency:
            return Decision(concurrency=self.concurrency, prefetch=self.prefetch)
        self.concurrency = self.max_concurrency
        self._forget_step()
        self.prefetch = self._prefetch_for(self.concurrency)
        return Decision(
            concurrency=self.concurrency,
            prefetch=self.prefetch,
            reason=f"its share of the host's handlers is {ceiling}: concurrency down to "
            f"{self.concurrency}",
            rule="cap",
        )

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
                self.concurrency = self.cpu_cores = max(
                    1, min(cores, self.user_max_concurrency or cores)
                )
                self.min_concurrency = self.max_concurrency = self.concurrency
            self.factor_min = self.factor = CPU_PREFETCH_FACTOR
            self.factor_max = CPU_PREFETCH_FACTOR_MAX
            self.capped = dict.fromkeys(self.capped, False)
            self.raised = self.lowered = False
            self.cooldown = COOLDOWN
            self.prefetch = self._prefetch_for(self.concurrency)
        return Decision(
            concurrency=self.concurrency,
            prefetch=self.prefetch,
            reason=f"measured {kind}-bound" if kind == self.kind else "",
            rule="reclassify",
        )

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

    def start(self, backlog: int) -> Decision:
        """Before the first look: a backlog that the formula's prefetch cannot hold met an I/O
        queue on cores that do nothing yet. Its concurrency goes at once as far as the backlog
        can feed (``ramp`` of idle cores: up to its maximum, the host's ceiling in the engine,
        IO_CONCURRENCY_MAX by default), so that a burst is not over before the first look. No
        rate came before it, so no look can say it did not pay: it stands as a setting the
        steps reached would, under the rules that follow (saturated cores halve it, memory
        pressure lowers it). Nothing moves without a backlog: a steady load starts where the
        formula says."""
        if self.kind != "io" or self.fixed_concurrency or backlog <= self.prefetch:
            return Decision(concurrency=self.concurrency, prefetch=self.prefetch)
        c = self.concurrency
        new = min(self.max_concurrency, max(c + 1, int(c * ramp(0.0, backlog / max(c, 1)))))
        if new <= c:
            return Decision(concurrency=c, prefetch=self.prefetch)
        self.concurrency, self.prefetch = new, self._prefetch_for(new)
        self.before = (new, self.factor)
        return Decision(
            concurrency=new,
            prefetch=self.prefetch,
            reason=f"{backlog} messages wait at the start: concurrency +{new - c}",
            rule="start",
        )

    def step(self, s: Sample) -> Decision:
        """The concurrency and prefetch for the next interval, given what this one looked like:
        the first of ``RULES`` that applies decides (``None`` from a rule: not its case)."""
        look = self._observe(s)
        name = ""
        for rule in self.RULES:
            change = rule(self, s, look)
            if change is not None:
                name = rule.__name__
                break
        else:
            change = (self.concurrency, self.prefetch, "")
        self.concurrency, self.prefetch, reason = change
        return Decision(
            concurrency=self.concurrency, prefetch=self.prefetch, reason=reason, rule=name
        )

    def _observe(self, s: Sample) -> _Look:
        """Book-keeping before the rules: what the last step was, the cooldown, the memory cap,
        and the ceilings' age (forgotten when the load changes; probed when they are old)."""
        look = _Look(last=self.last, raised=self.raised, lowered=self.lowered)
        self.last, self.raised, self.lowered = s, False, False
        last = look.last
        # the last increase paid by STRONG_GAIN or more: the next may be larger (slow start)
        look.strong = (
            look.raised
            and last is not None
            and last.throughput > 0
            and s.throughput >= last.throughput * (1 + STRONG_GAIN)
        )
        if self.cooldown:
            self.cooldown -= 1
        if self.memory_cap is not None and s.memory_headroom >= 2 * MEMORY_HEADROOM_MIN:
            self.memory_cap = None  # memory is back (with a margin, so as not to swing)
        if any(self.capped.values()):
            self.ceiling_age += 1
            if abs(s.throughput - self.ceiling_throughput) > 0.25 * self.ceiling_throughput:
                self.capped = dict.fromkeys(self.capped, False)  # the load changed
                self.probing = False
            elif (
                self.ceiling_age > PROBE_AFTER
            ):  # time to try one step up again: a doubling at most
                self.capped = dict.fromkeys(self.capped, False)
                self.probing = True
        if s.backlog == 0:
            self.probing = False  # a probe is for a load that waits; the next one climbs afresh
        return look

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
        self.factor = self.factor_max = bound
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
        if self.kind == "cpu":  # how far its prefetch may go depends on its handlers' time
            bound = cpu_factor_max(s, c)
            # past x 3, by twice at least: one look's noise is no reason for a new consumer
            if self.factor <= CPU_PREFETCH_FACTOR_MAX or bound >= 2 * self.factor:
                self.factor_max = bound
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
                self.factor = self.factor_max
            p = self._prefetch_for(c)
            reason = (
                f"cores {s.busy:.0%} busy while {s.backlog} messages wait: "
                f"concurrency +{c - self.concurrency}"
            )
            self.raised = True
        elif (
            not self.fixed_prefetch
            and self.factor < self.factor_max
            and not self.capped["prefetch"]
        ):
            # Straight to the largest factor: the gain of larger batches flattens out, and a
            # step of +1 (x5 to x6) would pay less than the noise of one look.
            self.factor = self.factor_max
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

    RULES: ClassVar[tuple[Callable[[Controller, Sample, _Look], _Change | None], ...]] = (
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
