"""The sizing plan on synthetic machines: exact numbers, and the rule behind each."""

from __future__ import annotations

import pytest

from fastq.autosize import Topology, cpu_quota, memory_limit, plan
from fastq.config import Config, HandlerOptions

GiB = 1 << 30


def machine(n_cpus, *, quota=None, memory=64 * GiB, first=0):
    return Topology(cpus=tuple(range(first, first + n_cpus)), cpu_quota=quota, memory_bytes=memory)


@pytest.mark.parametrize(
    ("cores", "io_concurrency", "io_prefetch", "cpu_concurrency", "cpu_prefetch"),
    [
        (1, 2, 10, 1, 2),
        (2, 4, 20, 2, 4),
        (4, 8, 40, 4, 8),
        (16, 32, 160, 16, 32),
        (64, 100, 500, 64, 128),
        (128, 100, 500, 128, 256),
    ],
)
def test_the_documented_formulas_on_machines_of_every_size(
    cores, io_concurrency, io_prefetch, cpu_concurrency, cpu_prefetch
):
    p = plan(
        machine(cores),
        [HandlerOptions(queue="fetch", kind="io"), HandlerOptions(queue="resize", kind="cpu")],
    )
    io, cpu = p.queues
    assert p.processes == cores and p.pinned == tuple(range(cores))
    assert (io.concurrency, io.prefetch) == (io_concurrency, io_prefetch)
    assert (cpu.concurrency, cpu.prefetch) == (cpu_concurrency, cpu_prefetch)
    assert sum(io.per_process) == io_concurrency and max(io.per_process) - min(io.per_process) <= 1
    assert cpu.per_process == (1,) * cores


def test_an_affinity_mask_of_three_cpus_gives_three_pinned_processes():
    p = plan(Topology(cpus=(2, 5, 7), memory_bytes=8 * GiB), [HandlerOptions(queue="q", kind="io")])
    assert (p.processes, p.pinned) == (3, (2, 5, 7))
    assert (p.queues[0].concurrency, p.queues[0].prefetch, p.queues[0].per_process) == (
        6,
        30,
        (2, 2, 2),
    )


def test_a_quota_of_one_and_a_half_cores_counts_as_one_process_and_three_io_slots():
    p = plan(
        machine(4, quota=1.5),
        [HandlerOptions(queue="q", kind="io"), HandlerOptions(queue="c", kind="cpu")],
    )
    assert p.processes == 1
    assert "cgroup quota 1.5 cores, rounded down" in p.processes_rule
    assert (p.queues[0].concurrency, p.queues[0].prefetch) == (3, 15)
    assert (p.queues[1].concurrency, p.queues[1].prefetch) == (1, 2)


def test_a_512_mib_memory_limit_caps_prefetch_and_says_why():
    p = plan(machine(64, memory=512 << 20), [HandlerOptions(queue="q", kind="io")])
    q = p.queues[0]
    assert (q.concurrency, q.prefetch) == (100, 128)  # 512 MiB / 4 / 1 MiB messages
    assert "capped to 128: a quarter of 512 MiB of memory holds 128 messages" in q.prefetch_rule


def test_auto_starts_as_io_and_what_the_user_sets_wins():
    p = plan(
        machine(4),
        [
            HandlerOptions(queue="a"),
            HandlerOptions(queue="b", kind="cpu", concurrency=3),
            HandlerOptions(queue="c", kind="io", prefetch=7),
        ],
        Config(processes=2, prefetch=50, pin_cpus=False),
    )
    a, b, c = p.queues
    assert (p.processes, p.pinned, p.processes_rule) == (2, (), "set by you")
    assert (a.kind, a.concurrency, a.prefetch, a.prefetch_rule) == ("io", 8, 50, "set by you")
    assert "auto starts as io" in a.concurrency_rule
    assert (b.concurrency, b.per_process, b.prefetch) == (3, (2, 1), 50)
    assert (c.concurrency, c.prefetch) == (8, 7)
    assert "queue 'a' (io): concurrency 8" in p.explain()


@pytest.mark.parametrize(
    ("v2", "v1_quota", "v1_period", "expected"),
    [
        ("150000 100000\n", None, None, 1.5),
        ("max 100000\n", None, None, None),
        (None, "200000\n", "100000\n", 2.0),
        (None, "-1\n", "100000\n", None),
        (None, None, None, None),
    ],
)
def test_cgroup_cpu_quota_v2_and_v1(v2, v1_quota, v1_period, expected):
    assert cpu_quota(v2, v1_quota, v1_period) == expected


def test_cgroup_memory_limit_v2_and_v1():
    assert memory_limit("536870912\n", None) == 512 << 20
    assert memory_limit("max\n", None) is None
    assert memory_limit(None, "9223372036854771712\n") is None
    assert memory_limit(None, "1073741824\n") == 1 << 30


def test_detect_reads_this_machine():
    import os

    t = Topology.detect()
    assert t.cpus == tuple(sorted(os.sched_getaffinity(0)))
    assert t.memory_bytes > 0


def test_queues_set_to_fewer_processes_take_consecutive_workers_and_split_their_concurrency():
    p = plan(
        machine(4),
        [
            HandlerOptions(queue="all", kind="io"),
            HandlerOptions(queue="one", kind="cpu", processes=1),
            HandlerOptions(queue="two", kind="io", processes=2, concurrency=5),
            HandlerOptions(queue="big", kind="cpu", processes=9),
        ],
    )
    every, one, two, big = p.queues
    assert (every.workers, every.workers_rule) == ((0, 1, 2, 3), "all of them")
    assert (one.workers, one.concurrency, one.per_process, one.prefetch) == (
        (0,),
        1,
        (1, 0, 0, 0),
        2,
    )
    assert "one handler per pinned core it runs on" in one.concurrency_rule
    assert (two.workers, two.workers_rule, two.per_process) == (
        (1, 2),
        "set by you: 2 of 4",
        (0, 3, 2, 0),
    )
    assert (big.workers, big.concurrency) == ((0, 1, 2, 3), 4)
    assert big.workers_rule == "set by you: 9, capped to the 4 processes this host runs"
    assert "queue 'two': worker processes [1, 2] (set by you: 2 of 4)" in p.explain()
    assert "queue 'all': worker processes" not in p.explain()
