"""The `cortex` command line.

Subcommands live in `cortex.commands`: each module there defines
`register(subparsers)`, which adds its parser and sets `func` on it. `func`
takes the parsed arguments and returns the exit status. Benchmarks live in
`cortex.bench` and register under `cortex bench NAME` the same way.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from cortex import __version__


def _register_all(package_name: str, subparsers: argparse._SubParsersAction) -> None:
    package = importlib.import_module(package_name)
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package_name}.{module_info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    """Build the parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="cortex",
        description="Cortex: decentralized LLM inference over a swarm of peers.",
    )
    parser.add_argument("--version", action="version", version=f"cortex {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level for messages on stderr (default: WARNING)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _register_all("cortex.commands", subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `cortex` command line and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0 if args.command is None else 2
    status: int = func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
