"""Workflows through real processes on SQLite (``fastq worker``): Cloacina's parallel-processing
tutorial ported (exact summary, the three partitions overlap in time), a fan-out of 1,000 and
its fan-in (also with a worker SIGKILLed twice mid fan-out: every element recorded once, the join
run once), and a failing step (retried per its policy, dependents skipped, the all_done cleanup
run, WorkflowFailed naming it; fixed by a flag file and resumed without re-running done steps)."""

from __future__ import annotations

import signal

import msgspec
import pytest

import fastq
from fastq.testing import wait_until
from tests.integration.wfhost import Host, check_fan_in, check_tutorial, kill_a_worker_twice

CATALOG = """
import os, time
import fastq, msgspec

app = fastq.App("catalog", broker="sqlite:///{db}")
DIR = {dir!r}
Q = {q!r}
CATEGORIES = ["books", "games", "garden", "music", "tools"]


def note(name: str, text: str) -> None:
    fd = os.open(os.path.join(DIR, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (text + "\\n").encode())
    finally:
        os.close(fd)


class Product(msgspec.Struct):
    id: int
    name: str
    category: str
    price_cents: int


class CategoryStats(msgspec.Struct):
    count: dict[str, int]
    value_cents: dict[str, int]


class Summary(msgspec.Struct):
    products: int
    count: dict[str, int]
    value_cents: dict[str, int]


wf = app.workflow("catalog")


@wf.step(queue=Q, retry_attempts=2)
async def generate_data(n: int) -> list[Product]:
    return [Product(i, f"product-{{i}}", CATEGORIES[i % 5], 100 + i % 997) for i in range(n)]


@wf.step(queue=Q, depends_on=[generate_data])
def partition_data(generate_data: list[Product], ctx: fastq.RunContext) -> list[list[Product]]:
    size = -(-len(generate_data) // 3)
    ctx.set("partitions", 3)
    return [generate_data[i : i + size] for i in range(0, len(generate_data), size)]


@wf.step(
    queue=Q, depends_on=[partition_data], fan_out=True, retry_attempts=3, retry_delay=0.1, kind="io"
)
def process_partition(partition_data: list[Product]) -> CategoryStats:
    count: dict[str, int] = {{}}
    value: dict[str, int] = {{}}
    for p in partition_data:
        count[p.category] = count.get(p.category, 0) + 1
        value[p.category] = value.get(p.category, 0) + p.price_cents
    time.sleep(0.5)  # the work of a real partition: long enough to see three at once
    return CategoryStats(count, value)


@wf.step(queue=Q, depends_on=[process_partition])
def combine_results(process_partition: list[CategoryStats], ctx: fastq.RunContext) -> Summary:
    count: dict[str, int] = {{}}
    value: dict[str, int] = {{}}
    for s in process_partition:
        for k, v in s.count.items():
            count[k] = count.get(k, 0) + v
        for k, v in s.value_cents.items():
            value[k] = value.get(k, 0) + v
    assert ctx.get("partitions") == len(process_partition)
    return Summary(sum(count.values()), count, value)


@wf.step(queue=Q, depends_on=[combine_results])
async def generate_report(combine_results: Summary) -> str:
    return "; ".join(f"{{k}}={{v}}" for k, v in sorted(combine_results.count.items()))


@wf.step(queue=Q, depends_on=[combine_results])
def send_notifications(combine_results: Summary, ctx: fastq.RunContext) -> int:
    note("notified.txt", ctx.run_id)
    ctx.set("notified", 2)
    return 2


@wf.step(queue=Q, depends_on=[generate_report, send_notifications], trigger="all_done")
def cleanup(
    generate_report: str | None, send_notifications: int | None, ctx: fastq.RunContext
) -> str:
    note("cleanup.txt", ctx.run_id)
    return f"cleaned after {{generate_report}} and {{send_notifications}} notifications"
"""

FANOUT = """
import os
import fastq

app = fastq.App("fanout", broker="sqlite:///{db}?lease=5")
DIR = {dir!r}
Q = {q!r}


def note(name: str, text: str) -> None:
    fd = os.open(os.path.join(DIR, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (text + "\\n").encode())
    finally:
        os.close(fd)


wf = app.workflow("fan")


@wf.step(queue=Q)
def source(n: int) -> list[int]:
    return list(range(n))


@wf.step(queue=Q, depends_on=[source], fan_out=True, kind="cpu")
def work(source: int) -> int:
    x = 0
    for i in range(20_000):  # about a millisecond of pure Python
        x += i
    note("work.txt", str(source))
    return source * 2


@wf.step(queue=Q, depends_on=[work])
def join(work: list[int]) -> int:
    note("join.txt", "join")
    return sum(work)
"""

FLAKY = """
import os
import fastq

app = fastq.App("flaky", broker="sqlite:///{db}")
DIR = {dir!r}
Q = {q!r}


def note(name: str) -> None:
    fd = os.open(os.path.join(DIR, "runs.txt"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (name + "\\n").encode())
    finally:
        os.close(fd)


wf = app.workflow("flaky")


@wf.step(queue=Q)
def fetch() -> int:
    note("fetch")
    return 20


@wf.step(queue=Q, depends_on=[fetch], retry_attempts=2, retry_delay=0.05)
def parse(fetch: int) -> int:
    note("parse")
    if not os.path.exists(os.path.join(DIR, "fixed")):
        raise RuntimeError("the feed is malformed")
    return fetch + 1


@wf.step(queue=Q, depends_on=[parse])
def load(parse: int) -> int:
    note("load")
    return parse * 2


@wf.step(queue=Q, depends_on=[fetch])
def audit(fetch: int) -> str:
    note("audit")
    return "audited"


@wf.step(queue=Q, depends_on=[load, audit], trigger="all_done")
def cleanup(load: int | None, audit: str | None) -> str:
    note("cleanup")
    return f"{{load}} {{audit}}"
"""


