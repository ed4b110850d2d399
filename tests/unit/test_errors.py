"""Errors mix in the standard-library classes that users already catch."""

from __future__ import annotations

import queue
import types

import pytest

import fastq
from fastq import errors


@pytest.mark.parametrize(
    ("cls", "stdlib"),
    [
        (errors.ConfigError, ValueError),
        (errors.FrameTooLarge, ValueError),
        (errors.RingFull, queue.Full),
        (errors.RingEmpty, queue.Empty),
        (errors.RingNotFound, FileNotFoundError),
        (errors.PeerLost, errors.RingClosed),
        (errors.BrokerConnectionError, ConnectionError),
        (errors.MessageError, ValueError),
        (errors.LoadError, ImportError),
    ],
)
def test_each_error_is_also_the_stdlib_class_users_catch(cls, stdlib):
    assert issubclass(cls, stdlib)
    assert issubclass(cls, errors.FastqError)


def test_every_public_error_is_exported_from_the_package():
    public = {
        n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)
    }
    assert public <= set(fastq.__all__)


def test_the_public_surface_is_exactly_all():
    assert len(set(fastq.__all__)) == len(fastq.__all__)
    assert all(hasattr(fastq, name) for name in fastq.__all__)
    public = {
        n
        for n, v in vars(fastq).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType)
    }
    assert public == set(fastq.__all__) - {"__version__"}
