"""`cortex bench replay`: events/s folded through every view's reducer, against decode-only.

Both figures come from the same cached log in the same run. Decode-only reads every stored
event in canonical order and decodes it (`parse_event`, all schema checks, no signature
check). Folding does the same and applies each event to every available view, which is
what `cortex replay` does without `--verify`. Each is measured `--rounds` times, alternating,
and the best round counts, so a burst of load from other processes hurts neither side alone.
`--per-view` also folds through each view alone (best of `--rounds`, measured after the
main pair), to show which reducer costs what.

The log (default 1,000,000 events, `--quick` 50,000) is generated once by
`replay.synthetic` and cached under `--cache-dir`; the results name the event types it holds.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cortex.bench._common import BenchReport, Goal, add_common_arguments, emit

if TYPE_CHECKING:
    from replay.reader import LogReader
    from replay.views import LoadedView

logger = logging.getLogger(__name__)

DEFAULT_EVENTS = 1_000_000
QUICK_EVENTS = 50_000
FOLD_TARGET = 0.5


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cortex"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="fold rate of a 1M-event log through every view, against decode-only",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument("--events", type=int, metavar="N", help=f"events in the log (default {DEFAULT_EVENTS:,}, --quick {QUICK_EVENTS:,})")
    parser.add_argument("--rounds", type=int, default=1, metavar="N", help="measurements of each side, best counts (default: 1)")
    parser.add_argument("--per-view", action="store_true", help="also fold through each view alone (one more fold per view)")
    parser.add_argument(
        "--cache-dir", type=Path, default=default_cache_dir(), metavar="DIR",
        help="where the generated log is kept between runs (default: $XDG_CACHE_HOME/cortex or ~/.cache/cortex)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from replay.synthetic import cached_log, mix_types

    count = args.events or (QUICK_EVENTS if args.quick else DEFAULT_EVENTS)
    if count < 1000 or args.rounds < 1:
        print(f"error: --events {count} must be at least 1000 and --rounds {args.rounds} at least 1", file=sys.stderr)
        return 2
    started = time.perf_counter()

    def progress(written: int) -> None:
        if written % 100_000 == 0 or written == count:
            print(f"generating the bench log: {written:,} of {count:,} events", file=sys.stderr)

    path, generated = cached_log(args.cache_dir, count, progress)
    generate_s = time.perf_counter() - started
    report = BenchReport("replay")
    report.results.update({
        "events": count,
        "log_path": str(path),
        "log_bytes": path.stat().st_size,
        "log_generated_this_run": generated,
        "signature_checks": False,
    })
    if generated:
        report.results["generate_s"] = round(generate_s, 2)
    _measure(path, count, args.rounds, args.per_view, report)
    report.results["mix_types"] = ",".join(mix_types())
    decode_rate = report.results["decode_events_per_s"]
    fold_rate = report.results["fold_events_per_s"]
    report.goals.append(Goal("fold through all views vs decode-only", fold_rate / decode_rate, FOLD_TARGET))
    return emit(report, args.json)


def _measure(path: Path, count: int, rounds: int, per_view: bool, report: BenchReport) -> None:
    from replay.reader import LogReader
    from replay.views import available_views

    views = available_views()
    decode_s: list[float] = []
    fold_s: list[float] = []
    with LogReader(path) as reader:
        counts = dict(reader.query("SELECT type, COUNT(*) FROM events GROUP BY type ORDER BY type"))
        for _ in range(rounds):
            decode_s.append(_time_decode(reader, count))
            fold_s.append(_time_fold(reader, views, count))
        report.results["views_folded"] = ",".join(view.name for view in views)
        report.results["decode_s"] = round(min(decode_s), 3)
        report.results["fold_s"] = round(min(fold_s), 3)
        report.results["decode_events_per_s"] = round(count / min(decode_s), 1)
        report.results["fold_events_per_s"] = round(count / min(fold_s), 1)
        if per_view:
            for view in views:
                best_s = min(_time_fold(reader, [view], count) for _ in range(rounds))
                report.results[f"fold_{view.name}_only_events_per_s"] = round(count / best_s, 1)
    for type_name, type_count in counts.items():
        report.results[f"mix_{type_name}_events"] = type_count


def _time_decode(reader: LogReader, count: int) -> float:
    from events.codec import parse_event
    from replay.fold import paused_gc

    # The collector is paused here too, as Folder.run pauses it, so both sides run alike.
    started = time.perf_counter()
    decoded = 0
    with paused_gc():
        for wire in reader.canonical_wires():
            parse_event(wire)
            decoded += 1
    elapsed = time.perf_counter() - started
    if decoded != count:
        raise RuntimeError(f"decoded {decoded} events, but the log contains {count}")
    return elapsed


def _time_fold(reader: LogReader, views: list[LoadedView], count: int) -> float:
    from replay.fold import Folder

    started = time.perf_counter()
    folder = Folder(reader, views)
    applied = folder.run()
    elapsed = time.perf_counter() - started
    if applied != count:
        raise RuntimeError(f"folded {applied} events, but the log contains {count}")
    return elapsed
