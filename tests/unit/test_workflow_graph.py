"""A workflow's graph is checked as it is defined: each ConfigError names the step and the
parameter, its message pinned."""

from __future__ import annotations

import re

import msgspec
import pytest

import fastq
from fastq.workflow.graph import fits, type_name


class Product(msgspec.Struct):
    id: int


class Stats(msgspec.Struct):
    n: int


@pytest.fixture
def wf():
    app = fastq.App("graphs", broker="memory://graphs")
    w = app.workflow("catalog")

    @w.step()
    def generate_data() -> list[Product]:
        return []

    @w.step(depends_on=[generate_data])
    def partition_data(generate_data: list[Product]) -> list[list[Product]]:
        return []

    @w.step(depends_on=[partition_data], fan_out=True)
    def process_partition(partition_data: list[Product]) -> Stats:
        return Stats(0)

    return w


def test_a_well_typed_graph_is_accepted_and_stored_in_order(wf):
    @wf.step(depends_on=[wf.steps["process_partition"]])
    def combine_results(process_partition: list[Stats], ctx: fastq.RunContext) -> int:
        return 0

    graph = wf.graph()
    assert [s.name for s in graph.steps] == [
        "generate_data",
        "partition_data",
        "process_partition",
        "combine_results",
    ]
    combine = graph.spec("combine_results")
    assert combine.parents == ("process_partition",) and combine.params == ("process_partition",)
    assert combine.task == "wf.catalog.combine_results"
    assert [s.name for s in wf.roots()] == ["generate_data"]
    assert [s.name for s in wf.sinks()] == ["combine_results"]
    task = wf.app.tasks["wf.catalog.process_partition"]
    assert (task.options.max_retries, task.queue) == (0, "default")


def test_a_missing_parent_is_a_config_error(wf):
    with pytest.raises(
        fastq.ConfigError,
        match=r"^workflow catalog: step combine_results depends on 'process_partitions', which "
        r"is no step of this workflow yet; define each step after the steps it depends on$",
    ):

        @wf.step(depends_on=["process_partitions"])
        def combine_results(process_partitions: list[Stats]) -> int:
            return 0


def test_a_cycle_is_a_config_error(wf):
    # a step depends only on steps defined before it: the only cycle left to write is a loop
    with pytest.raises(
        fastq.ConfigError,
        match=r"^workflow catalog: step again depends on itself; a workflow is a DAG$",
    ):

        @wf.step(depends_on=["again"])
        def again(again: int) -> int:
            return 0


def test_a_parameter_that_names_no_parent_is_a_config_error(wf):
    with pytest.raises(
        fastq.ConfigError,
        match=r"^workflow catalog: step combine_results parameter stats names none of its "
        r"parents \['process_partition'\]; name each parameter after a parent \(or annotate it "
        r"fastq.RunContext\)$",
    ):

        @wf.step(depends_on=["process_partition"])
        def combine_results(stats: list[Stats]) -> int:
            return 0


def test_a_type_mismatch_is_a_config_error_naming_the_step_and_parameter(wf):
    with pytest.raises(
        fastq.ConfigError,
        match=r"^workflow catalog: step combine_results parameter process_partition: expected "
        r"list\[Stats\] \(process_partition fans out: its dependents get the list of its "
        r"results\), got Stats; make the annotation match what process_partition returns$",
    ):

        @wf.step(depends_on=["process_partition"])
        def combine_results(process_partition: Stats) -> int:
            return 0


def test_a_fan_out_over_something_not_a_list_is_a_config_error(wf):
    @wf.step(depends_on=["process_partition"])
    def combine_results(process_partition: list[Stats]) -> dict[str, int]:
        return {}

    with pytest.raises(
        fastq.ConfigError,
        match=r"^workflow catalog: step notify parameter combine_results fans out over "
        r"combine_results, which returns dict\[str, int\], not a list; return list\[...\] from "
        r"combine_results or drop fan_out=True$",
    ):

        @wf.step(depends_on=[combine_results], fan_out=True)
        def notify(combine_results: str) -> None:
            pass


def test_an_all_done_step_must_accept_none_for_its_parents(wf):
    with pytest.raises(
        fastq.ConfigError,
        match=r"^workflow catalog: step cleanup parameter partition_data: expected "
        r"list\[list\[Product\]\] \| None \(trigger='all_done' gives None when partition_data "
        r"did not end done\), got list\[list\[Product\]\]; annotate it "
        r"list\[list\[Product\]\] \| None$",
    ):

        @wf.step(depends_on=["partition_data"], trigger="all_done")
        def cleanup(partition_data: list[list[Product]]) -> None:
            pass


def test_fan_out_over_two_parents_and_bad_options_are_config_errors(wf):
    with pytest.raises(
        fastq.ConfigError,
        match=r"^workflow catalog: step both fans out over 2 parents \['generate_data', "
        r"'partition_data'\]; fan out over one parent's list$",
    ):

        @wf.step(depends_on=["generate_data", "partition_data"], fan_out=True)
        def both(generate_data: Product) -> None:
            pass

    with pytest.raises(
        fastq.ConfigError,
        match=r"^workflow catalog: trigger='any' is none of \('all_success', 'all_done'\)$",
    ):
        wf.step(trigger="any")
    with pytest.raises(
        fastq.ConfigError,
        match=r"^workflow catalog: retry_attempts must be an int >= 0, got -1$",
    ):
        wf.step(retry_attempts=-1)
    with pytest.raises(
        fastq.ConfigError,
        match=r"^workflow catalog: max_retries, name cannot be given to a step: its task is "
        r"named wf.<workflow>.<step>, and retries are retry_attempts= and retry_delay=$",
    ):
        wf.step(max_retries=3, name="x")
    with pytest.raises(
        fastq.ConfigError,
        match=r"^a workflow named 'catalog' is defined already; one per name$",
    ):
        wf.app.workflow("catalog")
    for keep in (0, -1.0, "7d", True):
        with pytest.raises(
            fastq.ConfigError,
            match=r"^workflow kept: keep must be the seconds an ended run is kept \(> 0\), or "
            rf"None to keep runs until wf.forget; got {re.escape(repr(keep))}$",
        ):
            wf.app.workflow("kept", keep=keep)  # type: ignore[arg-type]


def test_a_broker_without_runs_says_which_brokers_keep_them():
    import types

    from fastq.broker.base import Broker

    with pytest.raises(
        fastq.ConfigError,
        match=r"^bare:// keeps no workflow runs; the memory://, sqlite:// and postgresql:// "
        r"brokers do$",
    ):
        Broker.run_transaction(types.SimpleNamespace(url="bare://"), lambda tx: None)  # type: ignore[arg-type]


def test_types_are_named_short_and_fit_by_subclass_and_optional():
    assert type_name(list[Product]) == "list[Product]"
    assert type_name(dict[str, int] | None) == "dict[str, int] | None"
    assert fits(int | None, int) and fits(Product, Product) and not fits(int, str)
