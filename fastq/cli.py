"""The ``fastq`` command (also ``python -m fastq``)."""

from __future__ import annotations

import argparse
import sys

RET_OK = 0
RET_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastq", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="measure fastq against the baselines on this machine")
    bench.add_argument("suite", nargs="?", default="ring", choices=["ring"], help="what to measure (default: ring)")
    bench.add_argument("--runs", type=int, default=3, help="runs per scenario; the median is reported (default 3)")
    bench.add_argument("--sizes", default="100,1024,65536", help="frame sizes in bytes (default 100,1024,65536)")
    bench.add_argument("--seconds", type=float, default=0.4, help="target length of one run (default 0.4)")
    bench.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH ('-' for stdout)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from fastq._bench import ring

        try:
            sizes = [int(s) for s in args.sizes.split(",")]
        except ValueError:
            parser.error(f"--sizes takes comma-separated integers, got {args.sizes!r}")
        if args.runs < 1:
            parser.error(f"--runs must be >= 1, got {args.runs}")
        return ring.main(sizes=sizes, runs=args.runs, seconds=args.seconds, json_path=args.json)
    return RET_USAGE


if __name__ == "__main__":
    sys.exit(main())
