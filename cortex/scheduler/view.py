"""Scheduler view: every request the swarm has heard of, with its lifecycle, route and usage.

The view folds the `requests` event family. Each event becomes a fact of its request (keyed
by the event's stamp), and the request's state is derived from the set of its facts
(`cortex.scheduler.lifecycle`), so the view is the same for every delivery order.

Equivocation: an author that signed two events with one seq is recorded with the lowest
disputed seq. Its facts from that seq on are dropped and later ones ignored, so the result
does not depend on whether the evidence or the events arrive first. The Acceptor also
refolds views without them.

Reservations: `kv_reserved_by_holder` sums the `kv_reservations` of the current route of
every in-flight request, which is what admission checks a new request against.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from cortex.scheduler.lifecycle import Fact, RequestRecord, derive
from cortex.scheduler.request_events import (
    REQUESTS,
    RequestAccepted,
    RequestCancelled,
    RequestCompleted,
    RequestFailed,
    RequestSubmitted,
    RouteReplanned,
    TokenGenerated,
    request_id_for,
)
from events.codec import Event
from events.views import Dispatcher


@dataclass
class SchedulerView:
    """Requests by id, folded from `requests` events, and the authors caught equivocating."""

    requests: dict[str, RequestRecord] = field(default_factory=dict)
    equivocated_from_seq: dict[str, int] = field(default_factory=dict)
    _in_flight: set[str] = field(default_factory=set, repr=False)

    def record(self, request_id: str) -> RequestRecord | None:
        """Return the record of a request, or None if no event of it was folded."""
        return self.requests.get(request_id)

    def in_flight(self) -> list[RequestRecord]:
        """Return the submitted, accepted and running requests, oldest submission first."""
        records = [self.requests[request_id] for request_id in self._in_flight]
        return sorted(records, key=lambda record: (record.submitted_ms, record.request_id))

    def driven_by(self, driver: str) -> list[RequestRecord]:
        """Return the in-flight requests whose current driver is `driver`."""
        return [record for record in self.in_flight() if record.driver == driver]

    def routed_through(self, holder: str) -> list[RequestRecord]:
        """Return the in-flight requests whose current route uses `holder`."""
        return [record for record in self.in_flight() if holder in record.holders]

    def kv_reserved_by_holder(self, exclude_request: str = "") -> dict[str, int]:
        """Return the KV-cache bytes reserved on each holder by in-flight requests but `exclude_request`."""
        reserved: dict[str, int] = {}
        for request_id in self._in_flight - {exclude_request}:
            record = self.requests[request_id]
            for fragment, holder in record.route.items():
                reserved[holder] = reserved.get(holder, 0) + record.kv_reservations.get(fragment, 0)
        return reserved

    def load_by_holder(self, exclude_request: str = "") -> dict[str, int]:
        """Return how many in-flight requests but `exclude_request` route through each holder."""
        load: dict[str, int] = {}
        for request_id in self._in_flight - {exclude_request}:
            for holder in self.requests[request_id].holders:
                load[holder] = load.get(holder, 0) + 1
        return load

    def overdue(self, now_ms: int) -> list[RequestRecord]:
        """Return the in-flight requests whose deadline is before `now_ms`."""
        return [
            record
            for record in self.in_flight()
            if record.deadline_at_ms is not None and record.deadline_at_ms < now_ms
        ]

    def to_json(self) -> dict[str, Any]:
        """Return the whole state as JSON-ready data in canonical order."""
        return {
            "equivocated_from_seq": dict(sorted(self.equivocated_from_seq.items())),
            "requests": {request_id: self.requests[request_id].to_json() for request_id in sorted(self.requests)},
        }

    def digest(self) -> str:
        """Return a BLAKE2b-256 hex digest of the canonical state; equal views give equal digests."""
        return hashlib.blake2b(orjson.dumps(self.to_json(), option=orjson.OPT_SORT_KEYS), digest_size=32).hexdigest()

    def add_fact(self, request_id: str, event: Event) -> None:
        """Record an event as a fact of `request_id` and re-derive that request's state."""
        disputed = self.equivocated_from_seq.get(event.author)
        if disputed is not None and event.seq >= disputed:
            return
        record = self.requests.get(request_id)
        if record is None:
            record = self.requests[request_id] = RequestRecord(request_id)
        stamp = (event.lamport, event.author, event.seq)
        record.facts[stamp] = Fact(stamp, event.time_ms, event.body)
        self._rederive(record)

    def drop_author_from(self, author: str, seq: int) -> None:
        """Mark `author` as equivocating from `seq` on and drop its facts from that seq."""
        current = self.equivocated_from_seq.get(author)
        if current is not None and current <= seq:
            return
        self.equivocated_from_seq[author] = seq
        for record in self.requests.values():
            stale = [stamp for stamp in record.facts if stamp[1] == author and stamp[2] >= seq]
            if not stale:
                continue
            for stamp in stale:
                del record.facts[stamp]
            self._rederive(record)
        # A record left without facts is removed, as if its events had never arrived.
        for request_id in [request_id for request_id, record in self.requests.items() if not record.facts]:
            del self.requests[request_id]

    def _rederive(self, record: RequestRecord) -> None:
        derive(record)
        if record.is_in_flight:
            self._in_flight.add(record.request_id)
        else:
            self._in_flight.discard(record.request_id)


def _apply_request_submitted(view: SchedulerView, event: Event) -> SchedulerView:
    view.add_fact(request_id_for(event.author, event.body.nonce), event)
    return view


def _apply_request_fact(view: SchedulerView, event: Event) -> SchedulerView:
    view.add_fact(event.body.request_id, event)
    return view


class SchedulerReducer:
    """The Scheduler view's reducer: pure functions of (view, event) for the `requests` family."""

    def __init__(self) -> None:
        self._dispatch: Dispatcher[SchedulerView] = Dispatcher(
            "Scheduler",
            families={REQUESTS},
            handlers={
                RequestSubmitted: _apply_request_submitted,
                RequestAccepted: _apply_request_fact,
                TokenGenerated: _apply_request_fact,
                RouteReplanned: _apply_request_fact,
                RequestCompleted: _apply_request_fact,
                RequestFailed: _apply_request_fact,
                RequestCancelled: _apply_request_fact,
            },
        )

    def empty(self) -> SchedulerView:
        return SchedulerView()

    def apply(self, view: SchedulerView, event: Event) -> SchedulerView:
        return self._dispatch(view, event)

    def apply_equivocation(self, view: SchedulerView, author: str, seq: int) -> SchedulerView:
        view.drop_author_from(author, seq)
        return view


def fold(events: Iterable[Event], reducer: SchedulerReducer | None = None) -> SchedulerView:
    """Fold events into a fresh Scheduler view (for tools and tests)."""
    reducer = reducer or SchedulerReducer()
    view = reducer.empty()
    for event in events:
        view = reducer.apply(view, event)
    return view
