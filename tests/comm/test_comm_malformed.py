"""Malformed frames sent to a live node: each is rejected, counted and penalized; serving goes on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import torch
from comm_helpers import Node, NodeFactory, RawClient, RecordSigner, build_call, echo_expert, expert_input

from cortex.comm import FrameReason, Rejection
from cortex.comm.frames import MAX_FRAME_BYTES, encode_header
import events.model as events_model
from events import REQUEST_SCOPE, Identity, PeerLeft, event_type

HIDDEN = torch.arange(12.0).reshape(3, 4)
HIDDEN_BYTES = HIDDEN.numpy().tobytes()


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def wrong_dtype(raw: RawClient) -> list[bytes]:
    body = expert_input("hidden", HIDDEN_BYTES + HIDDEN_BYTES, "float64", (3, 4))
    return [encode_header("call", 1, kind="expert", chunks=[1]), raw.signer.sign(body).wire, HIDDEN_BYTES + HIDDEN_BYTES]


def shape_not_matching_bytes(raw: RawClient) -> list[bytes]:
    return build_call(raw.signer, 1, {"hidden": HIDDEN}, shape=(4, 4))


def bad_digest(raw: RawClient) -> list[bytes]:
    parts = build_call(raw.signer, 1, {"hidden": HIDDEN})
    parts[2] = flip(parts[2], 5)
    return parts


def oversized(raw: RawClient) -> list[bytes]:
    # Claims a 4 GiB tensor: rejected on the record, before any byte is counted.
    return build_call(raw.signer, 1, {"hidden": HIDDEN}, shape=(2**30,), nbytes=2**32)


def truncated(raw: RawClient) -> list[bytes]:
    return build_call(raw.signer, 1, {"hidden": HIDDEN}, chunk_bytes=16)[:-1]


def length_mismatch(raw: RawClient) -> list[bytes]:
    parts = build_call(raw.signer, 1, {"hidden": HIDDEN})
    parts[2] = parts[2][:-4]
    return parts


def forged_signature(raw: RawClient) -> list[bytes]:
    parts = build_call(raw.signer, 1, {"hidden": HIDDEN})
    parts[1] = flip(parts[1], len(parts[1]) - 10)
    return parts


def author_mismatch(raw: RawClient) -> list[bytes]:
    # Records signed by another identity than the one the connection authenticated.
    return build_call(RecordSigner(Identity.generate()), 1, {"hidden": HIDDEN})


def unknown_request(raw: RawClient) -> list[bytes]:
    return build_call(raw.signer, 1, {"hidden": HIDDEN}, refs=("cd" * 32,))


def unexpected_type(raw: RawClient) -> list[bytes]:
    return [encode_header("call", 1, kind="expert", chunks=[1]), raw.signer.sign(PeerLeft()).wire, HIDDEN_BYTES]


def garbage_event(raw: RawClient) -> list[bytes]:
    return [encode_header("call", 1, kind="expert", chunks=[1]), b"{not an event" + bytes(64), HIDDEN_BYTES]


def extra_parts(raw: RawClient) -> list[bytes]:
    return build_call(raw.signer, 1, {"hidden": HIDDEN}) + [b"extra"]


def mixed_requests(raw: RawClient) -> list[bytes]:
    first = build_call(raw.signer, 1, {"hidden": HIDDEN})
    second = build_call(raw.signer, 1, {"other": HIDDEN}, refs=("ef" * 32,))
    return [encode_header("call", 1, kind="expert", chunks=[1, 1]), *first[1:], *second[1:]]


def repeated_names(raw: RawClient) -> list[bytes]:
    first = build_call(raw.signer, 1, {"hidden": HIDDEN})
    second = build_call(raw.signer, 1, {"hidden": HIDDEN})
    return [encode_header("call", 1, kind="expert", chunks=[1, 1]), *first[1:], *second[1:]]


def reply_instead_of_call(raw: RawClient) -> list[bytes]:
    parts = build_call(raw.signer, 1, {"hidden": HIDDEN})
    return [encode_header("reply", 1, chunks=[1]), *parts[1:]]


@dataclass(frozen=True)
class Case:
    build: Callable[[RawClient], list[bytes]]
    reason: FrameReason
    author_known: bool = False


CASES = {
    "wrong_dtype": Case(wrong_dtype, FrameReason.BAD_DTYPE),
    "shape_not_matching_bytes": Case(shape_not_matching_bytes, FrameReason.SHAPE_MISMATCH),
    "bad_digest": Case(bad_digest, FrameReason.BAD_DIGEST, author_known=True),
    "oversized": Case(oversized, FrameReason.OVERSIZED),
    "truncated": Case(truncated, FrameReason.TRUNCATED),
    "length_mismatch": Case(length_mismatch, FrameReason.LENGTH_MISMATCH),
    "forged_signature": Case(forged_signature, FrameReason.BAD_SIGNATURE, author_known=True),
    "author_mismatch": Case(author_mismatch, FrameReason.AUTHOR_MISMATCH),
    "unknown_request": Case(unknown_request, FrameReason.UNKNOWN_REQUEST, author_known=True),
    "unexpected_type": Case(unexpected_type, FrameReason.UNEXPECTED_TYPE),
    "garbage_event": Case(garbage_event, FrameReason.MALFORMED_EVENT),
    "extra_parts": Case(extra_parts, FrameReason.MALFORMED),
    "mixed_requests": Case(mixed_requests, FrameReason.MALFORMED),
    "repeated_names": Case(repeated_names, FrameReason.MALFORMED),
    "reply_instead_of_call": Case(reply_instead_of_call, FrameReason.MALFORMED),
}


@pytest.fixture
async def raw(server: Node) -> AsyncIterator[RawClient]:
    client = RawClient(Identity.generate(), server)
    yield client
    client.close()


@pytest.mark.parametrize("name", sorted(CASES))
async def test_malformed_call_is_rejected(server: Node, raw: RawClient, name: str) -> None:
    case = CASES[name]

    await raw.send(case.build(raw))
    header, _frames = await raw.receive()

    assert header.op == "error"
    assert header.reason == case.reason.value
    assert server.dataplane.counters[f"rejected_{case.reason.value}"] == 1
    assert server.dataplane.counters["rejected"] == 1
    assert server.dataplane.counters["calls_served"] == 0
    assert [rejection.reason for rejection in server.rejections] == [case.reason]
    assert server.rejections[0].curve_key == raw.curve_key
    assert server.rejections[0].peer_id == (raw.identity.peer_id if case.author_known else None)
    assert (await raw.good_call()).op == "reply"
    assert server.dataplane.counters["calls_served"] == 1


async def test_unreadable_header_is_counted_without_reply(server: Node, raw: RawClient) -> None:
    await raw.send([b"\xff not a header", HIDDEN_BYTES])

    assert (await raw.good_call()).op == "reply"
    assert server.dataplane.counters["rejected_malformed"] == 1
    assert server.rejections[0].reason is FrameReason.MALFORMED
    assert server.rejections[0].curve_key == raw.curve_key


async def test_bad_digest_record_is_kept_as_evidence(server: Node, raw: RawClient) -> None:
    parts = bad_digest(raw)

    await raw.send(parts)
    await raw.receive()

    stored = [event.author for event in server.store.events(type="ExpertInputSent")]
    assert stored == [raw.identity.peer_id]


async def test_rejected_before_signature_is_not_logged(server: Node, raw: RawClient) -> None:
    await raw.send(shape_not_matching_bytes(raw))
    await raw.receive()

    assert list(server.store.events(type="ExpertInputSent")) == []


async def test_frame_over_size_limit_drops_only_that_connection(server: Node, raw: RawClient) -> None:
    header = encode_header("call", 1, kind="expert", chunks=[1])
    await raw.send([header, b"x" * (MAX_FRAME_BYTES + 1), b""])

    with pytest.raises(TimeoutError):
        await raw.receive(timeout_s=0.5)
    other = RawClient(Identity.generate(), server)
    try:
        assert (await other.good_call()).op == "reply"
    finally:
        other.close()
    assert server.dataplane.counters["calls_served"] == 1


async def test_failing_penalty_hook_does_not_stop_serving(nodes: NodeFactory) -> None:
    def failing_hook(rejection: Rejection) -> None:
        raise RuntimeError("penalty store unavailable")

    holder = nodes(on_reject=failing_hook)
    holder.dataplane.register_handler("expert", echo_expert)
    await holder.dataplane.start()
    raw = RawClient(Identity.generate(), holder)
    try:
        await raw.send(bad_digest(raw))
        header, _frames = await raw.receive()

        assert header.reason == "bad_digest"
        assert (await raw.good_call()).op == "reply"
        assert holder.dataplane.counters["rejected_bad_digest"] == 1
    finally:
        raw.close()


async def test_flood_of_bad_frames_is_survived(server: Node, raw: RawClient) -> None:
    for _ in range(40):
        await raw.send(bad_digest(raw))

    assert (await asyncio.wait_for(raw.good_call(), 10.0)).op == "reply"
    assert server.dataplane.counters["rejected_bad_digest"] == 40


async def test_unknown_record_type_is_rejected_without_penalty(server: Node, raw: RawClient) -> None:
    # A record type from a newer version: sign it while registered, then forget the type,
    # as a node that predates it would.
    @event_type(version="1.0", family="records", scope=REQUEST_SCOPE, name="ExpertRecordFromTheFuture")
    @dataclass(frozen=True, slots=True)
    class ExpertRecordFromTheFuture:
        note: str

    wire = raw.signer.sign(ExpertRecordFromTheFuture("newer")).wire
    del events_model._TYPES_BY_NAME["ExpertRecordFromTheFuture"]
    del events_model._TYPES_BY_CLASS[ExpertRecordFromTheFuture]

    await raw.send([encode_header("call", 1, kind="expert", chunks=[1]), wire, HIDDEN_BYTES])
    header, _frames = await raw.receive()

    assert header.op == "error"
    assert header.reason == FrameReason.UNKNOWN_RECORD_TYPE.value
    assert "upgrade this node" in header.message
    assert server.dataplane.counters["rejected_unknown_record_type"] == 1
    assert server.rejections == []  # an honest newer peer is not penalized
    assert (await raw.good_call()).op == "reply"
