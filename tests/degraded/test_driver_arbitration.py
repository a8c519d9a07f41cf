"""One driver per request: which of two acceptances wins, derived alike by every peer from the same events."""

from __future__ import annotations

import secrets

from cortex.driver.fallback import FALLBACK_HARDWARE_KEY
from cortex.driver.takeover import may_drive, superseding_driver
from cortex.privacy import seal
from cortex.registry import RegistryReducer, RegistryView
from cortex.scheduler import RequestAccepted, RequestSubmitted
from cortex.scheduler.lifecycle import RequestRecord
from cortex.scheduler.request_events import plan_digest, request_id_for
from cortex.scheduler.view import fold
from events import Event, Identity, PeerHeartbeat, PeerJoined, ShardLoaded, sign_event

MODEL_ID = "ab" * 32
SUBMITTER = Identity.generate()
FIRST = Identity.generate()
SECOND = Identity.generate()
BYSTANDER = Identity.generate()  # joined, but has no head and announced no fallback model
FALLBACK = Identity.generate()


def _joined(identity: Identity, *, head: bool, hardware: dict[str, object] | None = None) -> list[Event]:
    joined = PeerJoined(
        ("/ip4/127.0.0.1/tcp/4001",), "tcp://127.0.0.1:5555", identity.curve_public_key.decode(), hardware or {"cpus": 2}, "1.0", "0.1.0"
    )
    events = [sign_event(identity, joined, seq=1, lamport=1, time_ms=1_000)]
    if head:
        events.append(sign_event(identity, ShardLoaded(MODEL_ID, "head", 10), seq=2, lamport=2, time_ms=1_000))
    events.append(sign_event(identity, PeerHeartbeat(len(events)), seq=len(events) + 1, lamport=3, time_ms=1_500))
    return events


def _registry(events: list[Event]) -> RegistryView:
    reducer = RegistryReducer()
    view = reducer.empty()
    for event in events:
        view = reducer.apply(view, event)
    return view


def _submitted() -> tuple[Event, str]:
    body = RequestSubmitted(secrets.token_hex(16), MODEL_ID, 8, 12, sealed_prompt=seal(b"Return the number", [SUBMITTER.peer_id, FIRST.peer_id]))
    event = sign_event(SUBMITTER, body, seq=1, lamport=1, time_ms=2_000)
    return event, request_id_for(SUBMITTER.peer_id, body.nonce)


def _accepted(identity: Identity, request_id: str, submitted: Event, lamport: int, takeover_of: str = "") -> Event:
    body = RequestAccepted(request_id, {}, {}, 0, plan_digest({}, {}, 0), takeover_of)
    return sign_event(identity, body, seq=10, lamport=lamport, time_ms=2_100, refs=(submitted.id,))


def _members() -> list[Event]:
    return [
        *_joined(FIRST, head=True),
        *_joined(SECOND, head=True),
        *_joined(BYSTANDER, head=False),
        *_joined(FALLBACK, head=False, hardware={"cpus": 2, FALLBACK_HARDWARE_KEY: "demo"}),
    ]


def _record(events: list[Event], request_id: str) -> RequestRecord:
    return fold(events).requests[request_id]


def test_superseding_driver_later_acceptance_wins() -> None:
    submitted, request_id = _submitted()
    first = _accepted(FIRST, request_id, submitted, lamport=5, takeover_of=SUBMITTER.peer_id)
    second = _accepted(SECOND, request_id, submitted, lamport=7, takeover_of=SUBMITTER.peer_id)
    registry = _registry(_members())

    for order in ([submitted, first, second], [second, submitted, first]):
        record = _record(order, request_id)
        assert superseding_driver(registry, record, FIRST.peer_id) == SECOND.peer_id
        assert superseding_driver(registry, record, SECOND.peer_id) == ""
        assert record.driver == SECOND.peer_id  # the view names the same driver


def test_superseding_driver_lamport_tie_by_author() -> None:
    submitted, request_id = _submitted()
    record = _record([submitted, _accepted(FIRST, request_id, submitted, 6), _accepted(SECOND, request_id, submitted, 6)], request_id)
    registry = _registry(_members())

    kept = [peer for peer in (FIRST.peer_id, SECOND.peer_id) if superseding_driver(registry, record, peer) == ""]
    assert kept == [max(FIRST.peer_id, SECOND.peer_id)]


def test_superseding_driver_before_own_acceptance() -> None:
    submitted, request_id = _submitted()
    record = _record([submitted, _accepted(SECOND, request_id, submitted, lamport=3)], request_id)

    assert superseding_driver(_registry(_members()), record, FIRST.peer_id) == SECOND.peer_id


def test_superseding_driver_ignores_non_drivers() -> None:
    submitted, request_id = _submitted()
    mine = _accepted(FIRST, request_id, submitted, lamport=5)
    later = _accepted(BYSTANDER, request_id, submitted, lamport=9, takeover_of=FIRST.peer_id)
    unknown = _accepted(Identity.generate(), request_id, submitted, lamport=11, takeover_of=FIRST.peer_id)
    registry = _registry(_members())

    record = _record([submitted, mine, later, unknown], request_id)
    assert not may_drive(registry, MODEL_ID, BYSTANDER.peer_id)
    assert superseding_driver(registry, record, FIRST.peer_id) == ""
    # The same acceptance by a peer with a fallback model counts: it may drive degraded.
    by_fallback = _accepted(FALLBACK, request_id, submitted, lamport=9, takeover_of=FIRST.peer_id)
    assert may_drive(registry, MODEL_ID, FALLBACK.peer_id)
    assert superseding_driver(registry, _record([submitted, mine, by_fallback], request_id), FIRST.peer_id) == FALLBACK.peer_id


def test_may_drive_ignores_liveness() -> None:
    # An acceptance that arrives long after its author's last heartbeat still names a driver
    # that streamed, so the other driver stops, as on every other peer.
    submitted, request_id = _submitted()
    registry = _registry(_members())
    record = _record([submitted, _accepted(FIRST, request_id, submitted, 4), _accepted(SECOND, request_id, submitted, 8)], request_id)

    assert not registry.is_live(SECOND.peer_id, 100_000)
    assert may_drive(registry, MODEL_ID, SECOND.peer_id)
    assert superseding_driver(registry, record, FIRST.peer_id) == SECOND.peer_id
