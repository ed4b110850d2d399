"""Scheduling's pure parts: next-fire math for cron and every, time zones, catch_up, the
delay of a send, and the ConfigErrors of @app.periodic, send(eta=...) and reserved names."""

from __future__ import annotations

import asyncio
import datetime as dt
from zoneinfo import ZoneInfo

import pytest

import fastq
from fastq.errors import ConfigError
from fastq.schedule import MAX_CATCH_UP, Schedule, delay_of, due, tick_of

UTC = dt.UTC


def ts(*args: int, tz: dt.tzinfo = UTC) -> float:
    return dt.datetime(*args, tzinfo=tz).timestamp()


# -- next fire ---------------------------------------------------------------------------------


def test_every_ticks_are_multiples_of_the_period_from_the_epoch():
    s = Schedule("t", every=300.0)
    assert s.next_after(ts(2026, 12, 7, 3, 2)) == ts(2026, 12, 7, 3, 5)
    assert s.next_after(ts(2026, 12, 7, 3, 5)) == ts(2026, 12, 7, 3, 10)  # strictly after
    assert s.latest_at(ts(2026, 12, 7, 3, 5)) == ts(2026, 12, 7, 3, 5)  # at or before
    assert s.fires(ts(2026, 12, 7, 3, 2)) == [ts(2026, 12, 7, 3, m) for m in (5, 10, 15)]


def test_cron_next_fires_and_latest():
    s = Schedule("t", cron="*/5 * * * *")
    assert s.fires(ts(2026, 12, 7, 3, 2, 30)) == [ts(2026, 12, 7, 3, m) for m in (5, 10, 15)]
    assert s.next_after(ts(2026, 12, 7, 3, 5)) == ts(2026, 12, 7, 3, 10)
    assert s.latest_at(ts(2026, 12, 7, 3, 7)) == ts(2026, 12, 7, 3, 5)
    assert s.before(ts(2026, 12, 7, 3, 5)) == ts(2026, 12, 7, 3, 0)
    daily = Schedule("d", cron="30 4 * * *")
    assert daily.latest_at(ts(2026, 12, 7, 3, 0)) == ts(2026, 12, 6, 4, 30)  # yesterday's


def test_cron_reads_its_timezone_across_daylight_saving():
    paris = ZoneInfo("Europe/Paris")
    s = Schedule("t", cron="0 9 * * *", timezone="Europe/Paris")
    # Given the spring change on 2026-03-29, when the next 9:00s are asked, then they are 9:00
    # Paris time on both sides (08:00 UTC, then 07:00 UTC)
    fires = s.fires(ts(2026, 3, 28, 12, 0, tz=paris))
    assert fires == [ts(2026, 3, d, 9, 0, tz=paris) for d in (29, 30, 31)]
    assert fires[0] - ts(2026, 3, 29, 7, 0) == 0
    assert Schedule("u", cron="0 9 * * *").next_after(ts(2026, 3, 28, 12)) == ts(2026, 3, 29, 9)


# -- catch_up ----------------------------------------------------------------------------------


def sched(catch_up: str) -> Schedule:
    return Schedule("t", every=10.0, catch_up=catch_up)  # type: ignore[arg-type]


@pytest.mark.parametrize("catch_up", ["skip", "latest", "all"])
def test_on_time_ticks_are_enqueued_whatever_catch_up(catch_up):
    # Given a scheduler that started at 98.2 and enqueued 90, when it looks at 100.5, then 100
    assert due(sched(catch_up), 90.0, 100.5, 98.2) == [100.0]
    # and nothing more at 105, once 100 is enqueued
    assert due(sched(catch_up), 100.0, 105.0, 98.2) == []


def test_a_new_schedule_starts_with_its_first_tick_after_the_start():
    assert due(sched("all"), None, 98.5, 98.2) == []
    assert due(sched("all"), None, 100.0, 98.2) == [100.0]


@pytest.mark.parametrize(
    ("catch_up", "expected"),
    [("skip", [100.0]), ("latest", [90.0, 100.0]), ("all", [60.0, 70.0, 80.0, 90.0, 100.0])],
)
def test_ticks_missed_while_every_scheduler_was_down(catch_up, expected):
    # Given tick 50 enqueued, then every supervisor down until 98.2, when the one that starts
    # looks at 100.5, then the missed 60..90 follow catch_up and 100 (on time) is enqueued
    assert due(sched(catch_up), 50.0, 100.5, 98.2) == expected


