"""The ``fastq`` command (also ``python -m fastq``): ``bench`` and ``send``.

Bad arguments exit with RET_USAGE and one line that says what to change, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

RET_OK = 0
RET_ERROR = 1
RET_USAGE = 2


class UsageError(Exception):
    """A bad argument: printed as one line, exit RET_USAGE."""


def load(spec: str) -> Any:
    """The object named by ``module:attribute`` (the working directory is importable)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{spec!r} is not module:attribute, e.g. myproject.tasks:app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise UsageError(f"cannot import {module_name!r}: {e}; run from the directory that holds it") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no {attr!r}") from None
    return obj


def _send(spec: str, arguments: str) -> int:
    import msgspec

    from fastq.app import Task

    task = load(spec)
    if not isinstance(task, Task):
        raise UsageError(f"{spec} is a {type(task).__name__}, not a task made with @app.task")
    try:
        values = msgspec.json.decode(arguments)
    except msgspec.DecodeError as e:
        raise UsageError(f"arguments {arguments!r} are not JSON ({e}); pass a list or an object") from None
    try:
        if isinstance(values, list):
            message_id = task.send(*values)
        elif isinstance(values, dict):
            message_id = task.send(**values)
        else:
            raise UsageError(f"arguments must be a JSON list (positional) or object (by name), got {arguments!r}")
    except (TypeError, msgspec.ValidationError) as e:
        raise UsageError(f"arguments do not fit {task.name}{task.signature}: {e}") from None
    print(message_id)
    return RET_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastq", description="fastq: queued messages and tasks on every core")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="measure fastq against the baselines on this machine")
    bench.add_argument("suite", nargs="?", default="ring", choices=["ring"], help="what to measure (default: ring)")
    bench.add_argument("--runs", type=int, default=3, help="runs per scenario; the median is reported (default 3)")
    bench.add_argument("--sizes", default="100,1024,65536", help="frame sizes in bytes (default 100,1024,65536)")
    bench.add_argument("--seconds", type=float, default=0.4, help="target length of one run (default 0.4)")
    bench.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH ('-' for stdout)")
    send = commands.add_parser("send", help="enqueue one task call from a shell; prints its message id")
    send.add_argument("task", help="module:task, e.g. shop.tasks:send_receipt")
    send.add_argument("arguments", nargs="?", default="[]", help="JSON list (positional) or object (by name)")
    args = parser.parse_args(argv)
    try:
        if args.command == "send":
            return _send(args.task, args.arguments)
        from fastq._bench import ring

        try:
            sizes = [int(s) for s in args.sizes.split(",")]
        except ValueError:
            raise UsageError(f"--sizes takes comma-separated integers, got {args.sizes!r}") from None
        if args.runs < 1:
            raise UsageError(f"--runs must be >= 1, got {args.runs}")
        return ring.main(sizes=sizes, runs=args.runs, seconds=args.seconds, json_path=args.json)
    except UsageError as e:
        print(f"fastq {args.command}: {e}", file=sys.stderr)
        return RET_USAGE


if __name__ == "__main__":
    sys.exit(main())
