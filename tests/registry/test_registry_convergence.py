"""Registry convergence: every delivery order and batching of one event set gives one view."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex.registry import RegistryReducer, RegistryView
from events import (
    Acceptor,
    Event,
    Identity,
    LogStore,
    PeerHeartbeat,
    PeerJoined,
    PeerLeft,
    Projection,
    SequenceSkipped,
    ShardClaimed,
    ShardLoaded,
    ShardReleased,
    sign_event,
)

AUTHORS = [Identity.generate() for _ in range(3)]
MODELS = ["m1", "m2"]
FRAGMENTS = ["head", "block[0:2]", "expert[0][1]"]


def _joined(identity: Identity, port: int) -> PeerJoined:
    return PeerJoined((f"/ip4/127.0.0.1/tcp/{port}",), f"tcp://127.0.0.1:{port}", identity.curve_public_key.decode(), {"cores": port}, "1.0", "0.1.0")


@st.composite
def bodies(draw: st.DrawFn, identity: Identity, seq: int) -> object:
    model = draw(st.sampled_from(MODELS))
    fragment = draw(st.sampled_from(FRAGMENTS))
    size = draw(st.integers(min_value=0, max_value=3))
    return draw(
        st.sampled_from(
            [
                _joined(identity, 4000 + size),
                PeerHeartbeat(seq - 1),
                PeerLeft(),
                ShardClaimed(model, fragment, size),
                ShardLoaded(model, fragment, size),
                ShardReleased(model, fragment),
            ]
            + ([SequenceSkipped(max(1, seq - 1 - size), seq - 1)] if seq > 1 else [])
        )
    )


@st.composite
def event_sets(draw: st.DrawFn) -> list[Event]:
    """Draw signed events from three authors; Lamport clocks collide, and one may equivocate."""
    events: list[Event] = []
    next_seq = [1, 1, 1]
    for _ in range(draw(st.integers(min_value=1, max_value=14))):
        index = draw(st.integers(min_value=0, max_value=2))
        identity = AUTHORS[index]
        body = draw(bodies(identity, next_seq[index]))
        lamport = draw(st.integers(min_value=1, max_value=6))
        time_ms = draw(st.integers(min_value=0, max_value=30_000))
        events.append(sign_event(identity, body, seq=next_seq[index], lamport=lamport, time_ms=time_ms))
        next_seq[index] += 1
    if draw(st.booleans()):
        original = draw(st.sampled_from(events))
        identity = next(identity for identity in AUTHORS if identity.peer_id == original.author)
        other = sign_event(identity, ShardLoaded("m1", "head", 99), seq=original.seq, lamport=original.lamport, time_ms=1)
        if other.id != original.id:
            events.append(other)
    return events


def _accept_all(path: Path, batches: list[list[Event]]) -> tuple[Acceptor, Projection[RegistryView]]:
    registry = Projection(RegistryReducer())
    acceptor = Acceptor(LogStore(path), [registry])
    for batch in batches:
        result = acceptor.accept_many([event.wire for event in batch])
        assert result.rejected == []
    return acceptor, registry


def _split(events: list[Event], cuts: list[int]) -> list[list[Event]]:
    bounds = [0, *sorted({cut % (len(events) + 1) for cut in cuts}), len(events)]
    return [events[start:stop] for start, stop in zip(bounds, bounds[1:], strict=False) if stop > start]


def _queries(view: RegistryView) -> list[object]:
    return [
        view.live_peers(now_ms=20_000),
        {model: view.coverage(model, now_ms=20_000) for model in MODELS},
        view.models(),
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(events=event_sets(), data=st.data())
def test_view_same_for_every_order(tmp_path_factory: pytest.TempPathFactory, events: list[Event], data: st.DataObject) -> None:
    directory = tmp_path_factory.mktemp("order")
    permuted = data.draw(st.permutations(events))
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=100), max_size=4))

    reference, reference_registry = _accept_all(directory / "reference.db", [events])
    other, other_registry = _accept_all(directory / "permuted.db", _split(permuted, cuts))
    try:
        assert other_registry.view.digest() == reference_registry.view.digest()
        assert _queries(other_registry.view) == _queries(reference_registry.view)
        assert other.excluded_authors == reference.excluded_authors

        refolded = Projection(RegistryReducer())
        refolded.rebuild(other.store.events(), other.store.disputed_seqs())
        assert other.store.disputed_seqs() == other.excluded_authors
        assert refolded.view.digest() == other_registry.view.digest()
    finally:
        reference.store.close()
        other.store.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(events=event_sets(), data=st.data())
def test_accepting_twice_changes_nothing(tmp_path_factory: pytest.TempPathFactory, events: list[Event], data: st.DataObject) -> None:
    acceptor, registry = _accept_all(tmp_path_factory.mktemp("twice") / "log.db", [events])
    try:
        digest = registry.view.digest()
        stored = [event.id for event in acceptor.store.events()]

        result = acceptor.accept_many([event.wire for event in data.draw(st.permutations(events))])

        assert result.accepted == []
        assert result.duplicates == len(events)
        assert registry.view.digest() == digest
        assert [event.id for event in acceptor.store.events()] == stored
    finally:
        acceptor.store.close()
