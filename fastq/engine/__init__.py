"""The parent side of the engine: the supervisor and the rooms it is built of.

- ``fleet``: the worker processes (shared with ``fastq.Pool``): spawn, watch, restart, suspects,
  recycling, drain, unlink;
- ``placement``: which workers run each queue, and the slots each worker gets;
- ``pump``: each queue's settle-and-claim loop with the broker;
- ``tuning``: the autosize loop (samples -> controllers -> apply);
- ``supervisor``: the life cycle, signals, drain and statistics; ``run_app``.
"""
