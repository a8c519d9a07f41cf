"""Wire codec: round trips, signature and canonical-form checks, schema rules."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import pytest
from event_strategies import EVENT_IDS, bodies, body_strategies
from hypothesis import given, settings
from hypothesis import strategies as st
from signing_helpers import envelope_for, sign_envelope

from events import (
    MAX_PAYLOAD_BYTES,
    EventRejected,
    Identity,
    PeerHeartbeat,
    PeerJoined,
    PeerLeft,
    RejectReason,
    SchemaError,
    SequenceSkipped,
    ShardLoaded,
    UnknownBody,
    decode_event,
    event_id,
    event_type,
    registered_types,
    sign_event,
)
from events.model import SchemaViolation

IDENTITY = Identity.generate()


def test_strategies_cover_membership_and_shard_types() -> None:
    registered = {registered.cls for family in ("membership", "shards") for registered in registered_types(family)}

    assert registered == set(body_strategies(IDENTITY, 1))


@settings(max_examples=150, deadline=None)
@given(
    seq=st.integers(min_value=1, max_value=2**63 - 1),
    lamport=st.integers(min_value=1, max_value=2**63 - 1),
    time_ms=st.integers(min_value=0, max_value=2**63 - 1),
    refs=st.lists(EVENT_IDS, max_size=3).map(tuple),
    data=st.data(),
)
def test_codec_round_trip(seq: int, lamport: int, time_ms: int, refs: tuple[str, ...], data: st.DataObject) -> None:
    body = data.draw(bodies(IDENTITY, seq))
    event = sign_event(IDENTITY, body, seq=seq, lamport=lamport, time_ms=time_ms, refs=refs)
    decoded = decode_event(event.wire)

    assert decoded == event
    assert decoded.body == body
    assert decoded.id == event_id(event.payload)
    assert decoded.author == IDENTITY.peer_id
    assert len(event.signature) == 64


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_bit_flip_rejected(data: st.DataObject) -> None:
    body = data.draw(bodies(IDENTITY, 1))
    wire = sign_event(IDENTITY, body, seq=1, lamport=1, time_ms=0).wire
    bit = data.draw(st.integers(min_value=0, max_value=len(wire) * 8 - 1))
    flipped = bytearray(wire)
    flipped[bit // 8] ^= 1 << (bit % 8)

    with pytest.raises(EventRejected):
        decode_event(bytes(flipped))


def test_payload_is_sorted_canonical_json() -> None:
    event = sign_event(IDENTITY, ShardLoaded("m", "block[0:4]", 7), seq=3, lamport=5, time_ms=9)
    decoded = orjson.loads(event.payload)

    assert event.payload == orjson.dumps(decoded, option=orjson.OPT_SORT_KEYS)
    assert list(decoded) == sorted(decoded)
    assert decoded["body"] == {"fragment": "block[0:4]", "memory_bytes": 7, "model_id": "m"}
    assert decoded["type"] == "ShardLoaded"
    assert decoded["version"] == "1.0"


def test_id_is_blake2b_of_payload() -> None:
    import hashlib

    event = sign_event(IDENTITY, PeerLeft("bye"), seq=1, lamport=1, time_ms=0)

    assert event.id == hashlib.blake2b(event.wire[:-64], digest_size=32).hexdigest()


def test_heartbeat_with_wrong_latest_seq_rejected() -> None:
    envelope = envelope_for(IDENTITY, type="PeerHeartbeat", body={"latest_seq": 3}, seq=3)

    with pytest.raises(EventRejected) as error:
        decode_event(sign_envelope(IDENTITY, envelope))
    assert error.value.reason is RejectReason.MALFORMED
    assert "must carry 2" in str(error.value)
    with pytest.raises(SchemaViolation, match="must carry 2"):
        sign_event(IDENTITY, PeerHeartbeat(3), seq=3, lamport=1, time_ms=0)


@pytest.mark.parametrize(
    ("first", "last", "seq", "message"),
    [
        (0, 3, 5, "first must be >= 1"),
        (4, 3, 5, "last must be >= first"),
        (2, 5, 5, "only seqs below 5"),
        (2, 9, 5, "only seqs below 5"),
    ],
)
def test_invalid_sequence_skipped_rejected(first: int, last: int, seq: int, message: str) -> None:
    envelope = envelope_for(IDENTITY, type="SequenceSkipped", body={"first": first, "last": last}, seq=seq)

    with pytest.raises(EventRejected) as error:
        decode_event(sign_envelope(IDENTITY, envelope))
    assert error.value.reason is RejectReason.MALFORMED
    assert message in str(error.value)


def test_sequence_skipped_below_own_seq_accepted() -> None:
    event = sign_event(IDENTITY, SequenceSkipped(first=2, last=4), seq=5, lamport=1, time_ms=0)

    assert decode_event(event.wire).body == SequenceSkipped(2, 4)


def test_joined_with_foreign_curve_key_rejected() -> None:
    other_key = Identity.generate().curve_public_key.decode()
    body = PeerJoined((), "tcp://127.0.0.1:1", other_key, {}, "1.0", "0.1.0")

    with pytest.raises(SchemaViolation, match="not the CurveZMQ key"):
        sign_event(IDENTITY, body, seq=1, lamport=1, time_ms=0)
    envelope = envelope_for(
        IDENTITY,
        type="PeerJoined",
        body={
            "bus_addresses": [],
            "curve_public_key": other_key,
            "data_endpoint": "tcp://127.0.0.1:1",
            "hardware": {},
            "protocol_version": "1.0",
            "software_version": "0.1.0",
        },
    )
    with pytest.raises(EventRejected) as error:
        decode_event(sign_envelope(IDENTITY, envelope))
    assert error.value.reason is RejectReason.MALFORMED


def test_non_canonical_payload_rejected() -> None:
    payload = orjson.dumps(envelope_for(IDENTITY), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
    wire = payload + IDENTITY.sign(payload)

    with pytest.raises(EventRejected) as error:
        decode_event(wire)
    assert error.value.reason is RejectReason.MALFORMED


def test_float_in_body_rejected_at_signing() -> None:
    with pytest.raises(SchemaViolation, match="float"):
        sign_event(IDENTITY, ShardLoaded("m", "head", 1.5), seq=1, lamport=1, time_ms=0)  # type: ignore[arg-type]


def test_float_in_unknown_type_rejected() -> None:
    envelope = envelope_for(IDENTITY, type="ModelPublished", body={"score": 0.5})

    with pytest.raises(EventRejected) as error:
        decode_event(sign_envelope(IDENTITY, envelope))
    assert error.value.reason is RejectReason.MALFORMED
    assert "float" in str(error.value)


def test_oversized_payload_rejected_at_signing() -> None:
    with pytest.raises(EventRejected) as error:
        sign_event(IDENTITY, PeerLeft("x" * MAX_PAYLOAD_BYTES), seq=1, lamport=1, time_ms=0)
    assert error.value.reason is RejectReason.OVERSIZED


def test_unknown_type_decodes_as_unknown_body() -> None:
    envelope = envelope_for(IDENTITY, type="ModelPublished", version="1.3", body={"name": "tiny", "layers": 4})
    event = decode_event(sign_envelope(IDENTITY, envelope))

    assert event.body == UnknownBody("ModelPublished", "1.3", {"name": "tiny", "layers": 4})
    assert not event.is_known_type


def test_newer_minor_extra_field_ignored() -> None:
    body = {"model_id": "m", "fragment": "head", "memory_bytes": 10, "dtype": "bf16"}
    event = decode_event(sign_envelope(IDENTITY, envelope_for(IDENTITY, version="1.1", body=body)))

    assert event.body == ShardLoaded("m", "head", 10)
    assert event.version == "1.1"


def test_invalid_fragment_rejected() -> None:
    body = {"model_id": "m", "fragment": "block[4:2]", "memory_bytes": 10}

    with pytest.raises(EventRejected) as error:
        decode_event(sign_envelope(IDENTITY, envelope_for(IDENTITY, body=body)))
    assert error.value.reason is RejectReason.MALFORMED
    assert "block[4:2]" in str(error.value)


def test_bool_is_not_an_int() -> None:
    body = {"model_id": "m", "fragment": "head", "memory_bytes": True}

    with pytest.raises(EventRejected) as error:
        decode_event(sign_envelope(IDENTITY, envelope_for(IDENTITY, body=body)))
    assert error.value.reason is RejectReason.MALFORMED


def test_registration_rejects_mutable_dataclass() -> None:
    with pytest.raises(SchemaError, match="frozen"):

        @event_type(version="1.0", family="testing")
        @dataclass
        class ThingHappened:
            count: int


def test_registration_rejects_float_field() -> None:
    with pytest.raises(SchemaError, match="float"):

        @event_type(version="1.0", family="testing")
        @dataclass(frozen=True)
        class ScoreComputed:
            score: float


def test_registration_rejects_other_major() -> None:
    with pytest.raises(SchemaError, match="schema major"):

        @event_type(version="2.0", family="testing")
        @dataclass(frozen=True)
        class FutureHappened:
            count: int


@event_type(version="1.2", family="testing")
@dataclass(frozen=True, slots=True)
class WidgetCounted:
    counts: dict[str, int]
    tags: tuple[str, ...] = ()
    note: str | None = None


def test_registered_type_round_trip() -> None:
    body = WidgetCounted({"a": 1}, ("x", "y"))
    event = sign_event(IDENTITY, body, seq=1, lamport=1, time_ms=0)
    decoded = decode_event(event.wire)

    assert decoded.body == body
    assert decoded.version == "1.2"
    assert orjson.loads(event.payload)["body"] == {"counts": {"a": 1}, "note": None, "tags": ["x", "y"]}
