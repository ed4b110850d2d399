"""Dispatcher benchmarks for pytest-benchmark (``pytest bench --benchmark-only``).

The supervisor's per-batch work in one process, on both implementations: route a batch of
deliveries to two workers' rings (least busy first, header and body copied in), read the
frames back as a worker would, and complete them. The baseline is what the supervisor did
before the dispatcher: pack each header in Python, concatenate it with the body, and put the
frames with ``put_many``.
"""

from __future__ import annotations

import importlib
import os

import pytest

from fastq._layout import COMPLETION, DELIVERY

BATCH = 256
BODY_BYTES = 100


@pytest.mark.parametrize("impl", ["fastq._core", "fastq._core_py", "python framing + put_many"])
def bench_dispatch_and_complete_a_batch(benchmark, impl):
    benchmark.group = f"dispatch-{BATCH}x{BODY_BYTES}B"
    mod = importlib.import_module("fastq._core" if impl.startswith("python") else impl)
    body = os.urandom(BODY_BYTES)
    items = [(tag, 0, 0, body) for tag in range(1, BATCH + 1)]
    done = [[COMPLETION.pack(tag, 0, 0.0) for tag, *_ in items[w::2]] for w in (0, 1)]
    with mod.Ring.create(8 << 20) as r0, mod.Ring.create(8 << 20) as r1:
        rings = (r0, r1)
        if impl.startswith("python"):

            def round_trip():
                for w, ring in enumerate(rings):
                    ring.put_many([DELIVERY.pack(t, n, q) + b for t, n, q, b in items[w::2]])
                return sum(len(ring.get_many(BATCH)) for ring in rings)
        else:
            d = mod.Dispatcher(2)
            for w, ring in enumerate(rings):
                d.attach(w, ring)

            def round_trip():
                assert d.dispatch(items) == []
                got = sum(len(ring.get_many(BATCH)) for ring in rings)
                for w in (0, 1):
                    d.complete(w, done[w])
                return got

        assert benchmark(round_trip) == BATCH
    benchmark.extra_info["deliveries_per_round"] = BATCH
