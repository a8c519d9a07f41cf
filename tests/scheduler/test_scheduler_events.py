"""Request event types: codec round trips, validation, and the plan and records digests."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_strategies import BODY_STRATEGIES, PEER_IDS, PEERS, SEALED_TEXTS

from cortex.scheduler import (
    RequestAccepted,
    RequestCompleted,
    RequestSubmitted,
    RouteReplanned,
    TokenGenerated,
    plan_digest,
    records_digest,
    request_id_for,
)
from events import EventRejected, RejectReason, decode_event, registered_types, sign_event

AUTHOR = PEERS[0]
REQUEST_ID = "ab" * 32
NONCE = "0f" * 16


def test_strategies_cover_requests_family() -> None:
    registered = {registered.cls for registered in registered_types("requests")}

    assert registered == set(BODY_STRATEGIES)


@settings(max_examples=120, deadline=None)
@given(data=st.data(), seq=st.integers(min_value=1, max_value=2**40), lamport=st.integers(min_value=1, max_value=2**40))
def test_request_event_round_trip(data: st.DataObject, seq: int, lamport: int) -> None:
    body = data.draw(st.one_of(*BODY_STRATEGIES.values()))
    event = sign_event(AUTHOR, body, seq=seq, lamport=lamport, time_ms=1_000, refs=(REQUEST_ID,))

    decoded = decode_event(event.wire)

    assert decoded.body == body
    assert decoded == event
    assert decoded.refs == (REQUEST_ID,)


def _signed_with_body(type_name: str, body: dict[str, Any]) -> bytes:
    envelope = {
        "author": AUTHOR.peer_id,
        "body": body,
        "lamport": 1,
        "refs": [],
        "seq": 1,
        "time_ms": 1,
        "type": type_name,
        "version": "1.0",
    }
    payload = orjson.dumps(envelope, option=orjson.OPT_SORT_KEYS)
    return payload + AUTHOR.sign(payload)


def _submitted_json(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "nonce": NONCE,
        "model_id": "m",
        "max_tokens": 8,
        "prompt_bytes": 3,
        "sealed_prompt": SEALED_TEXTS[0],
    }
    body.update(overrides)
    return body


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"temperature_milli": 0.7}, RejectReason.MALFORMED),
        ({"max_tokens": 0}, RejectReason.MALFORMED),
        ({"top_p_micro": 0}, RejectReason.MALFORMED),
        ({"redundancy": 9}, RejectReason.MALFORMED),
        ({"prompt_digest": "cd" * 32}, RejectReason.MALFORMED),
        ({"sealed_prompt": "not base64!"}, RejectReason.MALFORMED),
        ({"sealed_prompt": "", "prompt_digest": ""}, RejectReason.MALFORMED),
        ({"nonce": "0F" * 16}, RejectReason.MALFORMED),
        ({"nonce": "0f" * 8}, RejectReason.MALFORMED),
        ({"prompt_text": "hello"}, RejectReason.UNKNOWN_FIELD),
    ],
)
def test_submitted_invalid_rejected(overrides: dict[str, Any], reason: RejectReason) -> None:
    wire = _signed_with_body("RequestSubmitted", _submitted_json(**overrides))

    with pytest.raises(EventRejected) as raised:
        decode_event(wire)

    assert raised.value.reason == reason


def test_submitted_sampling_units() -> None:
    body = RequestSubmitted(NONCE, "m", 4, 3, sealed_prompt=SEALED_TEXTS[0], temperature_milli=700, top_p_micro=900_000)

    assert body.temperature == 0.7
    assert body.top_p == 0.9
    assert body.redundancy == 1
    assert body.deadline_ms == 0


def test_submitted_digest_reference_accepted() -> None:
    body = RequestSubmitted(NONCE, "m", 4, 100_000, prompt_digest="cd" * 32)

    assert decode_event(sign_event(AUTHOR, body, seq=1, lamport=1, time_ms=1).wire).body == body


def _accepted(route: dict[str, str], **overrides: Any) -> RequestAccepted:
    reservations = dict.fromkeys(route, 10)
    fields: dict[str, Any] = {
        "request_id": REQUEST_ID,
        "route": route,
        "kv_reservations": reservations,
        "prompt_tokens": 5,
        "plan_digest": plan_digest(route, reservations, 5),
    }
    fields.update(overrides)
    return RequestAccepted(**fields)


def test_accepted_route_must_chain_from_zero() -> None:
    with pytest.raises(ValueError, match="starts at layer 2, expected layer 0"):
        _accepted({"block[2:4]": PEER_IDS[1]})
    with pytest.raises(ValueError, match="starts at layer 3, expected layer 2"):
        _accepted({"block[0:2]": PEER_IDS[1], "block[3:4]": PEER_IDS[2]})
    with pytest.raises(ValueError, match="not a block"):
        _accepted({"head": PEER_IDS[1]})


def test_accepted_plan_digest_checked() -> None:
    with pytest.raises(ValueError, match="does not match the plan"):
        _accepted({"block[0:2]": PEER_IDS[1]}, plan_digest="00" * 32)


def test_accepted_reservations_match_route() -> None:
    route = {"block[0:2]": PEER_IDS[1]}

    with pytest.raises(ValueError, match="must match"):
        _accepted(route, kv_reservations={}, plan_digest=plan_digest(route, {}, 5))


def test_accepted_empty_route_allowed() -> None:
    body = _accepted({})

    assert body.route == {}


def test_replanned_rejects_failed_holder_in_route() -> None:
    route = {"block[0:2]": PEER_IDS[1]}
    reservations = {"block[0:2]": 1}

    with pytest.raises(ValueError, match="still uses the failed holder"):
        RouteReplanned(REQUEST_ID, PEER_IDS[1], "holder_failed", route, reservations, 2, plan_digest(route, reservations, 2), 3)


def test_token_batch_bounds() -> None:
    with pytest.raises(ValueError, match="hold 0 tokens"):
        TokenGenerated(REQUEST_ID, 4, 4, SEALED_TEXTS[0])
    with pytest.raises(ValueError, match="hold 1025 tokens"):
        TokenGenerated(REQUEST_ID, 0, 1_025, SEALED_TEXTS[0])


def test_completed_degraded_needs_reason() -> None:
    body = RequestCompleted(REQUEST_ID, 3, 4, "length", {"total": 9}, "00" * 32, 0)

    assert body.degraded is False
    assert body.degraded_reason == ""
    with pytest.raises(ValueError, match="degraded_reason"):
        replace(body, degraded=True)
    with pytest.raises(ValueError, match="degraded_reason"):
        replace(body, degraded_reason="fallback")


def test_plan_digest_independent_of_key_order() -> None:
    first = plan_digest({"block[0:1]": PEER_IDS[1], "block[1:2]": PEER_IDS[2]}, {"block[0:1]": 1, "block[1:2]": 2}, 4)
    second = plan_digest({"block[1:2]": PEER_IDS[2], "block[0:1]": PEER_IDS[1]}, {"block[1:2]": 2, "block[0:1]": 1}, 4)
    third = plan_digest({"block[0:1]": PEER_IDS[1], "block[1:2]": PEER_IDS[2]}, {"block[0:1]": 1, "block[1:2]": 2}, 5)

    assert first == second
    assert first != third


def test_records_digest_order_and_duplicates() -> None:
    ids = ["01" * 32, "02" * 32, "03" * 32]

    digest, count = records_digest(ids)

    assert records_digest(reversed(ids)) == (digest, count)
    assert records_digest([*ids, ids[0]]) == (digest, 3)
    assert records_digest(ids[:2])[0] != digest
    with pytest.raises(ValueError, match="not an event id"):
        records_digest(["xyz"])


def test_request_id_depends_on_submitter_and_nonce() -> None:
    request_id = request_id_for(PEER_IDS[0], NONCE)

    assert len(request_id) == 64
    assert request_id_for(PEER_IDS[0], NONCE) == request_id
    assert request_id_for(PEER_IDS[1], NONCE) != request_id
    assert request_id_for(PEER_IDS[0], "1f" * 16) != request_id
