"""Fixtures of the PostgreSQL tests: the server's URL (skipped when none answers, a failure when
CI is set) and a schema of each test's own, dropped when the test ends."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastq.testing import require_postgres

# the process trees of the fault tests (tests/faults/faulttree.py) serve these tests too
sys.path.insert(0, str(Path(__file__).parent.parent / "faults"))


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return require_postgres()


async def _drop(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[str]:
    """A schema name of this test's own; dropped, with everything in it, after the test."""
    schema = f"fqt_{uuid.uuid4().hex[:12]}"
    yield schema
    asyncio.run(_drop(postgres_url, schema))


@pytest.fixture
def pg_url(postgres_url: str, pg_schema: str) -> str:
    """The broker URL of this test's own schema."""
    return f"{postgres_url}?schema={pg_schema}"
