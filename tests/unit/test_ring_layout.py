"""One memory layout, two implementations: what one writes, the other reads."""

from __future__ import annotations

import _posixshmem
import mmap
import os

import pytest

from fastq import _core, _core_py, _layout  # a missing extension is a failure here, never a skip
from fastq.errors import RingCorrupt

pytestmark = pytest.mark.cython


def test_ringheader_fields_sit_at_the_slots_the_layout_names():
    slots = {
        name[5:].lower(): value * 8
        for name, value in vars(_layout).items()
        if name.startswith("SLOT_")
    }
    assert _core._header_offsets() == slots
    assert max(slots.values()) < _layout.HEADER_BYTES


@pytest.mark.parametrize(("writer", "reader"), [(_core, _core_py), (_core_py, _core)])
def test_frames_written_by_one_implementation_read_back_through_the_other(writer, reader):
    # Given a small ring, so that frames wrap around its end many times
    ring = writer.Ring.create(512)
    other = reader.Ring.attach(ring.name)
    try:
        sent, got = [], []
        for i in range(300):
            frames = [bytes([i % 256]) * ((i * 37) % 200), bytes([(i + 1) % 256]) * (i % 7)]
            ring.put_many(frames)
            sent += frames
            got += other.get_many()
        # Then every frame came through whole, in order, and the counters agree on both sides
        assert got == sent
        assert ring.statistics() == other.statistics()
        assert other.statistics().frames_got == 600
    finally:
        other.close()
        ring.close()
        ring.unlink()


@pytest.mark.parametrize("impl", [_core, _core_py])
def test_attach_refuses_a_segment_that_is_not_a_ring(impl):
    name = "fqt-not-a-ring"
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 4096)
        with mmap.mmap(fd, 4096) as m:
            m[:8] = b"whatever"
        with pytest.raises(
            RingCorrupt,
            match=r"^segment 'fqt-not-a-ring' starts with 0x[0-9a-f]+, expected the fastq ring "
            r"magic",
        ):
            impl.Ring.attach(name)
    finally:
        os.close(fd)
        _posixshmem.shm_unlink("/" + name)
