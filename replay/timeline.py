"""The timeline of one request: its events in order, the gaps between them, who served what.

A request's events are found from its id, which may be the id of its first event or an id
carried in event bodies as `request_id`. The roots are the event with that id, the events
whose body names it, and the events those ref (the submission, whose body may carry only
the inputs of the id). Every event that refs a root, directly or through other events
of the request (a record that refs the acceptance that refs the submission), is added by
following the log's refs table. They are listed in canonical order,
which respects causality, with the time since the previous event and since the first.

"Who served what" reads the body fields that name model parts (`fragment`, `layer`,
`expert`, ...; see SERVING_FIELDS) from any event type and credits the event's author, and
reads fields that map fragments to peer ids (a route such as `{"block[0:8]": PEER}`) and
credits each named peer. Event types added later show up without changes here. "Where time went" attributes each gap to the event that ends it, by
type and by author. Times are the authors' wall clocks, so clock skew between peers shifts
gaps and can make one negative.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from events.codec import Event
from events.errors import InvalidPeerId
from events.identity import public_key_from_peer_id
from events.shards import parse_fragment
from replay.reader import LogReader, decode_stored
from replay.render import body_fields

SERVING_FIELDS = ("fragment", "stage", "block", "layer", "layers", "start", "stop", "expert", "experts", "step")
"""Body fields that name the part of a model an event's author worked on."""

MAX_DEPTH = 32
MAX_EVENTS = 200_000


@dataclass(frozen=True)
class TimelineEntry:
    """One event of the timeline with its gap to the previous event and its offset from the first."""

    event: Event
    depth: int
    """0 for a root (the event with the request's id, or one naming it in `request_id`), 1 for
    events that ref a root, and so on."""
    gap_ms: int | None
    offset_ms: int
    served: dict[str, Any]


@dataclass
class Timeline:
    """The events of one request and where its time went."""

    request_id: str
    entries: list[TimelineEntry] = field(default_factory=list)
    request_found: bool = False
    truncated: bool = False
    time_by_type: dict[str, int] = field(default_factory=dict)
    time_by_author: dict[str, int] = field(default_factory=dict)
    served_by: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def duration_ms(self) -> int:
        return self.entries[-1].offset_ms if self.entries else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "request_found": self.request_found,
            "truncated": self.truncated,
            "duration_ms": self.duration_ms,
            "events": [
                {
                    "id": entry.event.id,
                    "type": entry.event.type,
                    "author": entry.event.author,
                    "seq": entry.event.seq,
                    "lamport": entry.event.lamport,
                    "time_ms": entry.event.time_ms,
                    "depth": entry.depth,
                    "gap_ms": entry.gap_ms,
                    "offset_ms": entry.offset_ms,
                    "served": entry.served,
                    "body": body_fields(entry.event),
                }
                for entry in self.entries
            ],
            "time_by_type_ms": self.time_by_type,
            "time_by_author_ms": self.time_by_author,
            "served_by": self.served_by,
        }


def build_timeline(reader: LogReader, request_id: str) -> Timeline:
    """Collect the request's events from the log and compute gaps and attributions."""
    timeline = Timeline(request_id)
    found = _collect(reader, request_id, timeline)
    events = sorted((event for event, _depth in found.values()), key=lambda event: (event.lamport, event.author, event.seq, event.id))
    first_ms = events[0].time_ms if events else 0
    previous_ms: int | None = None
    time_by_type: collections.Counter[str] = collections.Counter()
    time_by_author: collections.Counter[str] = collections.Counter()
    for event in events:
        gap_ms = None if previous_ms is None else event.time_ms - previous_ms
        fields = body_fields(event)
        served = {name: value for name, value in fields.items() if name in SERVING_FIELDS}
        producers = _producer_count(fields)
        if served and producers is not None:
            served["producers"] = producers
        timeline.entries.append(TimelineEntry(event, found[event.id][1], gap_ms, event.time_ms - first_ms, served))
        if gap_ms is not None and gap_ms > 0:
            time_by_type[event.type] += gap_ms
            time_by_author[event.author] += gap_ms
        if served:
            timeline.served_by.setdefault(event.author, []).append({"type": event.type, **served})
        for name, holder, fragment in _assignments(event):
            timeline.served_by.setdefault(holder, []).append({"type": event.type, name: fragment})
        previous_ms = event.time_ms
    timeline.time_by_type = dict(time_by_type.most_common())
    timeline.time_by_author = dict(time_by_author.most_common())
    return timeline


def _producer_count(fields: dict[str, Any]) -> int | None:
    """Return how many distinct peers produced the outputs a quorum event compares, else None."""
    peers = [*fields.get("producers", ()), *fields.get("agreeing", ()), *fields.get("dissenting", ())]
    if not any(name in fields for name in ("producers", "agreeing", "dissenting")):
        return None
    return len(set(peers))


def _assignments(event: Event) -> list[tuple[str, str, str]]:
    """Return (field, peer id, fragment) for body fields that map fragments to peers."""
    found = []
    for name, value in body_fields(event).items():
        if not isinstance(value, dict):
            continue
        for fragment, holder in value.items():
            if isinstance(holder, str) and _is_fragment(fragment) and _is_peer_id(holder):
                found.append((name, holder, fragment))
    return found


def _is_fragment(text: str) -> bool:
    try:
        parse_fragment(text)
    except ValueError:
        return False
    return True


def _is_peer_id(text: str) -> bool:
    try:
        public_key_from_peer_id(text)
    except InvalidPeerId:
        return False
    return True


def _collect(reader: LogReader, request_id: str, timeline: Timeline) -> dict[str, tuple[Event, int]]:
    """Follow refs outwards from the request; return each event found, by id, with its depth."""
    found: dict[str, tuple[Event, int]] = {}
    roots = reader.naming_request(request_id)
    root = reader.get(request_id)
    if root is not None:
        roots.insert(0, root)
    # The events that the body-named roots ref belong to the request too (its submission).
    for ref in sorted({ref for event in roots for ref in event.refs}):
        referenced = reader.get(ref)
        if referenced is not None:
            roots.append(referenced)
    for event in roots:
        found[event.id] = (event, 0)
    timeline.request_found = bool(roots)
    seen: set[str] = {request_id, *found}
    frontier = [request_id, *found]
    for depth in range(1, MAX_DEPTH + 1):
        if not frontier:
            break
        next_frontier: list[str] = []
        for start in range(0, len(frontier), 500):
            chunk = frontier[start : start + 500]
            rows = reader.query(
                "SELECT DISTINCT e.wire FROM refs AS r JOIN events AS e ON e.rowid = r.event_rowid "
                f"WHERE r.ref IN ({', '.join('?' * len(chunk))})",
                tuple(bytes.fromhex(ref) for ref in chunk),
            )
            for (wire,) in rows:
                event = decode_stored(wire)
                if event.id in seen:
                    continue
                seen.add(event.id)
                found[event.id] = (event, depth)
                next_frontier.append(event.id)
                if len(found) >= MAX_EVENTS:
                    timeline.truncated = True
                    return found
        frontier = next_frontier
    else:
        timeline.truncated = bool(frontier)
    return found
