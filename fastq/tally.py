"""What a worker counts for the supervisor's /metrics, written on the middleware hooks.

A worker whose supervisor serves metrics (``WorkerSpec.metrics``) puts a ``Tally`` first in its
app's middleware chain: an ordinary middleware (``before_process``, ``after_process``,
``after_reject``), called by the executor like any other. Per queue and handler it counts the
runs by outcome, bins each handler's duration (the wall clock around the other hooks and the
handler) and each message's enqueue-to-start latency (the envelope's ``enqueued_at`` against
this host's clock) into the buckets of ``fastq.wire``. Its hooks are compiled (fastq._hooks, with
its twin fastq._hooks_py): written in Python they cost a noop message ~0.55 us of the worker's
CPU, several percent of its throughput. Nothing leaves the process per message: the executor
hands the counts to the runtime as one report frame that goes in the same ``put_many`` as the
completions they count (``report``), and they start again from zero.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fastq import wire

if TYPE_CHECKING:
    from fastq._hooks import Tally

    IMPLEMENTATION: str
elif os.environ.get("FASTQ_NO_EXTENSIONS"):
    from fastq._hooks_py import Tally

    IMPLEMENTATION = "python"
else:
    from fastq._hooks import Tally  # an ImportError here means a broken build

    IMPLEMENTATION = "cython"

__all__ = ["IMPLEMENTATION", "Tally", "new", "report"]


def new() -> Tally:
    """A tally binning into the buckets the supervisor's histograms have."""
    return Tally(wire.HANDLER_BUCKETS, wire.LATENCY_BUCKETS)


def report(tally: Tally) -> bytes | None:
    """The report frame of everything ``tally`` counted since the last one (None: nothing);
    the counts restart."""
    if not tally.pending:
        return None
    return wire.tally_report([wire.Counts(*c) for c in tally.take()])
