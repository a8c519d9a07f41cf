"""Acceptance path: each rejection reason, duplicates, equivocation and unknown types."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_key_pair
from libp2p.peer.id import ID
from signing_helpers import envelope_for, sign_envelope

from cortex.registry import RegistryReducer, RegistryView
from events import (
    MAX_PAYLOAD_BYTES,
    Acceptor,
    EventRejected,
    Identity,
    LogStore,
    PeerHeartbeat,
    PeerJoined,
    Projection,
    RejectReason,
    ShardClaimed,
    ShardLoaded,
    sign_event,
)


def joined(identity: Identity, seq: int = 1, lamport: int = 1, time_ms: int = 1_000) -> bytes:
    body = PeerJoined(("/ip4/127.0.0.1/tcp/4001",), "tcp://127.0.0.1:5555", identity.curve_public_key.decode(), {"cores": 2}, "1.0", "0.1.0")
    return sign_event(identity, body, seq=seq, lamport=lamport, time_ms=time_ms).wire


@pytest.fixture
def populated(acceptor: Acceptor, alice: Identity, bob: Identity) -> Acceptor:
    acceptor.accept_many(
        [
            joined(alice),
            joined(bob),
            sign_event(alice, ShardLoaded("m", "head", 10), seq=2, lamport=2, time_ms=1_001).wire,
        ]
    )
    return acceptor


def assert_rejected(acceptor: Acceptor, registry: Projection[RegistryView], wire: bytes, reason: RejectReason) -> None:
    """Accept `wire`, expect `reason`, and check that neither the log nor the view changed."""
    ids_before = [event.id for event in acceptor.store.events()]
    digest_before = registry.view.digest()
    count_before = acceptor.counters[reason.value]

    with pytest.raises(EventRejected) as error:
        acceptor.accept(wire)

    assert error.value.reason is reason
    assert [event.id for event in acceptor.store.events()] == ids_before
    assert registry.view.digest() == digest_before
    assert acceptor.counters[reason.value] == count_before + 1
    assert acceptor.counters["accepted"] == len(ids_before)


def test_bad_signature_rejected(populated: Acceptor, registry: Projection[RegistryView], bob: Identity) -> None:
    wire = bytearray(sign_event(bob, ShardLoaded("m", "head", 1), seq=2, lamport=3, time_ms=1).wire)
    wire[-1] ^= 0x01

    assert_rejected(populated, registry, bytes(wire), RejectReason.BAD_SIGNATURE)


def test_signature_by_other_key_rejected(populated: Acceptor, registry: Projection[RegistryView], alice: Identity, bob: Identity) -> None:
    payload = orjson.dumps(envelope_for(bob, seq=2, lamport=3), option=orjson.OPT_SORT_KEYS)

    assert_rejected(populated, registry, payload + alice.sign(payload), RejectReason.BAD_SIGNATURE)


@pytest.mark.parametrize(
    "author",
    [
        "12D3KooWnotapeerid",
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
        ID.from_pubkey(create_secp256k1_key_pair().public_key).to_base58(),
        17,
    ],
)
def test_invalid_author_rejected(populated: Acceptor, registry: Projection[RegistryView], alice: Identity, author: object) -> None:
    wire = sign_envelope(alice, envelope_for(alice, author=author, seq=3, lamport=3))

    assert_rejected(populated, registry, wire, RejectReason.INVALID_AUTHOR)


def test_oversized_payload_rejected(populated: Acceptor, registry: Projection[RegistryView], alice: Identity) -> None:
    body = {"model_id": "m" * MAX_PAYLOAD_BYTES, "fragment": "head", "memory_bytes": 1}
    wire = sign_envelope(alice, envelope_for(alice, body=body, seq=3, lamport=3))

    assert len(wire) - 64 > MAX_PAYLOAD_BYTES
    assert_rejected(populated, registry, wire, RejectReason.OVERSIZED)


def test_payload_at_size_limit_accepted(acceptor: Acceptor, alice: Identity) -> None:
    base = len(sign_envelope(alice, envelope_for(alice, body={"model_id": "", "fragment": "head", "memory_bytes": 1}))) - 64
    body = {"model_id": "m" * (MAX_PAYLOAD_BYTES - base), "fragment": "head", "memory_bytes": 1}
    wire = sign_envelope(alice, envelope_for(alice, body=body))

    assert len(wire) - 64 == MAX_PAYLOAD_BYTES
    assert acceptor.accept(wire) is not None


MALFORMED_CASES: dict[str, Callable[[Identity], bytes]] = {
    "not json": lambda identity: b"{not json" + identity.sign(b"{not json"),
    "json array": lambda identity: sign_envelope_raw(identity, b"[1,2,3]"),
    "too short": lambda identity: b"{}",
    "missing field": lambda identity: sign_envelope(identity, {k: v for k, v in envelope_for(identity).items() if k != "lamport"}),
    "seq as string": lambda identity: sign_envelope(identity, envelope_for(identity, seq="3")),
    "seq zero": lambda identity: sign_envelope(identity, envelope_for(identity, seq=0)),
    "negative time": lambda identity: sign_envelope(identity, envelope_for(identity, time_ms=-1)),
    "lamport as float": lambda identity: sign_envelope(identity, envelope_for(identity, lamport=3.0)),
    "seq above int64": lambda identity: sign_envelope(identity, envelope_for(identity, seq=2**63)),
    "bad ref": lambda identity: sign_envelope(identity, envelope_for(identity, refs=["abc"])),
    "uppercase ref": lambda identity: sign_envelope(identity, envelope_for(identity, refs=["AB" * 32])),
    "bad version": lambda identity: sign_envelope(identity, envelope_for(identity, version="1")),
    "bad type name": lambda identity: sign_envelope(identity, envelope_for(identity, type="shard loaded")),
    "body not object": lambda identity: sign_envelope(identity, envelope_for(identity, body=[1])),
    "missing body field": lambda identity: sign_envelope(identity, envelope_for(identity, body={"model_id": "m", "fragment": "head"})),
    "float in body": lambda identity: sign_envelope(
        identity, envelope_for(identity, body={"model_id": "m", "fragment": "head", "memory_bytes": 1.5})
    ),
    "bad fragment": lambda identity: sign_envelope(
        identity, envelope_for(identity, body={"model_id": "m", "fragment": "tail", "memory_bytes": 1})
    ),
    "negative memory": lambda identity: sign_envelope(
        identity, envelope_for(identity, body={"model_id": "m", "fragment": "head", "memory_bytes": -1})
    ),
}


def sign_envelope_raw(identity: Identity, payload: bytes) -> bytes:
    return payload + identity.sign(payload)


@pytest.mark.parametrize("case", sorted(MALFORMED_CASES))
def test_malformed_rejected(populated: Acceptor, registry: Projection[RegistryView], bob: Identity, case: str) -> None:
    assert_rejected(populated, registry, MALFORMED_CASES[case](bob), RejectReason.MALFORMED)


def test_unknown_envelope_field_rejected(populated: Acceptor, registry: Projection[RegistryView], bob: Identity) -> None:
    wire = sign_envelope(bob, envelope_for(bob, seq=2, lamport=3, priority=1))

    assert_rejected(populated, registry, wire, RejectReason.UNKNOWN_FIELD)


def test_unknown_body_field_rejected(populated: Acceptor, registry: Projection[RegistryView], bob: Identity) -> None:
    body = {"model_id": "m", "fragment": "head", "memory_bytes": 1, "dtype": "bf16"}
    wire = sign_envelope(bob, envelope_for(bob, body=body, seq=2, lamport=3, version="1.0"))

    assert_rejected(populated, registry, wire, RejectReason.UNKNOWN_FIELD)


@pytest.mark.parametrize("version", ["2.0", "0.9", "3.1"])
def test_incompatible_major_rejected(populated: Acceptor, registry: Projection[RegistryView], bob: Identity, version: str) -> None:
    wire = sign_envelope(bob, envelope_for(bob, seq=2, lamport=3, version=version))

    assert_rejected(populated, registry, wire, RejectReason.INCOMPATIBLE_VERSION)
    with pytest.raises(EventRejected, match=f"{version}.*major version 1"):
        populated.accept(wire)


def test_own_key_event_from_elsewhere_rejected(tmp_path: Path, alice: Identity) -> None:
    registry = Projection(RegistryReducer())
    with LogStore(tmp_path / "own.db") as store:
        acceptor = Acceptor(store, [registry], own_peer_id=alice.peer_id)
        wire = sign_event(alice, ShardLoaded("m", "head", 1), seq=1, lamport=1, time_ms=1).wire

        assert_rejected(acceptor, registry, wire, RejectReason.OWN_IDENTITY_CONFLICT)


def test_duplicate_dropped_silently(populated: Acceptor, registry: Projection[RegistryView], alice: Identity) -> None:
    ids_before = [event.id for event in populated.store.events()]
    digest_before = registry.view.digest()

    assert populated.accept(joined(alice)) is None
    result = populated.accept_many([joined(alice), joined(alice)])

    assert result.accepted == []
    assert result.duplicates == 2
    assert result.rejected == []
    assert [event.id for event in populated.store.events()] == ids_before
    assert registry.view.digest() == digest_before
    assert populated.counters["duplicates"] == 3


def test_duplicate_within_one_batch(acceptor: Acceptor, alice: Identity) -> None:
    result = acceptor.accept_many([joined(alice), joined(alice)])

    assert len(result.accepted) == 1
    assert result.duplicates == 1
    assert len(acceptor.store) == 1


def test_duplicate_with_corrupted_signature_rejected(populated: Acceptor, registry: Projection[RegistryView], alice: Identity) -> None:
    wire = bytearray(joined(alice))
    wire[-5] ^= 0x10

    assert_rejected(populated, registry, bytes(wire), RejectReason.BAD_SIGNATURE)


def test_batch_rejections_reported_by_index(acceptor: Acceptor, alice: Identity, bob: Identity) -> None:
    bad = bytearray(joined(bob))
    bad[-1] ^= 1
    result = acceptor.accept_many([joined(alice), bytes(bad), joined(bob)])

    assert [event.author for event in result.accepted] == [alice.peer_id, bob.peer_id]
    assert [index for index, _ in result.rejected] == [1]
    assert result.rejected[0][1].reason is RejectReason.BAD_SIGNATURE


def test_equivocation_kept_and_recorded(populated: Acceptor, registry: Projection[RegistryView], bob: Identity) -> None:
    first = sign_event(bob, ShardLoaded("m", "block[0:4]", 5), seq=2, lamport=3, time_ms=1_002)
    second = sign_event(bob, ShardLoaded("m", "block[4:8]", 5), seq=2, lamport=3, time_ms=1_002)
    later = sign_event(bob, PeerHeartbeat(2), seq=3, lamport=4, time_ms=1_003)
    populated.accept_many([first.wire, later.wire])

    assert registry.view.is_live(bob.peer_id, now_ms=1_003)
    result = populated.accept_many([second.wire])

    assert [event.id for event in result.accepted] == [second.id]
    assert first.id in populated.store
    assert second.id in populated.store
    assert [(e.author, e.seq) for e in result.equivocations] == [(bob.peer_id, 2)]
    assert populated.store.equivocations() == result.equivocations
    assert populated.counters["equivocations"] == 1
    assert populated.excluded_authors == {bob.peer_id: 2}
    record = registry.view.peers[bob.peer_id]
    assert record.equivocated_from_seq == 2
    assert record.latest_seq == 1
    assert not registry.view.is_live(bob.peer_id, now_ms=1_003)
    assert registry.view.shards_of(bob.peer_id) == []


def test_equivocation_survives_reopen(tmp_path: Path, bob: Identity) -> None:
    first = sign_event(bob, ShardLoaded("m", "head", 5), seq=1, lamport=1, time_ms=1)
    second = sign_event(bob, ShardLoaded("m", "head", 6), seq=1, lamport=1, time_ms=1)
    with LogStore(tmp_path / "log.db") as store:
        Acceptor(store).accept_many([first.wire, second.wire])

    registry = Projection(RegistryReducer())
    with LogStore(tmp_path / "log.db") as store:
        acceptor = Acceptor(store, [registry])

        assert acceptor.excluded_authors == {bob.peer_id: 1}
        assert registry.view.peers[bob.peer_id].equivocated_from_seq == 1
        assert registry.view.shards == {}


def test_unknown_type_stored_and_skipped(populated: Acceptor, registry: Projection[RegistryView], bob: Identity) -> None:
    digest_before = registry.view.digest()
    envelope = envelope_for(bob, type="ModelPublished", version="1.4", body={"name": "tiny"}, seq=2, lamport=3)
    event = populated.accept(sign_envelope(bob, envelope))

    assert event is not None
    assert event.id in populated.store
    assert [e.type for e in populated.store.events(type="ModelPublished")] == ["ModelPublished"]
    assert registry.view.digest() == digest_before
    assert populated.counters["stored_unknown_type"] == 1


def test_lamport_tracks_highest_seen(acceptor: Acceptor, alice: Identity) -> None:
    acceptor.accept(sign_event(alice, ShardClaimed("m", "head", 1), seq=1, lamport=41, time_ms=1).wire)

    assert acceptor.lamport == 41
