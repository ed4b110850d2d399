"""Config: defaults, the FASTQ_* environment, and errors that name the setting."""

from __future__ import annotations

import pytest

from fastq.config import Config
from fastq.errors import ConfigError


def test_defaults_are_the_embedded_broker_and_autosize():
    c = Config()
    assert c.broker_url == "sqlite:///fastq.db"
    assert (c.processes, c.concurrency, c.prefetch) == (None, None, None)
    assert c.shutdown_timeout == 30.0


def test_environment_variables_are_parsed_and_overrides_win():
    env = {
        "FASTQ_PROCESSES": "4",
        "FASTQ_PIN_CPUS": "no",
        "FASTQ_SHUTDOWN_TIMEOUT": "2.5",
        "FASTQ_BROKER_URL": "memory://x",
        "FASTQ_PREFETCH": "none",
    }
    c = Config.from_env(env, processes=3, concurrency=None)
    assert (c.processes, c.pin_cpus, c.shutdown_timeout, c.broker_url, c.prefetch) == (
        3,
        False,
        2.5,
        "memory://x",
        None,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"FASTQ_PROCESSES": "four"},
            r"^FASTQ_PROCESSES='four' is not valid: Expected `int \| null`, got `str`$",
        ),
        ({"FASTQ_PIN_CPUS": "maybe"}, r"^FASTQ_PIN_CPUS='maybe' is not valid: expected one of 1/0"),
        ({"FASTQ_CONCURRENCY": "0"}, r"^concurrency must be >= 1 or None, got 0$"),
        ({"FASTQ_BROKER_URL": "fastq.db"}, r"^broker_url must look like sqlite:///path"),
    ],
)
def test_bad_settings_name_the_setting(env, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_env(env)


def test_a_message_limit_must_fit_the_rings():
    with pytest.raises(ConfigError, match=r"exceeds half of ring_size_bytes"):
        Config(max_message_bytes=2 << 20, ring_size_bytes=2 << 20)
