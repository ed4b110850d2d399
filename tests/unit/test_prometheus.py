"""/metrics without processes: the address, the setting, the missing extra, and what a tally adds
up to in the text format."""

from __future__ import annotations

import sys

import pytest

from fastq import wire
from fastq.config import Config, metrics_address
from fastq.errors import ConfigError


def test_a_bare_port_is_served_on_loopback_and_a_given_host_is_kept():
    assert metrics_address("9464") == ("127.0.0.1", 9464)
    assert metrics_address(":9464") == ("127.0.0.1", 9464)
    assert metrics_address("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert metrics_address("[::1]:9464") == ("::1", 9464)


def test_a_bad_metrics_address_says_what_is_expected():
    with pytest.raises(
        ConfigError,
        match=r"^metrics must be host:port or a port \(e.g. 127.0.0.1:9464\), got 'localhost:x'$",
    ):
        Config(metrics="localhost:x")


def test_fastq_metrics_is_read_by_from_env_only():
    assert Config.from_env({"FASTQ_METRICS": "127.0.0.1:9000"}).metrics == "127.0.0.1:9000"
    assert Config.from_env({}).metrics is None


def test_metrics_without_the_extra_is_a_config_error_naming_it(monkeypatch):
    from fastq.metrics import require

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # its import raises ImportError
    with pytest.raises(
        ConfigError,
        match=r"^metrics='127.0.0.1:9464' \(--metrics, FASTQ_METRICS, App.run\(metrics=...\)\) "
        r"needs prometheus_client, which is not installed \(import of prometheus_client halted; "
        r"None in sys.modules\); install the metrics extra: pip install 'fastq-engine\[metrics\]'$",
    ):
        require("127.0.0.1:9464")


def _counts(processed: int, failed: int, retried: int, dead: int, took: float) -> wire.Counts:
    handler = [0] * (len(wire.HANDLER_BUCKETS) + 1)
    handler[wire.HANDLER_BUCKETS.index(0.01)] = processed  # each took <= 0.01 s
    latency = [0] * (len(wire.LATENCY_BUCKETS) + 1)
    latency[-1] = processed  # each waited more than an hour
    return wire.Counts(
        "q", "t", processed, failed, retried, dead, handler, took, latency, 7200.0 * processed
    )


def test_tallies_of_two_workers_add_up_to_cumulative_buckets():
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from fastq.metrics import Metrics

    m = Metrics("127.0.0.1:0")
    payload = wire.tally_report([_counts(3, 1, 1, 0, 0.02)])[wire.COMPLETION.size :]
    m.tally(0, payload)
    m.tally(1, wire.tally_report([_counts(2, 2, 0, 3, 0.01)])[wire.COMPLETION.size :])
    m.tally(1, b"\x01not a tally")  # logged and ignored
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(generate_latest(m.registry).decode())
        for s in f.samples
    }
    q = (("queue", "q"), ("task", "t"))

    def outcome(name: str) -> float:
        return samples[("fastq_messages_total", (("outcome", name), *q))]

    assert [outcome(o) for o in ("processed", "failed", "retried", "dead")] == [5, 3, 1, 3]
    assert samples[("fastq_handler_seconds_count", q)] == 5
    assert samples[("fastq_handler_seconds_sum", q)] == pytest.approx(0.03)
    assert samples[("fastq_handler_seconds_bucket", (("le", "0.005"), *q))] == 0
    assert samples[("fastq_handler_seconds_bucket", (("le", "0.01"), *q))] == 5
    assert samples[("fastq_enqueue_to_start_seconds_bucket", (("le", "3600.0"), *q))] == 0
    assert samples[("fastq_enqueue_to_start_seconds_bucket", (("le", "+Inf"), *q))] == 5
    # a worker's tasks: its handler runs, and its messages dead before a handler (3 - (2 - 0) = 1)
    assert samples[("fastq_worker_tasks_total", (("worker", "0"),))] == 3
    assert samples[("fastq_worker_tasks_total", (("worker", "1"),))] == 2 + 1


def test_the_worker_flag_sets_the_apps_metrics_address_and_a_bad_one_is_a_usage_error():
    import argparse

    import fastq
    from fastq import cli

    app = fastq.App("flag", broker="memory://metrics-flag")
    module = type(sys)("metrics_flag_app")
    module.app = app  # type: ignore[attr-defined]
    sys.modules["metrics_flag_app"] = module
    try:
        args = argparse.Namespace(app="metrics_flag_app:app", metrics="9464")
        for unset in ("processes", "concurrency", "prefetch", "broker", "autosize"):
            setattr(args, unset, None)
        assert cli._app_with_overrides(args).config.metrics == "9464"
        args.metrics = "nine"
        with pytest.raises(cli.UsageError, match=r"^metrics must be host:port or a port"):
            cli._app_with_overrides(args)
    finally:
        del sys.modules["metrics_flag_app"]
