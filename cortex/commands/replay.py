"""`cortex replay`: rebuild views from a log, trace a request, verify a log, compare two logs."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from replay.reader import LogReader

USAGE = """cortex replay LOG [--until X] [--view NAME] [--json]     the views after folding the log
       cortex replay LOG timeline REQUEST_ID                  every event of one request
       cortex replay LOG --verify                             check signatures, ids, sequences
       cortex replay LOG --step                               fold one event at a time
       cortex replay diff LOG_A LOG_B                         compare two nodes' logs
       cortex replay --list-views                             the views and whether they load"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="rebuild views from a log, trace a request, verify or compare logs",
        usage=USAGE,
        description=(
            "Fold a node's log (a file, or a data directory holding events.db) through the same reducers the node "
            "uses, in canonical order (lamport, author, seq), and print the views at any point. Signatures are "
            "checked only with --verify. Exit status: 0 fine, 1 problems found (--verify) or logs differ (diff), "
            "2 usage or input error."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", nargs="*", metavar="ARG", help="LOG [timeline REQUEST_ID | verify | step], or diff LOG_A LOG_B")
    parser.add_argument(
        "--until",
        metavar="EVENT_ID|TIME|INDEX",
        help="stop after this event: an index in canonical order from 0 (negative counts from the end), an event id "
        "or id prefix, or a time (ISO 8601 UTC, @EPOCH_MS, or a duration before now such as 10m) to fold every event "
        "up to that time",
    )
    parser.add_argument(
        "--view", action="append", default=[], metavar="NAME",
        help="a view to rebuild: registry, scheduler, router or quorum (repeatable; default: every available view)",
    )
    parser.add_argument("--timeline", metavar="REQUEST_ID", help="print the timeline of this request: its id or a unique prefix of at least 8 hex digits")
    parser.add_argument("--verify", action="store_true", help="check every signature, id and per-author sequence")
    parser.add_argument("--step", action="store_true", help="step mode: read commands (n, c, v, d, q) from stdin")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--list-views", action="store_true", help="list the registered views and whether each one loads")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replay.arguments import EXIT_OK, EXIT_USAGE, quiet_broken_pipe, report_error
    from replay.errors import ReplayError

    try:
        return _dispatch(args)
    except ReplayError as error:
        return report_error(error)
    except KeyboardInterrupt:
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader of a pipe went away (`| head`): what it read is all it wanted.
        quiet_broken_pipe()
        return EXIT_OK


def _dispatch(args: argparse.Namespace) -> int:
    from replay.arguments import report_error
    from replay.reader import LogReader

    target = list(args.target)
    if args.list_views:
        return _list_views(args)
    if len(target) == 3 and target[0] == "diff":
        return _diff(args, target[1], target[2])
    if not target or len(target) > 3:
        return report_error(f"expected LOG [timeline REQUEST_ID | verify | step] or diff LOG_A LOG_B, got {target}")
    action, *rest = target[1:] or ["view"]
    if args.timeline:
        action, rest = "timeline", [args.timeline]
    elif args.verify:
        action = "verify"
    elif args.step:
        action = "step"
    expected_arguments = {"view": 0, "verify": 0, "step": 0, "timeline": 1}
    if action not in expected_arguments or len(rest) != expected_arguments[action]:
        return report_error(f"unknown replay form {' '.join(target)!r}; see cortex replay --help")
    with LogReader(target[0]) as reader:
        if action == "step":
            return _step(args, reader)
        # One read transaction, so a log that a running node appends to stays one consistent state.
        with reader.snapshot():
            if action == "timeline":
                return _timeline(args, reader, rest[0])
            if action == "verify":
                return _verify(args, reader)
            return _views(args, reader)


def _list_views(args: argparse.Namespace) -> int:
    from replay.render import json_line
    from replay.views import view_availability

    availability = view_availability()
    if args.json:
        print(json_line({spec.name: {"module": spec.module, "available": reason is None, "reason": reason}
                         for spec, reason in availability}))
        return 0
    for spec, reason in availability:
        print(f"{spec.name:<10} {'available' if reason is None else 'unavailable'}  {spec.description}")
        if reason is not None:
            print(f"{'':<10} {reason}")
    return 0


def _unavailable(names: list[str]) -> dict[str, str]:
    from replay.views import view_availability

    return {spec.name: reason for spec, reason in view_availability() if reason is not None and spec.name not in names}


def _views(args: argparse.Namespace, reader: LogReader) -> int:
    from events.writer import wall_clock_ms
    from replay.fold import Folder
    from replay.render import json_line, make_console
    from replay.tables import view_tables
    from replay.times import format_time_ms, parse_until
    from replay.views import resolve_views, view_digest, view_json

    views = resolve_views(args.view)
    until = parse_until(args.until, reader, wall_clock_ms()) if args.until else None
    if until is not None and until.time_ms is not None:
        cutoff = until.time_ms
        folder = Folder(reader, views, include=lambda event: event.time_ms <= cutoff)
        folder.run()
        now_ms = cutoff
    else:
        folder = Folder(reader, views)
        folder.run(None if until is None else until.index)
        now_ms = folder.now_ms or 0
    unavailable = {} if args.view else _unavailable(args.view)
    if args.json:
        print(json_line({
            "log": str(reader.path),
            "until": None if until is None else until.text,
            "index": folder.index,
            "events_applied": folder.applied_count,
            "now_ms": now_ms,
            "excluded_authors": folder.excluded,
            "views": {name: {"digest": view_digest(view), "view": view_json(view)} for name, view in folder.views.items()},
            "unavailable_views": unavailable,
        }))
        return 0
    console = make_console()
    # Index = position in canonical order. A time --until folds a subset of the events read, and
    # an equivocator's later events are skipped, so the count can be below index + 1.
    subset = ", the ones with a time at or before --until" if until is not None and until.time_ms is not None else ""
    console.print(f"{reader.path}: folded {folder.applied_count} of the first {folder.index + 1} events in canonical "
                  f"order (indexes 0 to {folder.index}){subset}; now = {format_time_ms(now_ms)} UTC")
    for name, view in folder.views.items():
        for renderable in view_tables(name, view, now_ms, view_digest(view)):
            console.print(renderable)
    for name, reason in unavailable.items():
        console.print(f"note: view {name} not shown: {reason}", style="dim")
    return 0


def _timeline(args: argparse.Namespace, reader: LogReader, request: str) -> int:
    from replay.render import json_line, make_console
    from replay.reports import print_timeline
    from replay.requests import resolve_request_id
    from replay.timeline import build_timeline

    timeline = build_timeline(reader, resolve_request_id(reader, request))
    if args.json:
        print(json_line(timeline.to_json()))
    else:
        print_timeline(make_console(), timeline)
    return 0


def _verify(args: argparse.Namespace, reader: LogReader) -> int:
    from replay.arguments import EXIT_OK, EXIT_PROBLEMS
    from replay.render import json_line, make_console
    from replay.reports import print_verify
    from replay.verify import verify_log

    report = verify_log(reader)
    if args.json:
        print(json_line(report.to_json()))
    else:
        print_verify(make_console(), report)
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _step(args: argparse.Namespace, reader: LogReader) -> int:
    from replay.fold import Folder
    from replay.render import make_console
    from replay.step import Stepper
    from replay.views import resolve_views

    stepper = Stepper(Folder(reader, resolve_views(args.view)), make_console())
    stepper.run(sys.stdin, prompt=sys.stdin.isatty())
    return 0


def _diff(args: argparse.Namespace, path_a: str, path_b: str) -> int:
    from replay.arguments import EXIT_OK, EXIT_PROBLEMS
    from replay.diff import diff_logs
    from replay.reader import LogReader
    from replay.render import json_line, make_console
    from replay.reports import print_diff
    from replay.views import resolve_views

    views = resolve_views(args.view)
    with LogReader(path_a) as reader_a, LogReader(path_b) as reader_b, reader_a.snapshot(), reader_b.snapshot():
        report = diff_logs(reader_a, reader_b, views)
    if args.json:
        print(json_line(report.to_json()))
    else:
        print_diff(make_console(), report, str(reader_a.path), str(reader_b.path))
    return EXIT_OK if report.same_events and report.same_views else EXIT_PROBLEMS
