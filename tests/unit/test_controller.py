"""The autosize controller on synthetic load: it converges, does not swing, keeps its bounds
and gives way to memory pressure. A tiny model stands in for the engine: each message needs
``cpu_s`` seconds of CPU and ``wait_s`` seconds off it; two cores; an optional downstream cap."""

from __future__ import annotations

import itertools
import time
from typing import Any

from fastq.autosize import (
    CONTROL_INTERVAL,
    COOLDOWN,
    FIRST_LOOK,
    IO_CONCURRENCY_MAX,
    LOOK_TICK,
    PROBE_AFTER,
    RAMP_INTERVAL,
    Cadence,
    Controller,
    Sample,
    Topology,
    plan,
    ramp,
)
from fastq.config import DEFAULT_IO_CONCURRENCY_CEILING, Config, HandlerOptions

CORES = 2


def queue(kind="io", **kw):
    topology = Topology(cpus=tuple(range(CORES)), memory_bytes=64 << 30)
    return plan(topology, [HandlerOptions(queue="q", kind=kind, **kw)], Config()).queues[0]


def model(concurrency, prefetch, *, cpu_s, wait_s, cap=float("inf"), backlog=10_000, headroom=1.0):
    """One interval of a queue served with this concurrency (and prefetch, which only has to
    cover the concurrency here)."""
    running = min(concurrency, prefetch)
    throughput = min(running / (cpu_s + wait_s), CORES / cpu_s, cap)
    busy = min(1.0, throughput * cpu_s / CORES)
    latency = prefetch / throughput  # everything delivered waits its turn (Little's law)
    return Sample(
        busy=busy, backlog=backlog, throughput=throughput, latency=latency, memory_headroom=headroom
    )


def run(ctl, steps, **load):
    trace = []
    for _ in range(steps):
        d = ctl.step(model(ctl.concurrency, ctl.prefetch, **load))
        trace.append((d.concurrency, d.prefetch, d.reason))
    return trace


def direction_changes(values):
    moves = [b - a for a, b in itertools.pairwise(values) if b != a]
    return sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))


def test_io_work_with_idle_cores_climbs_to_the_ceiling_then_holds():
    # Given I/O handlers that wait 5 ms and use 50 µs of CPU: cores stay idle at any concurrency
    ctl = Controller(queue("io"))
    assert (ctl.concurrency, ctl.prefetch) == (4, 20)
    trace = run(ctl, 14, cpu_s=50e-6, wait_s=5e-3)
    # Then concurrency grows at once by what the idle cores allow and the backlog feeds: 100
    # per host in one look, the prefetch factor to its largest with it (x 10), and they stay
    assert trace[0] == (100, 1000, "cores 2% busy while 10000 messages wait: concurrency +96")
    assert all(t == (100, 1000, "") for t in trace[1:])
    # and each climbing step asks to be judged after RAMP_INTERVAL, a hold after CONTROL_INTERVAL
    ramping = Controller(queue("io"))
    assert ramping.next_look(latency=0.01) == RAMP_INTERVAL  # a first look (the tuning loop
    # makes the very first one after FIRST_LOOK)
    ramping.step(model(4, 20, cpu_s=50e-6, wait_s=5e-3))
    assert ramping.next_look(latency=0.01) == RAMP_INTERVAL
    # slow handlers: a change needs time to show
    assert ramping.next_look(latency=0.5) == CONTROL_INTERVAL
    assert ctl.next_look(latency=0.01) == CONTROL_INTERVAL


def test_the_engines_controller_climbs_past_the_formula_while_cores_stay_idle_then_holds():
    # Given the engine's controller (its ceiling the host's, not the formula's 100) and I/O
    # handlers that wait 5 ms and use 50 µs of CPU: 100 at once carry 20,000/s, the two cores
    # 40,000/s
    ctl = Controller(queue("io"), concurrency_max=DEFAULT_IO_CONCURRENCY_CEILING)
    trace = run(ctl, 30, cpu_s=50e-6, wait_s=5e-3)
    concurrency = [c for c, _, _ in trace]
    # Then the first look sizes it by the idle cores, past the formula's ceiling
    assert trace[0][2] == "cores 2% busy while 10000 messages wait: concurrency +147"
    assert max(concurrency) <= DEFAULT_IO_CONCURRENCY_CEILING
    # and once the cores are full it settles where they stay full, and holds (a decrease that
    # lost, taken back, is not tried again at once: no swing; one look in PROBE_AFTER tries
    # the halving again, and takes it back)
    tail = trace[-12:]
    assert sum(t != (302, 3020, "") for t in tail) <= 2 and tail[-1][:2] == (302, 3020)
    assert model(302, 3020, cpu_s=50e-6, wait_s=5e-3).throughput == CORES / 50e-6
    # and where the broker pays for what is delivered and unsettled (RabbitMQ: ``shallow``),
    # past the formula's 100 handlers the prefetch stays what 100 had (x 10)
    shallow = Controller(queue("io"), concurrency_max=DEFAULT_IO_CONCURRENCY_CEILING, shallow=True)
    trace = run(shallow, 30, cpu_s=50e-6, wait_s=5e-3)
    assert trace[-1][:2] == (302, 1000) and all(p == 1000 for _, p, _ in trace)
    assert direction_changes(concurrency) <= 4


