"""`cortex tail`: show a node's event log as it grows, filtered, as lines or JSON lines."""

from __future__ import annotations

import argparse
import signal
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tail",
        help="show a node's events as they arrive (filters, --follow, --json)",
        description=(
            "Print the last events of a node's log in arrival order: time (UTC), author short id, seq, type "
            "and the key fields, coloured on a terminal, or one JSON object per line with --json. The log is "
            "opened read-only, so tailing a running node is safe. Without --log or --data-dir it reads "
            "$CORTEX_DATA_DIR/events.db, else the log in the data_dir of $CORTEX_HOME/config.yaml (default "
            "~/.cortex/config.yaml)."
        ),
    )
    from replay.arguments import add_log_arguments

    add_log_arguments(parser)
    parser.add_argument(
        "--bus",
        metavar="ADDRESS",
        help="print events live from the gossip bus instead of a log: nats://HOST:PORT, or a libp2p node's "
        "multiaddr with /p2p/PEER_ID; shows only events published from now on",
    )
    count = parser.add_mutually_exclusive_group()
    count.add_argument("-n", type=int, default=10, metavar="N", help="print the last N matching events (default: 10)")
    count.add_argument("--all", action="store_true", help="print every matching event")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new events until Ctrl-C")
    parser.add_argument(
        "--interval",
        type=float,
        default=0.2,
        metavar="SECONDS",
        help="with --follow: how often to check the log for new events (default: 0.2)",
    )
    parser.add_argument(
        "--duration", type=float, metavar="SECONDS", help="with --follow or --bus: stop after this many seconds (default: never)"
    )
    parser.add_argument(
        "--type", action="append", default=[], metavar="TYPE", help="only events of this type (repeat or comma-separate)"
    )
    parser.add_argument("--author", metavar="PEER", help="only events by this peer: its id, or the id's start or end")
    parser.add_argument(
        "--request",
        metavar="ID",
        help="only the event with this id, the events whose refs contain it, and the events whose body names it as "
        "request_id; a request id or event id, or a unique prefix of at least 8 hex digits (the whole 64-digit id "
        "with --bus)",
    )
    parser.add_argument(
        "--since",
        metavar="TIME",
        help="only events at or after TIME: a duration before now (10m, 2h), an ISO 8601 UTC time, or @EPOCH_MS",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per line (the signed envelope and id)")
    parser.set_defaults(func=run)


def _stop_on_signals() -> None:
    """Make Ctrl-C (SIGINT) and SIGTERM stop a follow cleanly with exit status 0.

    A shell that starts a job in the background without job control sets SIGINT to
    ignored, and Python keeps it ignored, so the handler is installed explicitly.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


def run(args: argparse.Namespace) -> int:
    from events.codec import Event
    from events.writer import wall_clock_ms
    from cortex.commands.status import resolve_log_path
    from replay.arguments import EXIT_OK, quiet_broken_pipe, report_error
    from replay.errors import ReplayError
    from replay.reader import EventFilter, LogReader
    from replay.requests import resolve_request_id
    from replay.render import event_json, event_line, json_line, make_console
    from replay.tail import TailOptions, follow, print_history
    from replay.times import parse_time_ms

    if args.n < 0:
        return report_error(f"-n {args.n} is negative; give a count of 0 or more")
    if args.interval <= 0:
        return report_error(f"--interval {args.interval} must be a positive number of seconds")
    if args.follow or args.bus:
        _stop_on_signals()
    if args.bus:
        if args.log is not None or args.data_dir is not None:
            return report_error("--bus reads the bus, not a log; leave out --log and --data-dir")
        return _run_bus(args)
    try:
        reader = LogReader(resolve_log_path(args))
        types = tuple(name.strip() for value in args.type for name in value.split(",") if name.strip())
        request = resolve_request_id(reader, args.request) if args.request else None
        since_ms = parse_time_ms(args.since, wall_clock_ms()) if args.since else None
    except ReplayError as error:
        return report_error(error)
    options = TailOptions(
        EventFilter(types=types, author=args.author, request=request, since_ms=since_ms),
        count=None if args.all else args.n,
        follow=args.follow,
        interval_s=args.interval,
        duration_s=args.duration,
    )
    console = make_console()

    def sink(event: Event) -> None:
        if args.json:
            sys.stdout.write(json_line(event_json(event)) + "\n")
        else:
            console.print(event_line(event))

    try:
        highest = print_history(reader, options, sink)
        sys.stdout.flush()
        if options.follow:
            follow(reader, options, sink, highest, flush=sys.stdout.flush)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        quiet_broken_pipe()
    finally:
        reader.close()
    return EXIT_OK


def _run_bus(args: argparse.Namespace) -> int:
    import asyncio

    from events.codec import Event
    from events.writer import wall_clock_ms
    from replay.arguments import EXIT_OK, quiet_broken_pipe, report_error
    from replay.bus_tail import BusTail, follow_bus
    from replay.errors import ReplayError
    from replay.reader import EventFilter
    from replay.render import event_json, event_line, json_line, make_console
    from replay.times import parse_time_ms
    from replay.views import available_views

    if args.request is not None and len(args.request) != 64:
        return report_error(f"--request {args.request!r}: with --bus give the whole 64-digit id")
    try:
        since_ms = parse_time_ms(args.since, wall_clock_ms()) if args.since else None
    except ReplayError as error:
        return report_error(error)
    types = tuple(name.strip() for value in args.type for name in value.split(",") if name.strip())
    event_filter = EventFilter(types=types, author=args.author, request=args.request, since_ms=since_ms)
    console = make_console()

    def sink(event: Event) -> None:
        if args.json:
            sys.stdout.write(json_line(event_json(event)) + "\n")
        else:
            console.print(event_line(event))
        sys.stdout.flush()

    def on_ready() -> None:
        print(f"following the bus at {args.bus}; Ctrl-C stops", file=sys.stderr, flush=True)

    available_views()  # registers the event types of every view, so lines show their family colour
    tail = BusTail(event_filter, sink)
    try:
        asyncio.run(follow_bus(args.bus, tail, args.duration, on_ready))
    except ReplayError as error:
        return report_error(error)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        quiet_broken_pipe()
    return EXIT_OK
