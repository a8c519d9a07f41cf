"""Retention policy: which events a joining node needs, and which are bulky history.

A node that joins (or rejoins after a long absence) in `live` mode requests a
snapshot from one peer instead of every author's whole history. The snapshot
holds every event the live views need and leaves out bulky history:

* `PeerHeartbeat`: only each author's latest one (liveness needs no more);
* per-request stream events (`TOKEN_STREAM_TYPES`, such as batches of
  generated tokens) of requests that already ended: the request's terminal
  event (`TERMINAL_REQUEST_TYPES`) and its completion digest stand for them.

Everything else (membership, model announcements, shard claims and loads,
request lifecycle, quorum votes and penalties) is always kept. The snapshot
also carries the serving peer's heads, and the joiner records them as sync
floors: anti-entropy does not chase events at or below a floor, because the
policy above decided the joiner does not need them. Events below a floor that
arrive anyway are accepted as usual. A node in `full` mode fetches every
author's whole history instead.

The log store itself keeps every event it accepted; pruning bulky history from
disk is left to the log store (`NOTE` below).
"""

from __future__ import annotations

from collections.abc import Iterable

from events.codec import Event

LATEST_ONLY_TYPES = frozenset({"PeerHeartbeat"})
# NOTE: the scheduler defines the request and token event types. The filter matches these names,
# so it skips no token events until types with these exact names exist.
TOKEN_STREAM_TYPES = frozenset({"TokenGenerated"})
TERMINAL_REQUEST_TYPES = frozenset({"RequestCompleted", "RequestFailed", "RequestCancelled"})


def live_events(events: Iterable[Event]) -> list[Event]:
    """Return the events of a log that a joining node needs, in the input order.

    `events` is the whole log in canonical order. The result drops all but each author's
    latest event of a `LATEST_ONLY_TYPES` type. It also drops the token stream events whose
    referenced request has a terminal event.
    """
    history = list(events)
    latest: dict[tuple[str, str], int] = {}
    ended_requests: set[str] = set()
    for event in history:
        if event.type in LATEST_ONLY_TYPES:
            key = (event.author, event.type)
            latest[key] = max(latest.get(key, 0), event.seq)
        elif event.type in TERMINAL_REQUEST_TYPES:
            ended_requests.update(event.refs)
    kept: list[Event] = []
    for event in history:
        if event.type in LATEST_ONLY_TYPES and latest[(event.author, event.type)] != event.seq:
            continue
        if event.type in TOKEN_STREAM_TYPES and ended_requests.intersection(event.refs):
            continue
        kept.append(event)
    return kept
