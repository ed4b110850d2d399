"""The controller: from the starting plan, follow the load (ARCHITECTURE.md, "Sizing").

Pure: the supervisor's tuning loop (fastq.engine.tuning) measures, this module decides. Each
queue has a ``Controller``; ``share_slots`` splits the host among the busy queues first.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from fastq.autosize.look import CONTROL_INTERVAL, RAMP_INTERVAL, RAMP_SETTLE, Sample
from fastq.autosize.plan import (
    CPU_PREFETCH_FACTOR,
    IO_CONCURRENCY_MAX,
    IO_PREFETCH_FACTOR,
    QueuePlan,
)
from fastq.autosize.rules import (
    COOLDOWN,
    CPU_PREFETCH_FACTOR_MAX,
    IO_PREFETCH_FACTOR_MAX,
    MEMORY_HEADROOM_MIN,
    PROBE_AFTER,
    STRONG_GAIN,
    Rules,
    _Look,
    ramp,
)


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    concurrency: int
    prefetch: int
    #: why it changed, in words; empty when nothing did
    reason: str = ""
    #: which rule decided it: a method of ``RULES``, or "cap", "reclassify", "start"
    rule: str = ""


class Controller(Rules):
    """Moves one queue's concurrency and prefetch with the load, within the documented bounds.

    Once per look, ``step`` applies the first rule of ``RULES`` that fits (each a method of
    ``fastq.autosize.rules.Rules``, with its own docstring): memory short; an increase that did
    not pay; a jump sized by idle cores that paid less than half of itself; a decrease that
    lost throughput on idle cores, or on saturated ones; saturated cores; a CPU queue's
    prefetch deeper than its handlers' time allows; a backlog waiting (more concurrency, the
    prefetch factor to its largest with it; at the concurrency's ceiling, the factor alone). A
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
        self.shallow = shallow
        base = IO_PREFETCH_FACTOR if self.kind == "io" else CPU_PREFETCH_FACTOR
        self.factor = base
        self.factor_max = IO_PREFETCH_FACTOR_MAX if self.kind == "io" else CPU_PREFETCH_FACTOR_MAX
        self.prefetch_cap = queue.prefetch_cap
        self.memory_cap: int | None = None
        self.cooldown = 0
        self.last: Sample | None = None
        self.raised = False  # the last step was an increase
        self.capped = {"concurrency": False, "prefetch": False, "down": False}
        self.lowered = False  # the last step was a decrease on saturated cores
        self.ceiling_throughput = 0.0
        self.ceiling_age = 0
        self.probing = False  # the next increase tries a ceiling again
        self.sized_by_idle = False  # the last increase was sized by how idle the cores were
        self.before = (self.concurrency, self.factor)  # what the last increase started from

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
            self.factor = CPU_PREFETCH_FACTOR
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
