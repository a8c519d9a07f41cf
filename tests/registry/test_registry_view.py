"""Registry view: peers, liveness against a caller's now, shard states and coverage."""

from __future__ import annotations

from typing import Any

import pytest

from cortex.registry import LIVENESS_TIMEOUT_MS, FragmentCoverage, RegistryReducer, RegistryView
from events import (
    Event,
    Identity,
    PeerHeartbeat,
    PeerJoined,
    PeerLeft,
    SequenceSkipped,
    ShardClaimed,
    ShardLoaded,
    ShardReleased,
    curve_public_key_from_peer_id,
    sign_event,
)

ALICE = Identity.generate()
BOB = Identity.generate()
REDUCER = RegistryReducer()


def event(identity: Identity, body: Any, seq: int, lamport: int | None = None, time_ms: int = 1_000) -> Event:
    return sign_event(identity, body, seq=seq, lamport=lamport or seq, time_ms=time_ms)


def joined(identity: Identity, seq: int = 1, lamport: int | None = None, time_ms: int = 1_000) -> Event:
    body = PeerJoined(("/ip4/127.0.0.1/tcp/4001",), "tcp://127.0.0.1:5555", identity.curve_public_key.decode(), {"cores": 2}, "1.0", "0.1.0")
    return event(identity, body, seq, lamport, time_ms)


def fold(*events: Event) -> RegistryView:
    view = REDUCER.empty()
    for item in events:
        view = REDUCER.apply(view, item)
    return view


def test_peer_joined_recorded() -> None:
    view = fold(joined(ALICE))
    record = view.peers[ALICE.peer_id]

    assert record.announcement is not None
    assert record.announcement.data_endpoint == "tcp://127.0.0.1:5555"
    assert record.announcement.hardware == {"cores": 2}
    assert record.present
    assert record.last_heartbeat_ms == 1_000
    assert record.curve_public_key == curve_public_key_from_peer_id(ALICE.peer_id)


def test_liveness_uses_callers_now() -> None:
    view = fold(joined(ALICE, time_ms=1_000), event(ALICE, PeerHeartbeat(1), 2, time_ms=5_000))

    assert view.is_live(ALICE.peer_id, now_ms=5_000 + LIVENESS_TIMEOUT_MS)
    assert not view.is_live(ALICE.peer_id, now_ms=5_001 + LIVENESS_TIMEOUT_MS)
    assert view.is_live(ALICE.peer_id, now_ms=6_000, timeout_ms=1_000)
    assert not view.is_live(ALICE.peer_id, now_ms=6_001, timeout_ms=1_000)
    assert view.live_peers(now_ms=6_000) == [ALICE.peer_id]


def test_heartbeat_without_join_not_live() -> None:
    view = fold(event(ALICE, PeerHeartbeat(0), 1))

    assert not view.is_live(ALICE.peer_id, now_ms=1_000)
    assert view.peers[ALICE.peer_id].latest_seq == 1


def test_heartbeat_before_join_counts_once_joined() -> None:
    view = fold(event(ALICE, PeerHeartbeat(1), 2, time_ms=9_000), joined(ALICE, time_ms=1_000))

    assert view.peers[ALICE.peer_id].last_heartbeat_ms == 9_000
    assert view.is_live(ALICE.peer_id, now_ms=9_000 + LIVENESS_TIMEOUT_MS)


def test_heartbeat_latest_seq_kept() -> None:
    view = fold(joined(ALICE), event(ALICE, PeerHeartbeat(7), 8))

    assert view.peers[ALICE.peer_id].latest_seq == 8


def test_peer_left_not_live() -> None:
    view = fold(joined(ALICE), event(ALICE, PeerLeft("maintenance"), 2))

    assert not view.peers[ALICE.peer_id].present
    assert not view.is_live(ALICE.peer_id, now_ms=1_000)


def test_rejoin_after_leave_is_live() -> None:
    view = fold(joined(ALICE), event(ALICE, PeerLeft(), 2), joined(ALICE, seq=3, time_ms=2_000))

    assert view.is_live(ALICE.peer_id, now_ms=2_000)


def test_late_join_does_not_undo_leave() -> None:
    view = fold(event(ALICE, PeerLeft(), 2), joined(ALICE, seq=1))

    assert not view.is_live(ALICE.peer_id, now_ms=1_000)


