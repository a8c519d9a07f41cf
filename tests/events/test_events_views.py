"""Dispatcher: exhaustive dispatch over the families a view projects."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from signing_helpers import envelope_for, sign_envelope

from events import (
    Dispatcher,
    Event,
    Identity,
    PeerHeartbeat,
    PeerJoined,
    PeerLeft,
    Projection,
    ReducerError,
    SequenceSkipped,
    ShardLoaded,
    decode_event,
    event_type,
    sign_event,
)

IDENTITY = Identity.generate()


@event_type(version="1.0", family="gadgets")
@dataclass(frozen=True, slots=True)
class GadgetBuilt:
    count: int


def count_heartbeat(view: list[str], event: Event) -> list[str]:
    return [*view, event.type]


def membership_dispatcher() -> Dispatcher[list[str]]:
    return Dispatcher(
        "Counting",
        families={"membership"},
        handlers={
            PeerHeartbeat: count_heartbeat,
            PeerJoined: count_heartbeat,
            PeerLeft: count_heartbeat,
            SequenceSkipped: count_heartbeat,
        },
    )


def test_missing_handler_fails_at_construction() -> None:
    with pytest.raises(ReducerError, match="no handler for PeerLeft"):
        Dispatcher("Counting", families={"membership"}, handlers={PeerHeartbeat: count_heartbeat, PeerJoined: count_heartbeat})


def test_handler_outside_projected_families_rejected() -> None:
    with pytest.raises(ReducerError, match="ShardLoaded"):
        Dispatcher("Counting", families={"gadgets"}, handlers={GadgetBuilt: count_heartbeat, ShardLoaded: count_heartbeat})


def test_dispatch_calls_handler() -> None:
    dispatch = membership_dispatcher()
    event = sign_event(IDENTITY, PeerHeartbeat(0), seq=1, lamport=1, time_ms=0)

    assert dispatch([], event) == ["PeerHeartbeat"]


def test_other_family_leaves_view_unchanged() -> None:
    dispatch = membership_dispatcher()
    view = ["before"]

    assert dispatch(view, sign_event(IDENTITY, GadgetBuilt(3), seq=1, lamport=1, time_ms=0)) is view


def test_unknown_type_leaves_view_unchanged() -> None:
    dispatch = membership_dispatcher()
    view = ["before"]
    event = decode_event(sign_envelope(IDENTITY, envelope_for(IDENTITY, type="PeerMigrated", version="1.5", body={})))

    assert dispatch(view, event) is view


def test_type_registered_later_fails_loudly() -> None:
    dispatch = Dispatcher("Gadgets", families={"gadgets"}, handlers={GadgetBuilt: count_heartbeat})

    @event_type(version="1.1", family="gadgets")
    @dataclass(frozen=True, slots=True)
    class GadgetBroken:
        count: int

    event = sign_event(IDENTITY, GadgetBroken(1), seq=1, lamport=1, time_ms=0)
    with pytest.raises(ReducerError, match="no handler for GadgetBroken"):
        dispatch([], event)


class CountingReducer:
    def __init__(self) -> None:
        self._dispatch = membership_dispatcher()

    def empty(self) -> list[str]:
        return []

    def apply(self, view: list[str], event: Event) -> list[str]:
        return self._dispatch(view, event)

    def apply_equivocation(self, view: list[str], author: str, seq: int) -> list[str]:
        return [*view, f"equivocation {seq}"]


def test_projection_rebuild_applies_equivocations_first() -> None:
    projection = Projection(CountingReducer())
    events = [sign_event(IDENTITY, PeerHeartbeat(seq - 1), seq=seq, lamport=seq, time_ms=0) for seq in (1, 2, 3)]
    projection.rebuild(events, {IDENTITY.peer_id: 2})

    assert projection.view == ["equivocation 2", "PeerHeartbeat"]
