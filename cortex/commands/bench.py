"""`cortex bench NAME`: benchmarks that follow the project's bench conventions.

Each module in `cortex.bench` defines `register(subparsers)` and adds one
bench. A bench prints a table, or with `--json` writes one JSON object with
`bench`, `machine`, `results` and `goals` to stdout and the table to stderr.
"""

from __future__ import annotations

import argparse

from cortex.cli import _register_all


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark and print its table (or JSON with --json)",
        description="Run a benchmark. Every bench accepts --json and --quick.",
    )
    benches = parser.add_subparsers(dest="bench", metavar="NAME")
    _register_all("cortex.bench", benches)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