def test_with_busy_cores_an_increase_is_a_doubling():
    assert ramp(0.5, 1000) == ramp(1.0, 1000) == 2.0 and ramp(0.15, 1000) == 5.0


def test_with_idle_cores_and_a_backlog_the_jump_is_sized_by_both_not_by_doubling():
    assert ramp(0.01, 1000) == 75.0  # idle cores, a deep backlog: one jump fills them
    assert ramp(0.01, 12.5) == 12.5  # no more handlers than the backlog keeps busy
    assert ramp(0.01, 0.5) == 2.0  # at least x2
    # Given 4 handlers on idle cores and 5,000 messages waiting: one look takes it to the top
    ctl = Controller(queue("io"))
    d = ctl.step(Sample(busy=0.02, backlog=5_000, throughput=800, latency=0.005))
    assert d.concurrency == IO_CONCURRENCY_MAX and "concurrency +96" in d.reason


def test_when_the_cores_fill_up_it_stops_climbing_and_does_not_swing():
    # Given handlers that use 1 ms of CPU and wait 4 ms: two cores carry at most 2,000/s
    ctl = Controller(queue("io"))
    trace = run(ctl, 80, cpu_s=1e-3, wait_s=4e-3)
    concurrency = [c for c, _, _ in trace]
    # Then it stops once the cores are busy (10 at once keep 2 cores full) and holds, but for
    # probes one step up or down now and then, each taken back at once
    settled = concurrency[-1]
    assert settled == 16  # 8 left the cores idle, 16 filled them, 32 bought nothing
    probes = [i for i, c in enumerate(concurrency[10:-1], 10) if c != settled]
    assert all(
        concurrency[i] in (2 * settled, settled // 2) and concurrency[i + 1] == settled
        for i in probes
    )
    assert len(probes) <= 2 * (70 // PROBE_AFTER + 1)


def test_a_downstream_bottleneck_backs_off_once_and_settles():
    # Given a service downstream that takes 1,000/s whatever the concurrency, cores idle
    ctl = Controller(queue("io"))
    trace = run(ctl, 80, cpu_s=50e-6, wait_s=5e-3, cap=1_000)
    concurrency = [c for c, _, _ in trace]
    # Then its first jump (x25: the cores are idle) pays far less than x25, so it is trimmed to
    # twice the concurrency that carried the gain; from then on it holds, but for a probe one
    # doubling up every PROBE_AFTER intervals, taken back at once
    assert concurrency[0] == 100
    assert (
        trace[1][2]
        == "concurrency x25.0 raised throughput only x1.26 (to 1,000/s): concurrency trimmed to 11"
    )
    settled = concurrency[1]
    assert settled == 11  # 4 carried 792/s: 5.05 carry 1,000/s, twice that for headroom
    probes = [i for i, c in enumerate(concurrency[2:], 2) if c != settled]
    assert probes and all(
        concurrency[i] == 2 * settled and concurrency[i + 1] == settled for i in probes
    )
    assert all(b - a > PROBE_AFTER for a, b in itertools.pairwise(probes))


def test_memory_pressure_lowers_prefetch_first_then_concurrency_never_below_the_floor():
    ctl = Controller(queue("io"))
    run(ctl, 20, cpu_s=50e-6, wait_s=5e-3)  # climbed
    c0, p0 = ctl.concurrency, ctl.prefetch
    trace = run(ctl, 30, cpu_s=50e-6, wait_s=5e-3, headroom=0.05)
    assert (
        trace[0][:2] == (c0, p0 // 2) and "memory headroom 5% < 10%: prefetch halved" in trace[0][2]
    )
    prefetches = [p for _, p, _ in trace]
    first_cut = next(i for i, (c, _, _) in enumerate(trace) if c < c0)
    assert prefetches[first_cut - 1] == c0  # concurrency moves only once prefetch is at its floor
    assert all(p >= c >= 1 for c, p, _ in trace)
    assert trace[-1][0] == 1


def test_cpu_work_keeps_one_handler_per_core_and_its_prefetch_holds_20_ms_of_short_work():
    # Given handlers of 1 ms with the cores a little idle between messages: 833/s a handler
    ctl = Controller(queue("cpu"))
    assert (ctl.concurrency, ctl.prefetch) == (2, 4)
    trace = run(ctl, 20, cpu_s=1e-3, wait_s=0.2e-3)
    assert {c for c, _, _ in trace} == {2}
    # Then the first look takes the prefetch past the formula's x 3, to CPU_BUFFER_SECONDS
    # (20 ms) of their work a handler: 16 messages
    assert trace[0] == (
        2,
        32,
        "cores 83% busy while 10000 messages wait: prefetch to concurrency x 16",
    )
    # and since in this model a deeper prefetch gains nothing, it goes back whole
    assert trace[1][:2] == (2, 4)
    assert max(p for _, p, _ in trace) == 32


def test_cpu_work_of_10_ms_or_more_keeps_the_formulas_x3():
    ctl = Controller(queue("cpu"))
    trace = run(ctl, 20, cpu_s=10e-3, wait_s=1e-3)
    assert {c for c, _, _ in trace} == {2}
    assert max(p for _, p, _ in trace) == 6
    assert trace[0][2] == "cores 91% busy while 10000 messages wait: prefetch to concurrency x 3"


def test_past_x3_a_cpu_prefetch_moves_only_by_twice_or_more():
    ctl = Controller(queue("cpu"))
    d = ctl.step(Sample(busy=0.8, backlog=10_000, throughput=150, latency=0.01))
    assert d.prefetch == 6  # handlers of 13 ms: the formula's x 3
    # handlers of 4 ms allow x 5: not twice x 3, no new consumer for it
    d = ctl.step(Sample(busy=0.8, backlog=10_000, throughput=500, latency=0.01))
    assert (d.prefetch, d.reason) == (6, "")
    # handlers of 3.3 ms allow x 6: twice, taken
    d = ctl.step(Sample(busy=0.8, backlog=10_000, throughput=600, latency=0.01))
    assert (d.prefetch, d.reason) == (
        12,
        "cores 80% busy while 10000 messages wait: prefetch to concurrency x 6",
    )


def test_a_deep_cpu_prefetch_comes_down_when_its_handlers_get_slower():
    ctl = Controller(queue("cpu"))
    d = ctl.step(Sample(busy=0.9, backlog=10_000, throughput=1_800, latency=0.01))
    assert (d.concurrency, d.prefetch) == (2, 36)  # 900/s a handler: 18 in 20 ms
    # a look that reads a little faster makes no new consumer for one more message a handler
    d = ctl.step(Sample(busy=0.9, backlog=10_000, throughput=1_950, latency=0.01))
    assert (d.prefetch, d.reason) == (36, "")
    # nothing waits: nothing to read the handlers' time from, nothing moves
    d = ctl.step(Sample(busy=0.1, backlog=0, throughput=200, latency=0.01))
    assert (d.prefetch, d.reason) == (36, "")
    # with work waiting, handlers of 10 ms: back to x 3
    d = ctl.step(Sample(busy=0.95, backlog=10_000, throughput=200, latency=0.2))
    assert (d.concurrency, d.prefetch) == (2, 6)
    assert d.reason == (
        "handlers take 10.0 ms a message: prefetch down to concurrency x 3 (20 ms of work a "
        "handler)"
    )
    # and slower still, x 3 stays: the formula's top is the buffer's floor
    d = ctl.step(Sample(busy=0.95, backlog=10_000, throughput=190, latency=0.2))
    assert d.prefetch == 6


def test_what_the_user_set_never_moves():
    ctl = Controller(
        queue("io", concurrency=7, prefetch=9), user_concurrency=True, user_prefetch=True
    )
    trace = run(ctl, 30, cpu_s=50e-6, wait_s=5e-3) + run(
        ctl, 10, cpu_s=50e-6, wait_s=5e-3, headroom=0.01
    )
    assert {(c, p) for c, p, _ in trace} == {(7, 9)}


def test_a_new_load_after_a_settled_one_is_followed_again():
    # Given it settled behind a 1,000/s downstream
    ctl = Controller(queue("io"))
    run(ctl, 60, cpu_s=50e-6, wait_s=5e-3, cap=1_000)
    settled = ctl.concurrency
    # When the downstream is gone, it climbs again: at once if throughput moved by a quarter,
    # else at the next probe
    trace = run(ctl, PROBE_AFTER + COOLDOWN + 10, cpu_s=50e-6, wait_s=5e-3)
    assert trace[-1][0] == 100 > settled


def test_busy_cores_probe_larger_batches_and_keep_them_only_while_they_pay():
    # Given overhead-bound work: cores always busy, and throughput that grows with the batch
    # (concurrency) up to 16 at once, flat beyond
    ctl = Controller(queue("io"))

    def sample(c):
        throughput = 10_000 * min(c, 16) ** 0.5
        return Sample(
            busy=0.9, backlog=10_000, throughput=throughput, latency=ctl.prefetch / throughput
        )

    trace = []
    for _ in range(12):
        d = ctl.step(sample(ctl.concurrency))
        trace.append((d.concurrency, d.reason))
    # Then it doubles, and after a step that paid 20% or more grows x4 (a slow start); the
    # step that did not pay is taken back, entirely, and it holds there: within one step of
    # the knee
    assert [c for c, _ in trace[:4]] == [8, 32, 100, 32]
    assert trace[1][1] == "cores 90% busy while 10000 messages wait: concurrency +24"
    assert trace[3] == (
        32,
        "throughput 40,000/s did not grow (latency 25.0 ms): concurrency back to 32",
    )
    assert {c for c, _ in trace[4:]} == {32}


def test_prefetch_stays_under_the_plans_memory_cap_and_a_memory_cut_holds_until_memory_is_back():
    # Given 512 MiB: the plan caps prefetch at 128 messages of 1 MiB
    topology = Topology(cpus=(0, 1), memory_bytes=512 << 20)
    q = plan(topology, [HandlerOptions(queue="q", kind="io")], Config()).queues[0]
    ctl = Controller(q)
    trace = run(ctl, 15, cpu_s=50e-6, wait_s=5e-3)
    assert max(p for _, p, _ in trace) == 128 and trace[-1][:2] == (100, 128)
    # When memory runs short, then stays short for a while, prefetch comes down and stays down
    short = run(ctl, 12, cpu_s=50e-6, wait_s=5e-3, headroom=0.05)
    assert short[0][:2] == (100, 100) and all(p <= 100 for _, p, _ in short)
    # And it may climb again only once headroom is back above 20%
    assert all(p <= 100 for _, p, _ in run(ctl, 5, cpu_s=50e-6, wait_s=5e-3, headroom=0.15))


def test_work_that_turns_cpu_bound_brings_io_concurrency_down_to_what_the_cores_carry():
    # Given I/O work at 100 at once, which then turns into 1 ms of CPU per message
    ctl = Controller(queue("io"))
    run(ctl, 12, cpu_s=50e-6, wait_s=5e-3)
    assert ctl.concurrency == 100
    trace = run(ctl, 40, cpu_s=1e-3, wait_s=0.0)
    concurrency = [c for c, _, _ in trace]
    # Then it halves while throughput holds, stops where fewer would lose throughput, and stays
    assert trace[0][2] == "cores 100% busy: concurrency down to 50 while throughput holds"
    assert concurrency[:6] == [50, 25, 12, 6, 3, 1]
    assert "throughput fell to 1,000/s: concurrency back to 3" in [r for _, _, r in trace]
    assert 2 <= concurrency[-1] <= 3 and all(c <= 6 for c in concurrency[6:])


def test_saturated_cores_halve_io_concurrency_while_the_work_waits_in_the_host():
    # Given the engine's controller at 1,000 I/O handlers whose prefetch took the whole
    # backlog: nothing waits at the broker, 10,000 wait in this host, and the work is now CPU
    def at_1000() -> Controller:
        ctl = Controller(queue("io"), concurrency_max=DEFAULT_IO_CONCURRENCY_CEILING)
        assert ctl.start(backlog=100_000).concurrency == 1000
        ctl.step(Sample(busy=0.5, backlog=0, throughput=40_000.0, latency=0.25, in_flight=10_000))
        return ctl

    held: dict[str, Any] = {"busy": 1.0, "backlog": 0, "throughput": 2_000.0, "latency": 5.0}
    # Then the saturated cores halve it, as they would with a backlog at the broker
    d = at_1000().step(Sample(**held, in_flight=10_000))
    assert (d.concurrency, d.reason) == (
        500,
        "cores 100% busy: concurrency down to 500 while throughput holds",
    )
    # but not when what is in flight fits in the handlers (nothing waits anywhere)
    assert at_1000().step(Sample(**held, in_flight=900)).concurrency == 1000


def test_the_users_bounds_hold_every_step():
    # Given I/O work that would climb to 100 at once, bounded by the user to 6..24, prefetch <= 60
    ctl = Controller(queue("io", min_concurrency=6, max_concurrency=24, max_prefetch=60))
    assert (ctl.concurrency, ctl.prefetch) == (6, 30)  # the formula's 4, raised to the minimum
    trace = run(ctl, 30, cpu_s=50e-6, wait_s=5e-3)
    assert max(c for c, _, _ in trace) == 24 and max(p for _, p, _ in trace) == 60
    # Then work that saturates the cores brings it down, but not under 6
    trace = run(ctl, 30, cpu_s=5e-3, wait_s=0.0)
    assert min(c for c, _, _ in trace) == 6 and all(6 <= c <= 24 and p <= 60 for c, p, _ in trace)
    # And memory pressure does not take prefetch under the user's minimum either
    low = Controller(queue("io", min_prefetch=40))
    trace = run(low, 10, cpu_s=50e-6, wait_s=5e-3, headroom=0.05)
    assert all(p >= 40 for _, p, _ in trace)


def test_the_plan_says_when_the_users_bounds_moved_a_number():
    q = queue("io", min_concurrency=8, max_prefetch=16)
    assert (q.concurrency, q.prefetch) == (8, 16)
    assert q.concurrency_rule.endswith("raised to your min_concurrency=8")
    assert q.prefetch_rule.endswith("lowered to your max_prefetch=16")


def test_cpu_work_takes_a_lower_maximum_but_never_more_than_a_handler_per_core():
    assert queue("cpu", max_concurrency=1).concurrency == 1
    assert queue("cpu", min_concurrency=8).concurrency == CORES


def test_auto_handlers_measured_cpu_bound_take_the_cpu_rules():
    ctl = Controller(queue("auto"))
    assert (ctl.kind, ctl.concurrency, ctl.prefetch) == ("io", 4, 20)
    d = ctl.reclassify("cpu", CORES)
    assert (d.concurrency, d.prefetch, d.reason) == (2, 4, "measured cpu-bound")
    # then it moves as cpu work does: prefetch x2..x3 only (handlers of 10 ms)
    trace = run(ctl, 20, cpu_s=10e-3, wait_s=0.0)
    assert all(c == 2 and 4 <= p <= 6 for c, p, _ in trace)


def test_busy_io_queues_share_the_hosts_handlers_by_weight_and_idle_ones_give_theirs_up():
    from fastq.autosize import share_slots

    weights = {"mail": 3.0, "thumbs": 1.0, "idle": 1.0}
    demand = {"mail": True, "thumbs": True, "idle": False}
    assert share_slots(weights, demand) == {"mail": 75, "thumbs": 25, "idle": 1}
    assert share_slots(weights, {"mail": True}) == {"mail": 100, "thumbs": 1, "idle": 1}
    assert share_slots(weights, demand, floors={"thumbs": 40}) == {
        "mail": 75,
        "thumbs": 40,
        "idle": 1,
    }
    # A controller at 100 comes down to its share at once, then climbs no higher than it
    ctl = Controller(queue("io"))
    run(ctl, 10, cpu_s=50e-6, wait_s=5e-3)
    assert ctl.concurrency == 100
    d = ctl.cap(25)
    assert (d.concurrency, d.reason) == (
        25,
        "its share of the host's handlers is 25: concurrency down to 25",
    )
    assert max(c for c, _, _ in run(ctl, 20, cpu_s=50e-6, wait_s=5e-3)) == 25
    ctl.cap(100)  # the other queue went quiet: the whole host again
    assert max(c for c, _, _ in run(ctl, 30, cpu_s=50e-6, wait_s=5e-3)) == 100


def test_a_throughput_dip_on_cores_still_saturated_does_not_undo_a_decrease():
    from fastq.autosize import Sample

    ctl = Controller(queue("io"))
    run(ctl, 14, cpu_s=50e-6, wait_s=5e-3)  # up to 100 at once, settled
    saturated = Sample(busy=1.0, backlog=5_000, throughput=2_000, latency=0.05)
    d = ctl.step(saturated)
    assert d.reason.startswith("cores 100% busy: concurrency down to")
    lowered = d.concurrency
    # a neighbour takes 10% of the cores meanwhile: throughput dips, the cores stay saturated:
    # the decrease stays (not the decrease's doing), and it is the floor: no swinging down
    d = ctl.step(Sample(busy=1.0, backlog=4_000, throughput=1_800, latency=0.05))
    assert (d.concurrency, d.reason) == (lowered, "")
    for _ in range(5):
        assert (
            ctl.step(Sample(busy=1.0, backlog=4_000, throughput=1_800, latency=0.05)).concurrency
            == lowered
        )
    # whereas a decrease that leaves the cores idle and loses throughput is taken back
    ctl2 = Controller(queue("io"))
    run(ctl2, 14, cpu_s=50e-6, wait_s=5e-3)
    d = ctl2.step(saturated)
    d2 = ctl2.step(Sample(busy=0.6, backlog=4_000, throughput=1_500, latency=0.05))
    assert d2.reason.startswith("throughput fell to 1,500/s: concurrency back to")


def test_a_cap_and_the_next_step_never_leave_the_share_and_cpu_reclassification_ignores_it():
    ctl = Controller(queue("io"))
    ctl.step(model(4, 20, cpu_s=50e-6, wait_s=5e-3, backlog=32))  # 4 -> 32: a raise
    assert ctl.concurrency == 32 and ctl.raised
    ctl.cap(10)
    for c, p, _ in run(ctl, 10, cpu_s=5e-3, wait_s=0.0) + run(ctl, 10, cpu_s=50e-6, wait_s=5e-3):
        assert c <= 10 and p <= 10 * 10
    # a share of 1 (the queue was idle) is not what a CPU-bound queue gets: one handler per core
    idle = Controller(queue("auto"))
    idle.cap(1)
    assert idle.reclassify("cpu", CORES).concurrency == CORES


def test_a_maximum_prefetch_also_bounds_concurrency():
    ctl = Controller(queue("io", max_prefetch=12))
    trace = run(ctl, 20, cpu_s=50e-6, wait_s=5e-3)
    assert max(c for c, _, _ in trace) == 12 and max(p for _, p, _ in trace) == 12


def test_a_busy_cpu_queue_shares_the_cores_by_weight_with_every_busy_queue():
    from fastq.autosize import share_slots

    weights = {"crunch": 1.0, "mail": 1.0}
    both = {"crunch": True, "mail": True}
    # Given 2 cores: beside a busy I/O queue of equal weight the CPU queue gets one core, the
    # I/O queue all of the I/O handlers (they wait, they do not take cores)
    assert share_slots(weights, both, cores={"crunch": 2}) == {"crunch": 1, "mail": 100}
    # an idle I/O queue leaves it every core, and keeps its handlers (no other I/O queue wants
    # them); an idle CPU queue keeps its cores (it uses none)
    assert share_slots(weights, {"crunch": True}, cores={"crunch": 2}) == {"crunch": 2, "mail": 100}
    assert share_slots(weights, {"mail": True}, cores={"crunch": 2}) == {"crunch": 2, "mail": 100}
    # 16 cores, weights 3 to 1: 12; two CPU queues of equal weight split them; never under one
    assert share_slots({"crunch": 3.0, "mail": 1.0}, both, cores={"crunch": 16})["crunch"] == 12
    assert share_slots({"a": 1.0, "b": 1.0}, {"a": True, "b": True}, cores={"a": 2, "b": 2}) == {
        "a": 1,
        "b": 1,
    }
    assert share_slots({"crunch": 1.0, "mail": 9.0}, both, cores={"crunch": 2})["crunch"] == 1
    # an I/O queue that keeps up (no work waiting at the broker) does not press for a core
    assert share_slots(weights, both, cores={"crunch": 2}, pressing=set()) == {
        "crunch": 2,
        "mail": 100,
    }
    assert share_slots(weights, both, cores={"crunch": 2}, pressing={"mail"}) == {
        "crunch": 1,
        "mail": 100,
    }


def test_a_cpu_queue_follows_its_share_of_the_cores_down_and_back_up_unless_the_user_set_it():
    ctl = Controller(queue("cpu"))
    assert (ctl.concurrency, ctl.prefetch) == (2, 4)
    d = ctl.cap(1)
    assert (d.concurrency, d.prefetch) == (1, 2)
    assert d.reason == (
        "its share of the host's 2 cores beside the other busy queues is 1: concurrency down to 1"
    )
    assert ctl.cap(1).reason == ""  # no change, nothing said
    assert all(c == 1 and p <= 3 for c, p, _ in run(ctl, 10, cpu_s=10e-3, wait_s=0.0))
    d = ctl.cap(2)
    assert (d.concurrency, d.reason.endswith("concurrency up to 2")) == (2, True)
    # an auto queue measured CPU-bound takes the same share; a concurrency the user set does not
    auto = Controller(queue("auto"))
    auto.reclassify("cpu", CORES)
    assert auto.cap(1).concurrency == 1 and auto.cap(5).concurrency == CORES
    fixed = Controller(queue("cpu", concurrency=2), user_concurrency=True)
    d = fixed.cap(1)
    assert (d.concurrency, d.prefetch, d.reason) == (2, 4, "")


def test_a_look_trims_the_highest_and_the_lowest_slice_of_its_throughput():
    from fastq.autosize import steady_rate

    times = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    # 1,000/s but for one slice that a neighbour's burst dipped to 200/s
    counts = [0, 250, 500, 550, 800, 1050, 1300]
    assert steady_rate(times, counts) == 1_000.0
    assert steady_rate([0.0, 2.0], [0, 3]) == 1.5  # too few slices: the plain rate
    assert steady_rate([0.0, 0.0], [0, 0]) == 0.0


def test_a_probe_is_one_doubling_even_after_a_step_that_paid_well():
    # Given a queue climbing on busy cores whose prefetch ceiling has aged out: the next
    # increase is a probe
    ctl = Controller(queue("io"))
    ctl.concurrency, ctl.prefetch, ctl.before, ctl.raised = 10, 50, (5, 5), True
    ctl.last = Sample(busy=0.9, backlog=10_000, throughput=1_000, latency=0.05)
    ctl.capped["prefetch"], ctl.ceiling_age, ctl.ceiling_throughput = True, PROBE_AFTER, 1_240
    d = ctl.step(Sample(busy=0.9, backlog=10_000, throughput=1_240, latency=0.05))
    # Then it doubles, no more (a step that paid 24% would otherwise be followed by x4)
    assert d.concurrency == 20


def test_a_jump_that_paid_most_of_itself_is_kept_not_trimmed():
    # Given idle-ish cores (25% busy: x3) and a gain of x1.9 from 4 to 12
    ctl = Controller(queue("io"))
    ctl.step(Sample(busy=0.25, backlog=10_000, throughput=1_000, latency=0.02))
    assert ctl.concurrency == 12
    d = ctl.step(Sample(busy=0.5, backlog=10_000, throughput=1_900, latency=0.02))
    # Then twice what carried the gain (15) is above 12: nothing is trimmed nor capped
    assert not d.reason.startswith("concurrency x") and not ctl.capped["concurrency"]


def test_a_share_that_moves_during_a_prefetch_try_puts_the_factor_back_unjudged():
    ctl = Controller(queue("cpu"))
    d = ctl.step(Sample(busy=0.8, backlog=10_000, throughput=150, latency=0.01))
    assert (d.prefetch, ctl.factor) == (6, 3)  # trying x3 (handlers of 13 ms)
    d = ctl.cap(1)
    assert (d.concurrency, d.prefetch, ctl.factor) == (1, 2, 2)  # x2 again, to be tried later


def test_a_slow_queues_rate_is_not_trimmed_away():
    from fastq.autosize import steady_rate

    times = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75]
    assert steady_rate(times, [0, 0, 0, 1, 1, 1, 1]) == 1 / 0.75  # one message: not 0


def test_the_load_meter_reads_how_busy_the_cores_were_between_two_snapshots():
    import os

    from fastq.autosize import LoadMeter, Topology

    assert LoadMeter.busy_between((1.0, 10.0), (2.0, 12.0)) == 0.5
    assert LoadMeter.busy_between((1.0, 10.0), (1.0, 10.0)) == 0.0  # no time passed
    original = os.sched_getaffinity(0)
    cpu = min(original)
    meter = LoadMeter(Topology.detect(), [cpu])
    before = meter.snapshot()
    os.sched_setaffinity(0, {cpu})
    try:
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:  # this process keeps that core busy
            pass
    finally:
        os.sched_setaffinity(0, original)
    after = meter.snapshot()
    assert after[1] > before[1] and after[0] > before[0]
    assert 0.5 < LoadMeter.busy_between(before, after) <= 1.0


def test_a_larger_prefetch_is_judged_on_a_full_look_and_a_larger_concurrency_sooner():
    ctl = Controller(queue("io"))
    run(ctl, 1, cpu_s=50e-6, wait_s=5e-3)  # 4 -> 100, the prefetch factor with it
    assert (ctl.concurrency, ctl.prefetch) == (100, 1000)
    assert ctl.next_look(latency=0.01) == RAMP_INTERVAL  # a concurrency step: judged after 1 s
    # a larger prefetch alone (the concurrency at the user's maximum already)
    capped = Controller(queue("io", max_concurrency=4))
    d = capped.step(model(4, 20, cpu_s=50e-6, wait_s=5e-3))
    assert (d.concurrency, d.prefetch) == (4, 40) and d.reason.endswith("concurrency x 10")
    assert capped.next_look(latency=0.01) == CONTROL_INTERVAL  # its gain is a few percent: 2 s


def test_a_climb_takes_the_prefetch_factor_with_it_and_one_that_did_not_pay_goes_back_whole():
    # Given short handlers on cores 60% busy (the supervisor's work, mostly) and a backlog: what
    # carries them is what is in flight around the supervisor's round trip
    ctl = Controller(queue("io"))
    d = ctl.step(Sample(busy=0.6, backlog=256, throughput=4_000, latency=0.005))
    # Then concurrency doubles (busy cores) and the prefetch goes to concurrency x 10 with it
    assert (d.concurrency, d.prefetch) == (8, 80)
    assert d.reason == "cores 60% busy while 256 messages wait: concurrency +4"
    # and a step that did not pay goes back whole, both of it
    d = ctl.step(Sample(busy=0.6, backlog=256, throughput=4_050, latency=0.02))
    assert (d.concurrency, d.prefetch) == (4, 20)
    assert d.reason == (
        "throughput 4,050/s did not grow (latency 20.0 ms): concurrency back to 4, "
        "prefetch back to concurrency x 5"
    )
    # and a probe after a ceiling is one doubling of concurrency, nothing more
    probe = Controller(queue("io"))
    probe.probing = True
    d = probe.step(Sample(busy=0.6, backlog=256, throughput=4_000, latency=0.005))
    assert (d.concurrency, d.prefetch) == (8, 40)


def test_a_lone_io_queue_that_drained_keeps_its_handlers_for_the_next_burst():
    from fastq.autosize import share_slots

    # Given one I/O queue whose backlog is gone (drained, or another supervisor holds its
    # messages for now: ready 0, nothing in flight here)
    assert share_slots({"only": 1.0}, {"only": False}, floors={"only": 1}) == {"only": 100}
    # Then its controller is not cut: the next burst meets the concurrency it climbed to
    ctl = Controller(queue("io"))
    run(ctl, 20, cpu_s=50e-6, wait_s=5e-3)
    climbed = ctl.concurrency
    d = ctl.cap(share_slots({"q": 1.0}, {"q": False})["q"])
    assert (d.concurrency, d.reason) == (climbed, "")
    # while beside another I/O queue that is busy, an idle one gives its share up to its floor
    assert share_slots({"idle": 1.0, "busy": 1.0}, {"busy": True}) == {"idle": 1, "busy": 100}


def test_a_backlog_met_at_the_start_is_sized_at_once_and_a_steady_start_is_not():
    # Given an I/O queue at the formula's 4 / 20 and 5,000 messages waiting at the start
    ctl = Controller(queue("io"))
    d = ctl.start(5_000)
    assert (d.concurrency, d.prefetch) == (IO_CONCURRENCY_MAX, 500)
    assert d.reason == "5000 messages wait at the start: concurrency +96"
    # as far as the backlog feeds, no further
    assert Controller(queue("io")).start(40).concurrency == 40
    # Then a backlog the prefetch holds, a CPU queue, or one the user fixed does not move
    for ctl, backlog in (
        (Controller(queue("io")), 20),
        (Controller(queue("cpu")), 5_000),
        (Controller(queue("io"), user_concurrency=True), 5_000),
    ):
        before = (ctl.concurrency, ctl.prefetch)
        d = ctl.start(backlog)
        assert (d.concurrency, d.prefetch, d.reason) == (*before, "")
    # and the start is within the queue's share of the host
    shared = Controller(queue("io"))
    shared.cap(50)
    assert shared.start(5_000).concurrency == 50


def test_work_reaching_a_queue_that_had_none_brings_its_look_forward():
    # Given a queue whose first look (FIRST_LOOK after the start) found no work, and the
    # controller's next look 2 s after it
    cadence = Cadence()
    assert cadence.tick(0.0, ["q"], {"q": 0}) == []
    assert cadence.tick(FIRST_LOOK, ["q"], {"q": 0}) == ["q"]
    cadence.saw("q", backlog=0, in_flight=0)
    cadence.due["q"] = (FIRST_LOOK, CONTROL_INTERVAL)
    assert cadence.tick(1.0, ["q"], {"q": 0}) == []
    # When work reaches it (in flight at a tick), 1 s later
    assert cadence.tick(1.0 + FIRST_LOOK, ["q"], {"q": 40}) == []
    # Then it looks FIRST_LOOK after that tick, not at 0.375 + 2 s
    assert cadence.tick(1.0 + 2 * FIRST_LOOK - LOOK_TICK, ["q"], {"q": 40}) == []
    assert cadence.tick(1.0 + 2 * FIRST_LOOK, ["q"], {"q": 40}) == ["q"]
    # and a queue whose look found work, or found it waiting at the broker, keeps its pace
    cadence.saw("q", backlog=0, in_flight=40)
    cadence.due["q"] = (2.0, CONTROL_INTERVAL)
    assert cadence.tick(2.5, ["q"], {"q": 40}) == []
    cadence.saw("q", backlog=500, in_flight=0)
    assert cadence.tick(3.0, ["q"], {"q": 40}) == []
    assert cadence.tick(4.0, ["q"], {"q": 40}) == ["q"]