@pytest.fixture
def host(tmp_path, request):
    module, source = request.param
    h = Host(tmp_path, module, source)
    h.start()
    yield h
    h.close()


@pytest.mark.parametrize("host", [("wf_catalog", CATALOG)], indirect=True)
def test_the_cloacina_tutorial_runs_three_partitions_at_once_and_sums_exactly(host):
    # Given the tutorial's workflow on 2 worker processes
    wf = host.app.wf
    # When a run over 10,000 products is started and ends
    run_id = wf.start(10_000)
    # Then it ended as the tutorial says (check_tutorial), the run done
    st = check_tutorial(host, run_id)
    assert st.state == "done"
    count = {c: 2000 for c in host.app.CATEGORIES}
    # and the summary is exact
    summary = host.app.app.broker.run_transaction(lambda tx: tx.step(run_id, "combine_results", -1))
    decoded = msgspec.msgpack.decode(summary.result, type=host.app.Summary)
    value = {c: 0 for c in host.app.CATEGORIES}
    for i in range(10_000):
        value[host.app.CATEGORIES[i % 5]] += 100 + i % 997
    assert decoded == host.app.Summary(10_000, count, value)
    # and each of the three partitions (which ran at once) ran once
    parts = st.steps["process_partition"].elements
    assert [p.state for p in parts] == ["done"] * 3
    assert [p.attempts for p in parts] == [1, 1, 1]
    assert host.lines("notified.txt") == [run_id]


@pytest.mark.parametrize("host", [("wf_fanout", FANOUT)], indirect=True)
def test_a_fan_out_of_1000_fans_in_exactly_once_with_a_worker_sigkilled_twice(host):
    # Given a fan-out of 1,000 elements
    run_id = host.app.wf.start(1000)
    # When a worker is SIGKILLed twice while the elements run
    kill_a_worker_twice(host)
    # Then the run completes with the exact sum, the join ran once, every element ran (at
    # least once) and its result was recorded once, done
    check_fan_in(host, run_id)


@pytest.mark.parametrize("host", [("wf_fanout", FANOUT)], indirect=True)
def test_a_fan_out_survives_its_supervisor_sigkilled_and_restarted(host):
    # Given a fan-out of 1,000 elements under way
    run_id = host.app.wf.start(1000)
    wait_until(lambda: len(host.lines("work.txt")) >= 300, 60, host.logtext)
    # When the supervisor is SIGKILLed (its workers follow it) and another one started
    assert host.proc is not None
    workers = host.workers()
    host.proc.send_signal(signal.SIGKILL)
    host.proc.wait(10)
    wait_until(lambda: not any(w.is_running() and w.status() != "zombie" for w in workers), 30)
    host.start()
    # Then the run completes (what the dead one leased comes back when its lease lapses):
    # the exact sum, the join once, every element done
    check_fan_in(host, run_id)


@pytest.mark.parametrize("host", [("wf_flaky", FLAKY)], indirect=True)
def test_a_failing_step_fails_the_run_and_resume_finishes_it_without_rerunning_done_steps(host):
    wf = host.app.wf
    # Given a step that fails until a flag file exists
    run_id = wf.start()
    # When the run ends
    with pytest.raises(fastq.WorkflowFailed) as failed:
        wf.result(run_id, timeout=60)
    # Then it names the failed step, why, and after how many attempts; its dependent skipped
    assert failed.value.failed == {
        "parse": "RuntimeError: the feed is malformed (after 3 attempts)"
    }
    assert failed.value.skipped == ["load"]
    assert str(failed.value) == (
        f"workflow flaky run {run_id} failed at parse (parse: RuntimeError: the feed is "
        f"malformed (after 3 attempts)); skipped load; fix the cause and resume it: "
        f"wf.resume({run_id!r})"
    )
    st = wf.status(run_id)
    assert {n: (s.state, s.attempts) for n, s in st.steps.items()} == {
        "fetch": ("done", 1),
        "parse": ("failed", 3),
        "load": ("skipped", 0),
        "audit": ("done", 1),
        "cleanup": ("done", 1),
    }
    assert st.steps["load"].error == "skipped: parse failed"
    assert sorted(host.lines("runs.txt")) == sorted(
        ["fetch", "parse", "parse", "parse", "audit", "cleanup"]
    )
    assert [r.run_id for r in wf.runs(state="failed")] == [run_id]
    # When the cause is fixed and the run resumed
    (host.dir / "fixed").touch()
    assert wf.resume(run_id) == ["parse", "load"]
    # Then it completes; done steps kept their results and did not run again
    assert wf.result(run_id, timeout=60) == {"cleanup": "None audited"}
    st = wf.status(run_id)
    assert st.state == "done"
    assert {n: s.state for n, s in st.steps.items()} == dict.fromkeys(wf.steps, "done")
    assert sorted(host.lines("runs.txt")) == sorted(
        ["fetch", "parse", "parse", "parse", "audit", "cleanup", "parse", "load"]
    )
    assert wf.resume(run_id) == []
    assert wf.forget(run_id) is True
    assert wf.runs() == []
    counted = host.app.app.broker._db().execute(
        "SELECT (SELECT count(*) FROM fastq_run_steps), (SELECT count(*) FROM fastq_run_counters)"
    )
    assert counted.fetchone() == (0, 0)
