"""``fastq runs``: list, show and resume through the command, on memory:// in this process
(drain runs the steps): what it prints, and its one-line errors with exit 2."""

from __future__ import annotations

import re
import textwrap

import pytest

from fastq import cli
from fastq.testing import drain

APP = """
import os
import fastq

app = fastq.App("cliruns", broker="memory://cli-runs")
FLAG = {flag!r}
wf = app.workflow("etl")


@wf.step()
def extract() -> list[int]:
    return [1, 2, 3]


@wf.step(depends_on=[extract], fan_out=True)
def transform(extract: int) -> int:
    if extract == 2 and not os.path.exists(FLAG):
        raise ValueError("two is not ready")
    return extract * 10


@wf.step(depends_on=[transform])
def load(transform: list[int]) -> int:
    return sum(transform)
"""


@pytest.fixture
def mod(tmp_path, monkeypatch):
    (tmp_path / "cliruns_app.py").write_text(
        textwrap.dedent(APP.format(flag=str(tmp_path / "flag")))
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import cliruns_app

    yield cliruns_app
    import sys

    sys.modules.pop("cliruns_app", None)


def test_runs_lists_shows_and_resumes_a_failed_run(mod, tmp_path, capsys):
    # Given a run whose second element fails
    run_id = mod.wf.start()
    drain(mod.app)
    assert mod.wf.status(run_id).state == "failed"
    # When its runs are listed (all, then the failed ones of etl)
    assert cli.main(["runs", "cliruns_app:app"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "workflow", "state", "started", "(UTC)", "ended"]
    assert [ln.split()[:3] for ln in lines[1:]] == [[run_id, "etl", "failed"]]
    assert cli.main(["runs", "cliruns_app:app", "--workflow", "etl", "--state", "done"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    # Then show prints the graph with each step's state, the fan-out counted, the error
    assert cli.main(["runs", "cliruns_app:app", "show", run_id]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"run {run_id} of etl: failed"
    assert re.search(r"^  extract +done +attempts 1 ", out, re.MULTILINE)
    assert re.search(
        r"^  transform +failed +attempts 1 .* <- extract fan-out: 2 done, 1 failed$",
        out,
        re.MULTILINE,
    )
    assert "      1 of 3 elements failed; element 1: ValueError: two is not ready" in out
    assert re.search(r"^  load +skipped +attempts 0  - <- transform$", out, re.MULTILINE)
    # When the cause is fixed and the run resumed through the command
    (tmp_path / "flag").touch()
    assert cli.main(["runs", "cliruns_app:app", "resume", run_id]) == 0
    assert capsys.readouterr().out == f"resumed run {run_id}: transform, load will run again\n"
    assert drain(mod.app).ok == 2  # the failed element and load; done elements not again
    assert mod.wf.result(run_id, timeout=1) == {"load": 60}
    assert cli.main(["runs", "cliruns_app:app", "resume", run_id]) == 0
    assert (
        capsys.readouterr().out == f"run {run_id} has nothing to resume (it is running, or done)\n"
    )
    # When it is forgotten, it is gone, with everything it held
    assert cli.main(["runs", "cliruns_app:app", "forget", run_id]) == 0
    assert capsys.readouterr().out == f"forgot run {run_id}\n"
    assert mod.app.broker._runs.step_rows == {} and mod.app.broker._runs.counters == {}
    assert cli.main(["runs", "cliruns_app:app", "forget", run_id]) == 1
    assert capsys.readouterr().out == (
        f"run {run_id} is running, or there is no such run: nothing forgotten\n"
    )


def test_runs_errors_are_one_line_with_exit_2(mod, capsys):
    assert cli.main(["runs", "cliruns_app:app", "show", "nope"]) == 2
    assert capsys.readouterr().err == (
        "fastq runs: no run 'nope' in memory://cli-runs; list the runs with "
        "`fastq runs module:app`\n"
    )
    assert cli.main(["runs", "cliruns_app:app", "--workflow", "x"]) == 2
    assert capsys.readouterr().err == (
        "fastq runs: cliruns defines no workflow 'x'; it defines: etl\n"
    )
    assert cli.main(["runs", "cliruns_app:app", "resume"]) == 2
    assert capsys.readouterr().err == (
        "fastq runs: resume needs a run id: fastq runs cliruns_app:app resume RUN\n"
    )
