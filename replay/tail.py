"""`cortex tail`: print a node's events as they arrive, from its log file.

Events are shown in arrival order (the order in which the node stored them), like the lines
of a growing text file, not in the canonical replay order. Following a log costs one
`PRAGMA data_version` query per interval while nothing changes: SQLite changes that value
when another connection commits, and only then does tail query for new rows. A change
notification on the WAL file (inotify, say) would wake it sooner. But that file also
changes on checkpoints, and inotify is Linux only, so a short check interval is the simpler
contract: new events show up within one interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from events.codec import Event
from replay.reader import EventFilter, LogReader

DEFAULT_INTERVAL_S = 0.2
DEFAULT_COUNT = 10

EventSink = Callable[[Event], None]


@dataclass(frozen=True)
class TailOptions:
    """Tail settings: the filter, how many past events (None for all), and how to follow."""

    event_filter: EventFilter = EventFilter()
    count: int | None = DEFAULT_COUNT
    follow: bool = False
    interval_s: float = DEFAULT_INTERVAL_S
    duration_s: float | None = None
    """Stop following after this many seconds; None follows until interrupted."""


def print_history(reader: LogReader, options: TailOptions, sink: EventSink) -> int:
    """Print the past events the options select; return the highest rowid in the log."""
    if options.count is None:
        rows, highest = reader.arrivals_batch(options.event_filter, 0)
    else:
        highest = reader.max_rowid()
        rows = reader.last_arrivals(options.count, options.event_filter) if options.count > 0 else []
        if rows:
            highest = max(highest, rows[-1][0])
    for _rowid, event in rows:
        sink(event)
    return highest


def follow(
    reader: LogReader,
    options: TailOptions,
    sink: EventSink,
    after_rowid: int,
    flush: Callable[[], None] = lambda: None,
    stop: threading.Event | None = None,
) -> int:
    """Print new events until `duration_s` passes or `stop` is set; return how many were printed.

    Wakes every `interval_s` and reads only when the data version changed.
    """
    stop = stop or threading.Event()
    deadline = None if options.duration_s is None else time.monotonic() + options.duration_s
    version: int | None = None  # None: query once at once, for commits since the history was read
    last_rowid = after_rowid
    printed = 0
    while not stop.is_set():
        if deadline is not None and time.monotonic() >= deadline:
            break
        current = reader.data_version()
        if current != version:
            version = current
            rows, last_rowid = reader.arrivals_batch(options.event_filter, last_rowid)
            for _rowid, event in rows:
                sink(event)
            printed += len(rows)
            if rows:
                flush()
        wait_s = options.interval_s
        if deadline is not None:
            wait_s = max(0.0, min(wait_s, deadline - time.monotonic()))
        stop.wait(wait_s)
    return printed
