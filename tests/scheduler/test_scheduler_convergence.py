"""Scheduler view convergence: every delivery order of one event set gives one view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduler_events_factory import (
    DRIVER,
    HOLDER_A,
    HOLDER_B,
    HOLDER_C,
    OUTSIDER,
    SUBMITTER,
    TAKEOVER,
    acceptance,
    cancellation,
    completion,
    failure,
    replan,
    request_id_of,
    submission,
    tokens,
)

from cortex.scheduler.view import SchedulerReducer, SchedulerView
from events import Acceptor, Event, Identity, LogStore, Projection, sign_event

AUTHORS = [SUBMITTER, DRIVER, TAKEOVER, OUTSIDER]
REQUESTS = [sign_event(SUBMITTER, submission(max_tokens=8 + index), seq=index + 1, lamport=1, time_ms=1_000) for index in range(2)]
REQUEST_IDS = [request_id_of(event) for event in REQUESTS]
ROUTES = [
    {"block[0:2]": HOLDER_A.peer_id, "block[2:4]": HOLDER_B.peer_id},
    {"block[0:4]": HOLDER_C.peer_id},
    {"block[0:1]": HOLDER_B.peer_id, "block[1:4]": HOLDER_C.peer_id},
]


@st.composite
def request_bodies(draw: st.DrawFn, request_id: str) -> Any:
    kind = draw(st.integers(min_value=0, max_value=6))
    if kind == 0:
        return acceptance(request_id, draw(st.sampled_from(ROUTES)), kv_bytes=draw(st.integers(0, 3)))
    if kind == 1:
        start = draw(st.integers(min_value=0, max_value=6))
        return tokens(request_id, start, start + draw(st.integers(min_value=1, max_value=3)))
    if kind == 2:
        route = draw(st.sampled_from(ROUTES[1:]))
        return replan(request_id, HOLDER_A.peer_id, route, kv_bytes=draw(st.integers(0, 3)))
    if kind == 3:
        return completion(request_id, degraded_reason=draw(st.sampled_from(["", "fallback model"])))
    if kind == 4:
        return failure(request_id)
    if kind == 5:
        return cancellation(request_id)
    return submission(max_tokens=draw(st.integers(min_value=1, max_value=4)))


@st.composite
def event_sets(draw: st.DrawFn) -> tuple[list[Event], tuple[str, int] | None]:
    """Draw request events by four authors with colliding Lamport clocks, and maybe one equivocation."""
    events: list[Event] = list(REQUESTS)
    next_seq = {identity.peer_id: 1 for identity in AUTHORS}
    next_seq[SUBMITTER.peer_id] = len(REQUESTS) + 1
    for _ in range(draw(st.integers(min_value=0, max_value=14))):
        identity: Identity = draw(st.sampled_from(AUTHORS))
        body = draw(request_bodies(draw(st.sampled_from(REQUEST_IDS))))
        seq = next_seq[identity.peer_id]
        next_seq[identity.peer_id] += 1
        lamport = draw(st.integers(min_value=1, max_value=6))
        events.append(sign_event(identity, body, seq=seq, lamport=lamport, time_ms=draw(st.integers(1_000, 2_000))))
    equivocation = None
    if draw(st.booleans()):
        original = draw(st.sampled_from(events))
        equivocation = (original.author, original.seq)
    return events, equivocation


def _fold(events: list[Event], equivocation: tuple[str, int] | None, mark_at: int) -> SchedulerView:
    reducer = SchedulerReducer()
    view = reducer.empty()
    for index, event in enumerate(events):
        if equivocation is not None and index == mark_at:
            view = reducer.apply_equivocation(view, *equivocation)
        view = reducer.apply(view, event)
    if equivocation is not None and mark_at >= len(events):
        view = reducer.apply_equivocation(view, *equivocation)
    return view


def _queries(view: SchedulerView) -> list[object]:
    return [
        [(record.request_id, record.state, record.driver, record.route) for record in view.in_flight()],
        view.kv_reserved_by_holder(),
        view.load_by_holder(),
        {request_id: (record.state, record.completion_tokens, record.outcome) for request_id, record in view.requests.items()},
    ]


@settings(max_examples=150, deadline=None)
@given(drawn=event_sets(), data=st.data())
def test_view_same_for_every_order(drawn: tuple[list[Event], tuple[str, int] | None], data: st.DataObject) -> None:
    events, equivocation = drawn
    permuted = data.draw(st.permutations(events))
    mark_at = data.draw(st.integers(min_value=0, max_value=len(events)))

    reference = _fold(events, equivocation, len(events))
    other = _fold(permuted, equivocation, mark_at)

    assert other.digest() == reference.digest()
    assert _queries(other) == _queries(reference)


def _conflicting(events: list[Event], equivocation: tuple[str, int] | None) -> list[Event]:
    """Return a second, different event at the equivocation's author and seq, if one was drawn."""
    if equivocation is None:
        return []
    author, seq = equivocation
    identity = next(identity for identity in AUTHORS if identity.peer_id == author)
    return [sign_event(identity, cancellation(REQUEST_IDS[0]), seq=seq, lamport=7, time_ms=3_000)]


def _accept(path: Path, events: list[Event]) -> tuple[Acceptor, Projection[SchedulerView]]:
    projection = Projection(SchedulerReducer())
    acceptor = Acceptor(LogStore(path), [projection])
    for event in events:
        acceptor.accept(event.wire)
    return acceptor, projection


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(drawn=event_sets(), data=st.data())
def test_acceptor_views_converge(
    tmp_path_factory: pytest.TempPathFactory, drawn: tuple[list[Event], tuple[str, int] | None], data: st.DataObject
) -> None:
    events, equivocation = drawn
    events = events + [event for event in _conflicting(events, equivocation) if event.id not in {e.id for e in events}]
    permuted = data.draw(st.permutations(events))
    directory = tmp_path_factory.mktemp("scheduler")
    reference, reference_view = _accept(directory / "reference.db", events)
    other, other_view = _accept(directory / "permuted.db", permuted)
    try:
        refolded = Projection(SchedulerReducer())
        refolded.rebuild(
            (event for event in other.store.events() if event.seq < other.excluded_authors.get(event.author, 2**63)),
            other.excluded_authors,
        )

        assert other_view.view.digest() == reference_view.view.digest()
        assert refolded.view.digest() == other_view.view.digest()
        assert _queries(other_view.view) == _queries(reference_view.view)
    finally:
        reference.store.close()
        other.store.close()
