"""Fixtures of the fault tests: a worker tree on SQLite, and the machine's means to break things
for real (a small tmpfs, a read-only bind mount), skipped with the reason only when the machine
does not allow them and CI is not set."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from faulttree import Tree

CI = bool(os.environ.get("CI"))


@pytest.fixture
def sqlite_tree(tmp_path: Path) -> Iterator[Tree]:
    tree = Tree(tmp_path, f"sqlite:///{tmp_path / 'q.db'}")
    yield tree
    tree.close()


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def _allowed(what: str, *cmd: str) -> None:
    try:
        _run(*cmd)
    except (OSError, subprocess.CalledProcessError) as e:
        if CI:
            raise
        pytest.skip(f"this machine does not allow {what} ({e}); CI runs it")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs: a disk that fills up for real."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    _allowed("mounting a tmpfs", "mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount))
    try:
        yield mount
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _run("umount", "-l", str(mount))


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make ``directory`` and the files in it unwritable for everyone, root included, while
    files stay open (``chattr +i``: a read-only remount would refuse with files open for
    writing), then writable again. SQLite's ``-shm`` file is left out: it is a shared memory
    mapping, and a write to a mapped immutable page is a SIGBUS, not an error SQLite can see
    (a read-only remount maps it read-only instead)."""
    paths = [str(directory), *(str(p) for p in directory.iterdir() if not p.name.endswith("-shm"))]
    _allowed("chattr +i (an ext4 or similar file system)", "chattr", "+i", *paths)
    try:
        yield
    finally:
        _run("chattr", "-i", *paths)
