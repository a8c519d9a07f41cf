"""How events look to operators: one human line, or one JSON object, per event.

A human line is `time  author  #seq  type  key fields`. The time is UTC with ms. The author
is its short id, the last 8 characters of its peer id, which `--author` also accepts. The
body's fields follow, with long hex values cut to 12 digits. Colour comes from rich and
only on a terminal; piped output is plain text.

The JSON form is the signed envelope exactly as decoded from the payload (author, body,
lamport, refs, seq, time_ms, type, version) plus the event id.
"""

from __future__ import annotations

import hashlib
import re
import sys
from typing import Any, TextIO

import orjson
from rich.console import Console
from rich.text import Text

from events.codec import Event
from events.model import registered_type_of_class
from replay.times import format_time_ms

SHORT_ID_LENGTH = 8
_LONG_HEX = re.compile(r"[0-9a-f]{16,}")
_FAMILY_STYLES = {"membership": "cyan", "shards": "green", "requests": "magenta", "tokens": "blue", "quorum": "yellow"}
_AUTHOR_STYLES = ("bright_blue", "bright_magenta", "bright_cyan", "bright_green", "bright_yellow", "orange3", "orchid", "turquoise2")
MAX_VALUE_CHARS = 60
HIDDEN_FIELDS = frozenset({"curve_public_key"})
"""Fields left out of human lines: the CurveZMQ key follows from the peer id and is only noise."""


def short_peer_id(peer_id: str) -> str:
    """Return the short form of a peer id shown in lines and tables: its last 8 characters."""
    return peer_id[-SHORT_ID_LENGTH:]


def short_hex(value: str, digits: int = 12) -> str:
    return value[:digits] if _LONG_HEX.fullmatch(value) else value


def event_json(event: Event) -> dict[str, Any]:
    """Return the event as the signed envelope plus its id."""
    envelope: dict[str, Any] = orjson.loads(event.payload)
    return {"id": event.id, **envelope}


def body_fields(event: Event) -> dict[str, Any]:
    """Return the body's fields as signed (JSON values), for any type, known or not."""
    fields: dict[str, Any] = orjson.loads(event.payload)["body"]
    return fields


EMPTY = "(empty)"
"""How format_value shows an empty list or object."""


def format_value(value: Any) -> str:
    """Format one JSON value compactly: long hex cut, lists joined by commas, objects as k=v, empty ones as (empty).

    Brackets would read as rich markup in printed strings, so a list gets none, and an empty
    list or object reads `(empty)` in the same style as a filled one.
    """
    if isinstance(value, str):
        text = short_hex(value)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list):
        text = ",".join(format_value(item) for item in value) or EMPTY
    elif isinstance(value, dict):
        text = ",".join(f"{key}={format_value(item)}" for key, item in sorted(value.items())) or EMPTY
    else:
        text = str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def key_fields(event: Event) -> str:
    """Return the body fields and refs as `name=value` pairs separated by spaces."""
    parts = [f"{name}={format_value(value)}" for name, value in body_fields(event).items() if name not in HIDDEN_FIELDS]
    if event.refs:
        parts.append("refs=" + ",".join(ref[:12] for ref in event.refs))
    return " ".join(parts)


def family_of(event: Event) -> str | None:
    registered = registered_type_of_class(type(event.body))
    return None if registered is None else registered.family


def author_style(peer_id: str) -> str:
    """Return a colour for an author that stays the same across runs."""
    digest = hashlib.blake2b(peer_id.encode(), digest_size=1).digest()[0]
    return _AUTHOR_STYLES[digest % len(_AUTHOR_STYLES)]


def event_line(event: Event, prefix: str = "") -> Text:
    """Return the human line of one event, styled for a terminal."""
    family = family_of(event)
    type_style = "dim" if family is None else _FAMILY_STYLES.get(family, "white")
    line = Text(prefix)
    line.append(format_time_ms(event.time_ms), style="dim")
    line.append("  ")
    line.append(short_peer_id(event.author), style=author_style(event.author))
    line.append(f" #{event.seq:<5}", style="dim")
    line.append(f" {event.type:<18}", style=f"bold {type_style}")
    line.append(" ")
    line.append(key_fields(event))
    return line


def json_line(data: Any) -> str:
    """Return one JSON line (sorted keys), without the newline."""
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()


PIPE_WIDTH = 200
"""Table width when output is not a terminal (rich would assume 80 columns)."""


def make_console(file: TextIO | None = None) -> Console:
    """Return a console that colours only on a terminal and never wraps lines."""
    file = file or sys.stdout
    width = None if file.isatty() else PIPE_WIDTH
    return Console(file=file, highlight=False, soft_wrap=True, width=width)
