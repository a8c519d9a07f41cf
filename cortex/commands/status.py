"""`cortex status`: the swarm at a glance from a node's log: peers, coverage, requests in flight."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show peers, model coverage and requests in flight from a node's log",
        description=(
            "Fold a node's log through its views and show the swarm: peers (id, address, hardware, liveness, "
            "trust, load), each model's fragments with their live replica counts and the gaps, and the requests "
            "in flight. Liveness is judged against the wall clock (or --at). A table on a terminal, one JSON "
            "object otherwise (or with --json). Without --log or --data-dir it reads $CORTEX_DATA_DIR/events.db, "
            "else the log in the data_dir of $CORTEX_HOME/config.yaml (default ~/.cortex/config.yaml)."
        ),
    )
    from replay.arguments import add_log_arguments

    add_log_arguments(parser)
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON even on a terminal (one object per refresh)")
    output.add_argument("--table", action="store_true", help="print tables even when stdout is not a terminal")
    parser.add_argument("--watch", action="store_true", help="refresh until Ctrl-C (or --count refreshes)")
    parser.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="with --watch: seconds between refreshes (default: 2)")
    parser.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N refreshes")
    parser.add_argument(
        "--at", metavar="TIME", help="judge liveness at TIME instead of now (ISO 8601 UTC, @EPOCH_MS, or a duration before now)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replay.arguments import EXIT_OK, quiet_broken_pipe, report_error
    from replay.errors import ReplayError
    from replay.live import LiveViews
    from replay.reader import LogReader
    from replay.views import available_views, view_availability

    if args.interval <= 0:
        return report_error(f"--interval {args.interval} must be a positive number of seconds")
    if args.count is not None and args.count < 1:
        return report_error(f"--count {args.count} must be at least 1")
    try:
        reader = LogReader(resolve_log_path(args))
        views = available_views()
        if "registry" not in [view.name for view in views]:
            return report_error("the registry view does not load in this build; `cortex replay --list-views` says why")
        live = LiveViews(reader, views)
    except ReplayError as error:
        return report_error(error)
    unavailable = {spec.name: reason for spec, reason in view_availability() if reason is not None}
    as_json = args.json or not (args.table or sys.stdout.isatty())
    refreshes = 0
    try:
        while True:
            try:
                _print_status(live.views, unavailable, _now_ms(args), as_json, clear=args.watch and not as_json)
            except ReplayError as error:
                return report_error(error)
            refreshes += 1
            if not args.watch or (args.count is not None and refreshes >= args.count):
                break
            time.sleep(args.interval)
            live.refresh()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        quiet_broken_pipe()
    finally:
        reader.close()
    return EXIT_OK


def resolve_log_path(args: argparse.Namespace) -> Path:
    """Return the log that --log, --data-dir or CORTEX_DATA_DIR names, else the one of the home config's data_dir.

    Raises LogOpenError when none is given and the home config is missing or invalid.
    """
    import os

    from cortex.node.config import ConfigError
    from cortex.node.home import home_data_dir
    from replay.arguments import DATA_DIR_ENV, LOG_FILE_NAME, log_path
    from replay.errors import LogOpenError

    if args.log is not None or args.data_dir is not None or os.environ.get(DATA_DIR_ENV):
        return log_path(args)
    try:
        return home_data_dir() / LOG_FILE_NAME
    except ConfigError as error:
        raise LogOpenError(
            f"no log given and the default config cannot be used ({error}); pass --log PATH or --data-dir DIR, "
            f"or set {DATA_DIR_ENV}"
        ) from None


def _now_ms(args: argparse.Namespace) -> int:
    from events.writer import wall_clock_ms
    from replay.times import parse_time_ms

    now = wall_clock_ms()
    return parse_time_ms(args.at, now) if args.at else now


def _print_status(views: dict[str, Any], unavailable: dict[str, str], now_ms: int, as_json: bool, clear: bool) -> None:
    from replay.render import json_line, make_console
    from replay.status import swarm_status
    from replay.tables import status_tables

    status = swarm_status(views, unavailable, now_ms)
    if as_json:
        sys.stdout.write(json_line(status) + "\n")
        sys.stdout.flush()
        return
    console = make_console()
    if clear:
        console.clear()
    for renderable in status_tables(status):
        console.print(renderable)
