"""Frame codec round trips and malformed input, and the sync server's replies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cortex.bus import frames
from cortex.bus.errors import FrameDecodeError
from cortex.bus.frames import ErrorCode, Kind
from cortex.bus.sync import SyncServer, intersect_ranges
from events import Acceptor, Identity, LogStore, PeerHeartbeat, sign_event

wire_lists = st.lists(st.binary(max_size=300), max_size=40)
heads_maps = st.dictionaries(st.text(min_size=1, max_size=60), st.integers(min_value=0, max_value=2**63 - 1), max_size=20)


@given(wire_lists)
def test_events_frame_round_trip(wires: list[bytes]) -> None:
    kind, body = frames.decode_kind(frames.encode_events(wires))
    assert kind is Kind.EVENTS
    assert frames.decode_events_body(body) == wires


@given(heads_maps)
def test_heads_frame_round_trip(heads: dict[str, int]) -> None:
    kind, body = frames.decode_kind(frames.encode_heads(heads))
    assert kind is Kind.HEADS
    assert frames.decode_heads_body(body) == heads


@given(heads_maps, wire_lists, st.booleans())
def test_snapshot_reply_round_trip(heads: dict[str, int], wires: list[bytes], truncated: bool) -> None:
    kind, body = frames.decode_kind(frames.encode_snapshot_reply(heads, wires, truncated))
    assert kind is Kind.SNAPSHOT_REPLY
    reply = frames.decode_snapshot_reply(body)
    assert reply.heads == heads
    assert reply.events == wires
    assert reply.truncated is truncated


@given(wire_lists, st.booleans())
def test_events_reply_round_trip(wires: list[bytes], truncated: bool) -> None:
    kind, body = frames.decode_kind(frames.encode_events_reply(wires, truncated))
    assert kind is Kind.EVENTS_REPLY
    reply = frames.decode_flagged_events(body)
    assert reply.events == wires
    assert reply.truncated is truncated


@given(wire_lists, st.data())
def test_cut_events_frame_rejected(wires: list[bytes], data: st.DataObject) -> None:
    encoded = frames.encode_events(wires)
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(FrameDecodeError):
        kind, body = frames.decode_kind(encoded[:cut])
        frames.decode_events_body(body)


@given(st.binary(max_size=200))
def test_garbage_raises_only_decode_error(data: bytes) -> None:
    try:
        kind, body = frames.decode_kind(data)
        if kind is Kind.EVENTS:
            frames.decode_events_body(body)
        elif kind in (Kind.HEADS, Kind.HEADS_REQUEST):
            frames.decode_heads_body(body)
        elif kind is Kind.SNAPSHOT_REPLY:
            frames.decode_snapshot_reply(body)
        elif kind is Kind.EVENTS_REPLY:
            frames.decode_flagged_events(body)
        elif kind is Kind.ERROR_REPLY:
            frames.decode_error(body)
    except FrameDecodeError:
        pass


def test_wrong_version_rejected() -> None:
    encoded = bytearray(frames.encode_heads_request())
    encoded[2] = frames.FRAME_VERSION + 1
    with pytest.raises(FrameDecodeError, match="frame version"):
        frames.decode_kind(bytes(encoded))


def test_intersect_ranges_cases() -> None:
    assert intersect_ranges([(1, 5), (8, 10)], [(3, 9)]) == [(3, 5), (8, 9)]
    assert intersect_ranges([(1, 2)], [(3, 4)]) == []
    assert intersect_ranges([], [(1, 4)]) == []


@pytest.fixture
def served_store(tmp_path: Path) -> Iterator[LogStore]:
    identity = Identity.generate()
    store = LogStore(tmp_path / "events.db")
    acceptor = Acceptor(store)
    wires = [
        sign_event(identity, PeerHeartbeat(latest_seq=seq - 1), seq=seq, lamport=seq, time_ms=seq).wire
        for seq in range(1, 51)
    ]
    acceptor.accept_many(wires)
    yield store
    store.close()


def server_for(store: LogStore, allowed: bool = True) -> SyncServer:
    def heads() -> dict[str, int]:
        return {author: store.max_seq(author) for author in store.authors()}

    return SyncServer(store, 1024 * 1024, lambda peer: allowed, heads)


async def test_range_reply_truncated_at_max_events(served_store: LogStore) -> None:
    author = served_store.authors()[0]
    reply = await server_for(served_store).serve("peer", frames.encode_range_request([(author, 1, 50)], 20))
    kind, body = frames.decode_kind(reply)
    assert kind is Kind.EVENTS_REPLY
    events = frames.decode_flagged_events(body)
    assert len(events.events) == 20
    assert events.truncated


async def test_range_reply_complete(served_store: LogStore) -> None:
    author = served_store.authors()[0]
    reply = await server_for(served_store).serve("peer", frames.encode_range_request([(author, 41, 60)], 100))
    events = frames.decode_flagged_events(frames.decode_kind(reply)[1])
    assert len(events.events) == 10
    assert not events.truncated


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"nonsense",
        frames.encode_range_request([("author", 5, 2)], 10),
        frames.encode_range_request([("author", 0, 2)], 10),
        frames.encode_range_request([("author", 1, 2)] * 300, 10),
        frames.encode_range_request([("author", 1, 2)], 0),
        frames.encode_events([]),
    ],
    ids=["garbage", "first-above-last", "seq-zero", "too-many-ranges", "zero-max-events", "not-a-request"],
)
async def test_bad_request_gets_error(served_store: LogStore, request_bytes: bytes) -> None:
    reply = await server_for(served_store).serve("peer", request_bytes)
    kind, body = frames.decode_kind(reply)
    assert kind is Kind.ERROR_REPLY
    assert frames.decode_error(body).code is ErrorCode.BAD_REQUEST


async def test_outsider_gets_not_allowed(served_store: LogStore) -> None:
    reply = await server_for(served_store, allowed=False).serve("peer", frames.encode_heads_request())
    kind, body = frames.decode_kind(reply)
    assert kind is Kind.ERROR_REPLY
    assert frames.decode_error(body).code is ErrorCode.NOT_ALLOWED
