"""Shared fixtures: both ring implementations, RabbitMQ wiring, and a /dev/shm leak check."""

from __future__ import annotations

import importlib
import os
import random
from pathlib import Path
from types import ModuleType

import pytest

from fastq.testing import require_amqp

CI = bool(os.environ.get("CI"))
AMQP_URL = os.environ.get("FASTQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
SHM = Path("/dev/shm")
NO_EXTENSIONS = bool(os.environ.get("FASTQ_NO_EXTENSIONS"))


def pytest_sessionstart(session: pytest.Session) -> None:
    """In CI the compiled ring must be what runs: a broken build never passes as the slow twin."""
    if CI and not NO_EXTENSIONS:
        from fastq.ring import IMPLEMENTATION

        assert IMPLEMENTATION == "cython", f"CI runs on IMPLEMENTATION={IMPLEMENTATION!r}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.parent.name == "amqp":
            item.add_marker(pytest.mark.amqp)
        if item.path.parent.name == "postgres":
            item.add_marker(pytest.mark.postgres)
        if item.path.parent.name in ("integration", "faults", "postgres"):
            item.add_marker(pytest.mark.multiprocess)
    # The RabbitMQ tests go last, the PostgreSQL ones just before them: some restart their
    # server, whose start-up burns CPU for a while on the cores that the engine's
    # timing-sensitive tests (autosize reactions) measure.
    items.sort(
        key=lambda item: (
            item.get_closest_marker("amqp") is not None,
            item.get_closest_marker("postgres") is not None,
        )
    )


def _fastq_segments() -> set[str]:
    return {p.name for p in SHM.iterdir() if p.name.startswith("fq-") or p.name.startswith("fqt-")}


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    """Every ring a test makes is unlinked by the end of the run: /dev/shm holds nothing new."""
    before = _fastq_segments()
    yield
    left = _fastq_segments() - before
    assert not left, f"segments left in /dev/shm after the suite: {sorted(left)}"


@pytest.fixture(
    params=[
        pytest.param(
            "cython",
            marks=[
                pytest.mark.cython,
                pytest.mark.skipif(NO_EXTENSIONS, reason="FASTQ_NO_EXTENSIONS=1 selects the twin"),
            ],
        ),
        "python",
    ]
)
def ring_impl(request: pytest.FixtureRequest) -> ModuleType:
    """The compiled fastq._core or its pure-Python twin: every ring test runs on both."""
    return importlib.import_module("fastq._core" if request.param == "cython" else "fastq._core_py")


@pytest.fixture
def make_ring(ring_impl: ModuleType):
    """Create rings that are closed and unlinked when the test ends, whatever happens."""
    made = []

    def make(size_bytes: int = 4096, **kw: object):
        ring = ring_impl.Ring.create(size_bytes, **kw)
        made.append(ring)
        return ring

    yield make
    for ring in made:
        ring.close()
        ring.unlink()


@pytest.fixture(scope="session")
def rand() -> random.Random:
    seed = int(os.environ.get("FASTQ_TEST_SEED", random.randrange(1 << 32)))
    print(f"random seed: FASTQ_TEST_SEED={seed}")
    return random.Random(seed)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """RabbitMQ's URL; skips when none answers, unless CI is set, where that is a failure."""
    return require_amqp(AMQP_URL)
