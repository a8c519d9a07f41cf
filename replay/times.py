"""Times and positions as operators type them: `10m`, `2026-12-04T20:31:10Z`, `@1764880270000`, `42`.

All times are UTC. Event times are the authors' wall clocks in integer ms since the Unix
epoch, so skew between peers shows up in every time-based selection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from replay.errors import EventNotFound, SelectionError
from replay.reader import LogReader

_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_HEX = re.compile(r"[0-9a-f]{4,64}")

TIME_FORMS = "a duration before now (30s, 10m, 2h, 1d), an ISO 8601 time in UTC (2026-12-04T20:31:10Z) or @EPOCH_MS"


def parse_time_ms(text: str, now_ms: int) -> int:
    """Return the time `text` names, in ms since the epoch; raise SelectionError naming the forms."""
    text = text.strip()
    duration = _DURATION.fullmatch(text)
    if duration:
        return now_ms - int(duration.group(1)) * _UNIT_MS[duration.group(2)]
    if text.startswith("@") and text[1:].isdigit():
        return int(text[1:])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SelectionError(f"{text!r} is not a time; use {TIME_FORMS}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def format_time_ms(time_ms: int) -> str:
    """Format ms since the epoch as `YYYY-MM-DD HH:MM:SS.mmm` in UTC."""
    moment = datetime.fromtimestamp(time_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{time_ms % 1000:03d}"


def format_duration_ms(duration_ms: int) -> str:
    """Format a duration compactly: `850 ms`, `12.4 s`, `3 m 05 s`."""
    sign = "-" if duration_ms < 0 else ""
    duration_ms = abs(duration_ms)
    if duration_ms < 1_000:
        return f"{sign}{duration_ms} ms"
    if duration_ms < 60_000:
        return f"{sign}{duration_ms / 1000:.1f} s"
    minutes, milliseconds = divmod(duration_ms, 60_000)
    return f"{sign}{minutes} m {milliseconds // 1000:02d} s"


@dataclass(frozen=True)
class Until:
    """A replay's stopping point: after the event at `index`, or with every event up to `time_ms`."""

    index: int | None = None
    time_ms: int | None = None
    text: str = ""


def parse_until(text: str, reader: LogReader, now_ms: int) -> Until:
    """Parse `--until`: an index (from 0, negative counts from the end), an event id or prefix, or a time.

    Digits alone are an index, unless they are 8 or more digits that start exactly one
    event id (hex ids start with digits only about one time in 100 for 10 characters);
    4 to 64 hex digits with a letter are an event id; anything else is a time (see TIME_FORMS).
    """
    text = text.strip()
    if re.fullmatch(r"\d{8,64}", text):
        try:
            event_id = reader.resolve_id(text)
        except EventNotFound:
            event_id = None
        if event_id is not None and reader.get(event_id) is not None:
            return Until(index=reader.canonical_index(event_id), text=text)
    if re.fullmatch(r"-?\d+", text):
        count = reader.count()
        index = int(text)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise SelectionError(f"index {text} is outside the log, which contains {count} events (indices 0 to {count - 1})")
        return Until(index=index, text=text)
    if _HEX.fullmatch(text.lower()):
        event_id = reader.resolve_id(text)
        if reader.get(event_id) is None:
            raise SelectionError(f"no event with id {event_id} in {reader.path}")
        return Until(index=reader.canonical_index(event_id), text=text)
    return Until(time_ms=parse_time_ms(text, now_ms), text=text)
