"""Arguments and exit statuses shared by `cortex tail`, `cortex replay` and `cortex status`.

This module imports nothing heavy, because the commands import it while `cortex --help`
builds its parser.

Exit statuses of the three commands: 0 success, 1 problems found (`--verify` failures,
`diff` differences), 2 a usage or input error (missing log, bad `--until`, unknown view).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

LOG_FILE_NAME = "events.db"
"""The log's file name inside a node's data directory."""

DATA_DIR_ENV = "CORTEX_DATA_DIR"
EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


def add_log_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--log PATH` and `--data-dir DIR`, the two ways to name a node's log."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--log", type=Path, metavar="PATH", help=f"the log file ({LOG_FILE_NAME}) to read")
    group.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help=f"a node's data directory; reads DIR/{LOG_FILE_NAME} (default: ${DATA_DIR_ENV} if set)",
    )


def log_path(args: argparse.Namespace) -> Path:
    """Return the log that `--log` or `--data-dir` names; raise LogOpenError if none is given."""
    from replay.errors import LogOpenError

    if args.log is not None:
        return Path(args.log)
    data_dir = args.data_dir if args.data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        raise LogOpenError(f"no log given: pass --log PATH or --data-dir DIR, or set {DATA_DIR_ENV}")
    return Path(data_dir) / LOG_FILE_NAME


def report_error(message: object) -> int:
    """Print `error: MESSAGE` on stderr and return the usage exit status."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def quiet_broken_pipe() -> None:
    """Point stdout at /dev/null after the reader of a pipe went away (`| head`), so exit is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
