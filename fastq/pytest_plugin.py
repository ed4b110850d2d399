"""fastq's pytest plugin (registered by the ``pytest11`` entry point, so it loads wherever fastq
is installed): fixtures for testing an app without a broker or worker processes.

- ``fastq_app``: your app, on a ``memory://`` broker of its own for the test (its broker is back
  after it). Name it once, in the pytest configuration::

      [tool.pytest.ini_options]
      fastq_app = "shop.tasks:app"

  or override the fixture in a ``conftest.py`` (any fixture that returns an App; wrap it in
  ``with app.testing(): yield app`` to keep it off the real broker).
- ``fastq_eager_app``: the same, in eager mode: each ``send()`` runs its handler at once.
- ``fastq_drain``: ``fastq.testing.drain``: ``fastq_drain(fastq_app)`` runs every queued
  message through the workers' handler path, in this process, and returns the counts.
- ``fastq_wait_until``: ``fastq.testing.wait_until``, the wait that never sleeps blind.

fastq is imported by the fixtures only, so a test run that uses none of them pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

#: the ini option that names the app under test
INI = "fastq_app"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(INI, "module:attribute of the fastq.App that the fastq_app fixture rebinds")


def _app(config: pytest.Config) -> Any:
    from fastq import _load
    from fastq.app import App
    from fastq.errors import LoadError

    spec = str(config.getini(INI) or "")
    if not spec:
        raise pytest.UsageError(
            'the fastq_app fixture needs your app: set fastq_app = "module:app" in '
            "[tool.pytest.ini_options], or override the fastq_app fixture in conftest.py"
        )
    try:
        app = _load.load(spec)
    except LoadError as e:
        raise pytest.UsageError(f"fastq_app = {spec!r}: {e}") from None
    if not isinstance(app, App):
        raise pytest.UsageError(f"fastq_app = {spec!r} is a {type(app).__name__}, not a fastq.App")
    return app


@pytest.fixture
def fastq_app(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The app named by the ``fastq_app`` ini option, on a ``memory://`` broker of its own."""
    with _app(request.config).testing() as app:
        yield app


@pytest.fixture
def fastq_eager_app(request: pytest.FixtureRequest) -> Iterator[Any]:
    """``fastq_app`` in eager mode: each ``send()`` runs its handler at once."""
    with _app(request.config).testing(eager=True) as app:
        yield app


@pytest.fixture
def fastq_drain() -> Callable[..., Any]:
    """``fastq.testing.drain``."""
    from fastq.testing import drain

    return drain


@pytest.fixture
def fastq_wait_until() -> Callable[..., None]:
    """``fastq.testing.wait_until``."""
    from fastq.testing import wait_until

    return wait_until