def test_catch_up_all_is_capped():
    out = due(sched("all"), 0.0, 1e9, 1e9)
    assert len(out) == MAX_CATCH_UP + 1
    assert out[-2:] == [1e9 - 10, 1e9]


def test_a_tick_message_carries_its_tick():
    s = Schedule("shop.report", every=1.0)
    mid = s.message_id(1765000000.0)
    assert len(mid) == 32 and tick_of(mid) == 1765000000.0
    assert s.message_id(1765000000.0) == mid != s.message_id(1765000001.0)


# -- delays ------------------------------------------------------------------------------------


def test_delay_and_eta():
    assert delay_of("t", None, None) == 0.0
    assert delay_of("t", 2.5, None) == 2.5
    eta = dt.datetime(2026, 12, 7, 3, 0, 10, tzinfo=UTC)
    assert delay_of("t", None, eta, now=ts(2026, 12, 7, 3, 0)) == 10.0
    assert delay_of("t", None, eta, now=ts(2026, 12, 7, 4, 0)) == 0.0  # past: at once


def test_naive_eta_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"^t\.send: eta must be timezone-aware, got the naive 2026-12-07T03:00:00; attach "
        r"its zone, e\.g\. eta\.replace\(tzinfo=datetime\.timezone\.utc\)$",
    ):
        delay_of("t", None, dt.datetime(2026, 12, 7, 3, 0))


def test_bad_delays_are_refused():
    with pytest.raises(
        ConfigError, match=r"^t\.send: expected delay= or eta=, got both; pass one$"
    ):
        delay_of("t", 1.0, dt.datetime.now(UTC))
    with pytest.raises(ConfigError, match=r"^t\.send: delay must be seconds >= 0, got -1$"):
        delay_of("t", -1, None)


# -- the API's ConfigErrors --------------------------------------------------------------------


def test_send_with_a_naive_eta_sends_nothing():
    app = fastq.App("sched-test", broker="memory://sched-naive")

    @app.task(name="job")
    def job(n: int) -> None: ...

    with pytest.raises(ConfigError, match=r"^job\.send: eta must be timezone-aware, got the naive"):
        job.send(1, eta=dt.datetime(2026, 12, 7, 3, 0))
    with pytest.raises(ConfigError, match=r"^job\.send: eta must be timezone-aware"):
        asyncio.run(job.send_async(1, eta=dt.datetime(2026, 12, 7, 3, 0)))
    assert asyncio.run(app.queue_depth("default")).ready == 0


@pytest.mark.parametrize("name", ["delay", "eta", "unique_key", "connection"])
def test_a_parameter_named_as_a_send_option_is_refused(name):
    app = fastq.App("sched-test", broker="memory://")
    fn = eval(f"lambda {name}: None")
    with pytest.raises(
        ConfigError,
        match=rf"^task t: parameter '{name}' has the name of one of send\(\)'s own options "
        rf"\('delay', 'eta', 'unique_key', 'connection'\); rename the parameter "
        rf"\(e\.g\. {name}_\)$",
    ):
        app.task(name="t")(fn)


def test_periodic_configerrors():
    app = fastq.App("sched-test", broker="memory://")

    @app.task(name="noargs")
    def noargs() -> None: ...

    @app.task(name="takes")
    def takes(n: int) -> None: ...

    with pytest.raises(
        ConfigError,
        match=r"^@app\.periodic on noargs: expected one of cron= or every=, got neither; pass "
        r"cron='\*/5 \* \* \* \*' or every=timedelta\(minutes=5\)$",
    ):
        app.periodic()(noargs)
    with pytest.raises(ConfigError, match=r"^@app\.periodic on noargs: cron 'bad' is not a cron"):
        app.periodic(cron="bad")(noargs)
    with pytest.raises(
        ConfigError, match=r"^@app\.periodic on noargs: unknown timezone 'Mars/Olympus'; give"
    ):
        app.periodic(cron="* * * * *", timezone="Mars/Olympus")(noargs)
    with pytest.raises(
        ConfigError, match=r"^@app\.periodic on noargs: every must be at least 1 s, got 0\.5 s$"
    ):
        app.periodic(every=0.5)(noargs)
    with pytest.raises(
        ConfigError,
        match=r"^@app\.periodic on noargs: catch_up must be 'skip', 'latest' or 'all', got 'x'$",
    ):
        app.periodic(every=1, catch_up="x")(noargs)
    with pytest.raises(ConfigError, match=r"^@app\.periodic on takes: args=\(\) do not fit"):
        app.periodic(every=1)(takes)
    app.periodic(every=dt.timedelta(minutes=1), args=(3,))(takes)
    assert app.schedules["takes"].every == 60.0 and app.schedules["takes"].args == (3,)
    with pytest.raises(ConfigError, match=r"^task takes is periodic already; one schedule a task$"):
        app.periodic(every=1, args=(3,))(takes)
    with pytest.raises(ConfigError, match=r"^@app\.periodic goes above @app\.task, got function"):
        app.periodic(every=1)(lambda: None)  # type: ignore[arg-type]


