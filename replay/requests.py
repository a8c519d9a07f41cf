"""Resolve a request id, or an event id, from the prefix an operator copied from a tool's output."""

from __future__ import annotations

from replay.errors import EventNotFound
from replay.reader import SUBMITTED_REQUEST_FUNCTION, LogReader

MIN_REQUEST_PREFIX = 8
"""Hex digits a request id prefix needs: the tools print 12, and 8 make collisions rare."""

_HEX_DIGITS = frozenset("0123456789abcdef")


def resolve_request_id(reader: LogReader, prefix: str) -> str:
    """Return the one request id or event id in the log that starts with `prefix`.

    A request id is not an event id, so with 8 or more digits the candidates are the event
    ids, the ids that events ref (every request-scoped record refs its request id) and the
    request ids of the `RequestSubmitted` events. A shorter prefix matches event ids only, and
    a full 64-digit id is returned as it is. Raises EventNotFound for no match or several.
    """
    prefix = prefix.lower()
    if len(prefix) < MIN_REQUEST_PREFIX or len(prefix) == 64:
        return reader.resolve_id(prefix)
    if len(prefix) > 64 or not set(prefix) <= _HEX_DIGITS:
        raise EventNotFound(f"{prefix!r} is not a request id or id prefix (8 to 64 lowercase hex digits)")
    low = bytes.fromhex(prefix[: len(prefix) // 2 * 2])
    candidates: set[str] = set()
    for table, column in (("events", "id"), ("refs", "ref")):
        rows = reader.query(f"SELECT DISTINCT {column} FROM {table} WHERE {column} >= ? AND {column} < ?",
                            (low, _after(low)))
        candidates.update(bytes(value).hex() for (value,) in rows)
    submitted = reader.query(f"SELECT {SUBMITTED_REQUEST_FUNCTION}(author, wire) FROM events WHERE type = 'RequestSubmitted'")
    candidates.update(request_id for (request_id,) in submitted if isinstance(request_id, str))
    matches = sorted(candidate for candidate in candidates if candidate.startswith(prefix))
    if not matches:
        raise EventNotFound(f"no event or request in {reader.path} has an id starting with {prefix}; "
                            "check the prefix, or give the whole 64-digit id")
    if len(matches) > 1:
        listed = ", ".join(match[:16] for match in matches[:3])
        raise EventNotFound(f"{len(matches)} events or requests in {reader.path} have ids starting with {prefix} "
                            f"({listed}{', ...' if len(matches) > 3 else ''}); give more digits")
    return matches[0]


def _after(low: bytes) -> bytes:
    """Return a bound above every id that starts with `low` (ids are 32 bytes, so 33 bytes of 0xff do)."""
    data = bytearray(low)
    while data and data[-1] == 0xFF:
        data.pop()
    if not data:
        return b"\xff" * 33
    data[-1] += 1
    return bytes(data)