def test_shard_lifecycle() -> None:
    claimed = fold(joined(ALICE), event(ALICE, ShardClaimed("m", "head", 100), 2))
    assert [(s.fragment, s.state, s.memory_bytes) for s in claimed.shards_of(ALICE.peer_id)] == [("head", "claimed", 100)]

    loaded = REDUCER.apply(claimed, event(ALICE, ShardLoaded("m", "head", 90), 3))
    assert [(s.fragment, s.state, s.memory_bytes) for s in loaded.shards_of(ALICE.peer_id)] == [("head", "loaded", 90)]

    released = REDUCER.apply(loaded, event(ALICE, ShardReleased("m", "head"), 4))
    assert released.shards_of(ALICE.peer_id) == []
    assert released.models() == []


def test_older_claim_does_not_revert_load() -> None:
    view = fold(joined(ALICE), event(ALICE, ShardLoaded("m", "head", 90), 3), event(ALICE, ShardClaimed("m", "head", 100), 2))

    assert [s.state for s in view.shards_of(ALICE.peer_id)] == ["loaded"]


def test_coverage_counts_live_holders() -> None:
    view = fold(
        joined(ALICE, time_ms=1_000),
        joined(BOB, time_ms=50_000),
        event(ALICE, ShardLoaded("m", "head", 1), 2),
        event(BOB, ShardLoaded("m", "head", 1), 2),
        event(BOB, ShardClaimed("m", "block[0:4]", 1), 3),
        event(ALICE, ShardLoaded("other", "expert[0][3]", 1), 3),
    )
    both_live = view.coverage("m", now_ms=10_000, timeout_ms=100_000)
    only_bob = view.coverage("m", now_ms=50_000)

    assert both_live == {
        "block[0:4]": FragmentCoverage(loaded=(), claimed=(BOB.peer_id,)),
        "head": FragmentCoverage(loaded=tuple(sorted([ALICE.peer_id, BOB.peer_id])), claimed=()),
    }
    assert only_bob["head"] == FragmentCoverage(loaded=(BOB.peer_id,), claimed=())
    assert view.holders("m", "head", now_ms=50_000) == [BOB.peer_id]
    assert view.holders("m", "block[0:4]", now_ms=50_000) == []
    assert view.holders("m", "block[0:4]", now_ms=50_000, loaded_only=False) == [BOB.peer_id]
    assert view.models() == ["m", "other"]


def test_coverage_keeps_fragments_without_live_holders() -> None:
    view = fold(joined(ALICE, time_ms=1_000), event(ALICE, ShardLoaded("m", "head", 1), 2))

    assert view.coverage("m", now_ms=1_000_000) == {"head": FragmentCoverage(loaded=(), claimed=())}


def test_equivocation_marks_peer() -> None:
    view = fold(joined(ALICE), event(ALICE, ShardLoaded("m", "head", 1), 2))
    view = REDUCER.apply_equivocation(view, ALICE.peer_id, 5)
    view = REDUCER.apply_equivocation(view, ALICE.peer_id, 3)
    view = REDUCER.apply_equivocation(view, ALICE.peer_id, 4)

    assert view.peers[ALICE.peer_id].equivocated_from_seq == 3
    assert not view.is_live(ALICE.peer_id, now_ms=1_000)
    assert view.holders("m", "head", now_ms=1_000) == []


def test_digest_equal_for_equal_views() -> None:
    first = fold(joined(ALICE), joined(BOB), event(BOB, ShardLoaded("m", "head", 1), 2))
    second = fold(event(BOB, ShardLoaded("m", "head", 1), 2), joined(BOB), joined(ALICE))
    different = fold(joined(ALICE), joined(BOB))

    assert first.digest() == second.digest()
    assert first.digest() != different.digest()
    assert len(first.digest()) == 64


@pytest.mark.parametrize("body", [PeerHeartbeat(0), ShardLoaded("m", "head", 1)])
def test_apply_returns_view(body: Any) -> None:
    view = REDUCER.empty()

    assert REDUCER.apply(view, event(ALICE, body, 1)) is view


def test_sequence_skipped_only_raises_latest_seq() -> None:
    before = fold(joined(ALICE, time_ms=1_000))
    view = fold(joined(ALICE, time_ms=1_000), event(ALICE, SequenceSkipped(2, 9), 10, time_ms=90_000))
    record = view.peers[ALICE.peer_id]

    assert record.latest_seq == 10
    assert record.last_heartbeat_ms == 1_000
    assert record.present
    record.latest_seq = 1
    assert view.digest() == before.digest()
