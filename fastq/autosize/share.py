"""How the host's handlers and cores are shared among the busy queues, before each queue's
controller steps within its share. Pure."""

from __future__ import annotations

import math

from fastq.autosize.plan import IO_CONCURRENCY_MAX


def share_slots(
    weights: dict[str, float],
    demand: dict[str, bool],
    budget: int = IO_CONCURRENCY_MAX,
    floors: dict[str, int] | None = None,
    cores: dict[str, int] | None = None,
    pressing: set[str] | None = None,
) -> dict[str, int]:
    """What each queue may have at once now, host-wide, from its weight and who has demand (a
    backlog, or work in flight). Pure.

    I/O queues split ``budget`` handlers in proportion to the weights of the I/O queues with
    demand; one without keeps only its floor (its minimum, at least 1), so that its share goes
    to the busy ones; when no other I/O queue has demand, there is nobody to give it to, and an
    idle one keeps the whole budget (a lone queue that drained, or whose messages another host
    holds for now, must not meet its next burst with one handler). CPU queues (``cores``: each
    one's name and the cores it runs on) share the cores instead, weighed against every other
    queue that presses for them: CPU queues with demand, and the others in ``pressing`` (work
    waiting at the broker of late: they do not keep up; default: those with demand). A busy CPU
    queue gets its weight's share of its cores, rounded, at least one; an idle one, or one that
    nobody presses, keeps them all (an I/O queue that keeps up with a trickle needs no core of
    its own).
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
            caps[q] = (
                max(1, min(own, math.floor(own * weight / contending + 0.5))) if q in busy else own
            )
            continue
        if q in busy:
            share = int(budget * weight / total_io)
        else:
            share = budget if total_io == 0 else 0
        caps[q] = max(floors.get(q, 1), share, 1)
    return caps
