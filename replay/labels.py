"""Field names for view JSON that stores records as positional lists, for step mode's change lines.

The router view writes each peer's presence, replica stats and request routing as a list
(`cortex.router.view`, `Presence.to_json` and its neighbors) to keep its canonical JSON and
digest small. Step mode names the positions so that a change reads `...last_heartbeat_ms: A -> B`.
"""

from __future__ import annotations

import re
from typing import Any

POSITIONAL_FIELDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("router", "peers"): ("joined", "present", "presence_stamp", "last_heartbeat_ms", "equivocated_from_seq"),
    ("router", "stats"): ("expert_outputs", "rows", "latency_total_ms", "latency_samples", "last_output_ms", "open_requests"),
    ("router", "requests"): ("redundancy", "ended", "served_by"),
}
"""(view, top-level key) to the names of the positions of each record under that key."""

_RECORD_PATH = re.compile(r"^(?P<table>[^.\[]+)\.(?P<key>[^.\[]+)(?:\[(?P<position>\d+)\])?(?P<rest>.*)$")


def label_change(view: str, path: str, old: Any, new: Any) -> tuple[str, Any, Any]:
    """Return (path, old, new) with a positional record's field named in the path or its values."""
    match = _RECORD_PATH.match(path)
    names = POSITIONAL_FIELDS.get((view, match["table"])) if match else None
    if match is None or names is None:
        return path, old, new
    position = match["position"]
    if position is not None:
        if int(position) >= len(names):
            return path, old, new
        return f"{match['table']}.{match['key']}.{names[int(position)]}{match['rest']}", old, new
    if match["rest"]:
        return path, old, new
    return path, _named(names, old), _named(names, new)


def _named(names: tuple[str, ...], value: Any) -> Any:
    if isinstance(value, list) and len(value) == len(names):
        return dict(zip(names, value, strict=True))
    return value
