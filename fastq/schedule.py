"""Periodic schedules (``@app.periodic``): what they are, and when they fire. Values and pure math
only; the loop that enqueues the ticks is ``fastq.engine.scheduler``'s.

A tick is a fire time in epoch seconds, the same on every host: ``every=`` ticks are the
multiples of the period counted from the Unix epoch (``every=timedelta(minutes=5)`` fires at
:00, :05, ...), ``cron=`` ticks are the expression's matches in ``timezone`` (cronsim, imported
only when a cron schedule is made). Because every supervisor computes the same ticks, the broker
can enqueue each one once (``Broker.publish_tick``).

Ticks missed while no scheduler ran (every supervisor down) follow ``catch_up``: ``"skip"``
none of them, ``"latest"`` the last one, ``"all"`` each one (at most ``MAX_CATCH_UP``). A tick is
missed when it is later than the last tick enqueued and earlier than the start of the scheduler
that finds it; ticks from its start on are always enqueued.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Iterator
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from fastq.errors import ConfigError

CatchUp = Literal["skip", "latest", "all"]
CATCH_UPS = ("skip", "latest", "all")
#: the most missed ticks that ``catch_up="all"`` enqueues at once (the latest ones)
MAX_CATCH_UP = 1000
#: the shortest ``every=`` period, in seconds
MIN_EVERY = 1.0
#: the header that carries a periodic message's tick (epoch seconds, ``repr`` of a float)
TICK_HEADER = "fastq-tick"


class Schedule(msgspec.Struct, frozen=True):
    """One periodic task: its task's name, when it fires, and what it is sent with."""

    #: the task's name: also the schedule's name at the broker
    name: str
    #: a five-field cron expression, or None for ``every``
    cron: str | None = None
    #: the period in seconds, or None for ``cron``
    every: float | None = None
    timezone: str = "UTC"
    catch_up: CatchUp = "latest"
    #: the fixed arguments every tick sends
    args: tuple[Any, ...] = ()

    def next_after(self, t: float) -> float:
        """The first tick strictly after ``t`` (epoch seconds)."""
        if self.every is not None:
            return (t // self.every + 1) * self.every
        for fire in self._cron_from(t):
            if fire > t:
                return fire
        raise AssertionError("unreachable: cronsim iterates forever")  # pragma: no cover

    def latest_at(self, t: float) -> float:
        """The last tick at or before ``t``."""
        if self.every is not None:
            return (t // self.every) * self.every
        back = 3600.0  # look back an hour, then twice as far, until a tick lies in between
        while back < 800 * 86400:
            found = None
            for fire in self._cron_from(t - back):
                if fire > t:
                    break
                found = fire
            if found is not None:
                return found
            back *= 2
        raise ConfigError(f"periodic {self.name}: cron {self.cron!r} never fires")

    def before(self, tick: float) -> float:
        """The tick before ``tick``."""
        if self.every is not None:
            return tick - self.every
        return self.latest_at(tick - 0.001)

    def _cron_from(self, t: float) -> Iterator[float]:
        assert self.cron is not None
        from cronsim import CronSim  # lazily: `import fastq` stays light

        start = dt.datetime.fromtimestamp(t, ZoneInfo(self.timezone)).replace(microsecond=0)
        for fire in CronSim(self.cron, start - dt.timedelta(seconds=1)):
            yield fire.timestamp()

    def fires(self, after: float, count: int = 3) -> list[float]:
        """The next ``count`` ticks after ``after``."""
        out: list[float] = []
        t = after
        for _ in range(count):
            t = self.next_after(t)
            out.append(t)
        return out

    def describe(self) -> str:
        if self.every is not None:
            return f"every {self.every:g} s"
        return f"cron {self.cron!r} ({self.timezone})"

    def message_id(self, tick: float) -> str:
        """The id of the message of ``tick``: 32 hex as any fastq id, the same on every host (a
        duplicate after a crash is recognisably the same tick): the tick in milliseconds, then
        a digest of the schedule's name."""
        digest = hashlib.blake2b(self.name.encode(), digest_size=8).hexdigest()
        return f"{round(tick * 1000):016x}{digest}"


def tick_of(message_id: str) -> float:
    """The tick (epoch seconds) a periodic message's id carries (``Schedule.message_id``)."""
    return int(message_id[:16], 16) / 1000


def due(schedule: Schedule, last: float | None, now: float, started: float) -> list[float]:
    """The ticks to enqueue at ``now``, oldest first, given the ``last`` tick enqueued (None:
    never) and when this scheduler ``started``: each tick from ``started`` to ``now`` later
    than ``last`` (on time), and of the earlier ones later than ``last`` (missed while no
    scheduler ran) what ``catch_up`` says. At most ``MAX_CATCH_UP`` of each."""
    out: list[float] = []
    if last is not None and schedule.catch_up != "skip":
        keep = 1 if schedule.catch_up == "latest" else MAX_CATCH_UP
        t = schedule.latest_at(min(now, started - 0.001))
        while t > last and len(out) < keep:
            out.append(t)
            t = schedule.before(t)
        out.reverse()
    floor = started if last is None else max(started, last + 0.001)
    t = schedule.next_after(floor - 0.001)
    on_time = 0
    while t <= now and on_time < MAX_CATCH_UP:
        out.append(t)
        on_time += 1
        t = schedule.next_after(t)
    return out


def build(
    name: str,
    *,
    cron: str | None,
    every: float | dt.timedelta | None,
    timezone: str,
    catch_up: str,
    args: tuple[Any, ...],
) -> Schedule:
    """A checked Schedule.

    Raises:
        ConfigError: neither or both of cron and every, a bad expression, an unknown time zone,
            an ``every`` under ``MIN_EVERY``, or an unknown ``catch_up`` (each says which).
    """
    where = f"@app.periodic on {name}"
    if (cron is None) == (every is None):
        raise ConfigError(
            f"{where}: expected one of cron= or every=, got "
            f"{'both' if cron is not None else 'neither'}; pass cron='*/5 * * * *' or "
            "every=timedelta(minutes=5)"
        )
    if catch_up not in CATCH_UPS:
        raise ConfigError(f"{where}: catch_up must be 'skip', 'latest' or 'all', got {catch_up!r}")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{where}: unknown timezone {timezone!r}; give an IANA name such as 'UTC' or "
            "'Europe/Paris'"
        ) from None
    seconds: float | None = None
    if every is not None:
        seconds = every.total_seconds() if isinstance(every, dt.timedelta) else float(every)
        if seconds < MIN_EVERY:
            raise ConfigError(f"{where}: every must be at least {MIN_EVERY:g} s, got {seconds:g} s")
    if cron is not None:
        from cronsim import CronSim, CronSimError

        try:
            CronSim(cron, dt.datetime.now(ZoneInfo(timezone)))
        except CronSimError as e:
            raise ConfigError(
                f"{where}: cron {cron!r} is not a cron expression ({e}); expected five fields, "
                "minute hour day-of-month month day-of-week, e.g. '*/5 * * * *'"
            ) from None
    return Schedule(name, cron, seconds, timezone, catch_up, args)  # type: ignore[arg-type]


def delay_of(
    task: str, delay: float | None, eta: dt.datetime | None, now: float | None = None
) -> float:
    """The seconds a send waits before it may run, from ``send(delay=...)`` or ``eta=...`` (a
    past ``eta``: 0, it runs at once).

    Raises:
        ConfigError: both given, a negative or non-number ``delay``, or an ``eta`` that is not a
            timezone-aware datetime.
    """
    if delay is not None and eta is not None:
        raise ConfigError(f"{task}.send: expected delay= or eta=, got both; pass one")
    if eta is not None:
        if not isinstance(eta, dt.datetime):
            raise ConfigError(
                f"{task}.send: eta must be a datetime, got {type(eta).__name__}; "
                "pass delay= for seconds"
            )
        if eta.tzinfo is None or eta.utcoffset() is None:
            raise ConfigError(
                f"{task}.send: eta must be timezone-aware, got the naive {eta.isoformat()}; "
                "attach its zone, e.g. eta.replace(tzinfo=datetime.timezone.utc)"
            )
        now = time.time() if now is None else now
        return max(0.0, eta.timestamp() - now)
    if delay is None:
        return 0.0
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not delay >= 0:
        raise ConfigError(f"{task}.send: delay must be seconds >= 0, got {delay!r}")
    return float(delay)