def test_unique_without_a_place_for_keys_says_what_to_configure():
    app = fastq.App("sched-test", broker="amqp://guest:guest@127.0.0.1:1/")

    @app.task(name="u", unique=True)
    def u(n: int) -> None: ...

    with pytest.raises(
        ConfigError,
        match=r"^task u: a unique send needs a place that keeps the keys; "
        r"amqp://guest:\*\*\*@127\.0\.0\.1:1/ keeps none: give the App a result store, "
        r"App\(\.\.\., result_store='sqlite:///results\.db'\)$",
    ):
        u.send(1)


def test_a_sends_delay_on_rabbitmq_is_rounded_up_never_down():
    from fastq.broker.amqp.connection import retry_queue

    assert retry_queue("q", 1.5, send=True) == ("q.retry.1500", 1500)
    assert retry_queue("q", 1.2345, send=True) == ("q.retry.1240", 1240)  # up: never early
    assert retry_queue("q", 3599.01, send=True) == ("q.retry.3600000", 3600000)
    assert retry_queue("q", 1.2345) == ("q.retry.1200", 1200)  # a retry's: two digits, nearest


def test_a_tick_passes_the_before_send_hooks_and_keeps_its_own_id():
    from fastq import message
    from fastq.middleware import Middleware, Sending

    seen: list[tuple[str, str, dict[str, str]]] = []

    class Stamp(Middleware):
        def before_send(self, sending: Sending) -> None:
            seen.append((sending.task, sending.message_id, dict(sending.headers)))
            sending.headers["x-stamp"] = "1"
            sending.message_id = "a hook's own id"  # a tick's id is what makes it once: kept

    app = fastq.App("ticks", broker="memory://ticks-hooks", middleware=[Stamp()])

    @app.periodic(every=60.0)
    @app.task(name="report")
    def report() -> None: ...

    sched = app.schedules["report"]
    made = report.tick_message(sched, 1765000000.0)
    envelope = message.decode(made.body)
    assert seen == [("report", sched.message_id(1765000000.0), {"fastq-tick": "1765000000.0"})]
    assert made.message_id == envelope.id == sched.message_id(1765000000.0)
    assert envelope.headers == {"fastq-tick": "1765000000.0", "x-stamp": "1"}


def test_a_before_send_hook_that_raises_holds_back_its_own_schedule_only(caplog):
    import asyncio

    from fastq.engine.scheduler import Scheduler
    from fastq.middleware import Middleware, Sending

    class Picky(Middleware):
        def before_send(self, sending: Sending) -> None:
            if sending.task == "bad":
                raise RuntimeError("no tenant")

    app = fastq.App("picky", broker="memory://ticks-picky", middleware=[Picky()])

    @app.periodic(every=10.0, catch_up="all")
    @app.task(name="bad")
    def bad() -> None: ...

    @app.periodic(every=10.0, catch_up="all")
    @app.task(name="good")
    def good() -> None: ...

    async def look() -> Scheduler:
        await app.broker.open()
        sched = Scheduler(app, app.broker)
        sched.started = 1765000000.0
        await sched.look(1765000035.0)
        ready.append((await app.broker.queue_depth("default")).ready)
        return sched

    from fastq.schedule import due

    ready: list[int] = []
    sched = asyncio.run(look())
    # Then "good" got every due tick; "bad" none, its first tick still due, and said why
    ticks = list(due(app.schedules["good"], None, 1765000035.0, 1765000000.0))
    assert len(ticks) >= 3 and ticks[-1] == 1765000030.0
    assert sched.enqueued == len(ticks)
    assert sched.last == {"bad": None, "good": 1765000030.0}
    assert ready == [len(ticks)] and good.queue == bad.queue == "default"  # good's only
    assert f"making bad's message for tick {ticks[0]:.3f} failed" in caplog.text
    assert "no tenant" in caplog.text
