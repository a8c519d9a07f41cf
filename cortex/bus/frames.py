"""Wire format of gossip frames and sync messages (codec only, no I/O).

Every message starts with a 4-byte header:

    magic  b"CX"   2 bytes
    version  1     1 byte (FRAME_VERSION)
    kind           1 byte (one of `Kind`)

followed by a body that depends on the kind:

    EVENTS          count u32, then count times (length u32, event wire bytes)
    HEADS           JSON object {author peer id: highest seq held}
    HEADS_REQUEST   empty
    RANGE_REQUEST   JSON {"ranges": [[author, first seq, last seq], ...], "max_events": n}
    EVENTS_REPLY    flags u8 (bit 0: truncated), then an EVENTS body
    SNAPSHOT_REQUEST JSON {"max_events": n, "after": [author, seq] or null}
    SNAPSHOT_REPLY  flags u8 (bit 0: truncated), heads length u32, heads JSON, then an EVENTS body
    ERROR_REPLY     JSON {"code": ErrorCode value, "message": text}

Integers are big-endian. EVENTS and HEADS travel as gossip frames on the bus
topic; the other kinds are requests and replies of the sync protocol
(`Transport.request`). An event inside a frame is the exact wire bytes its
author signed, checked on its own by the receiver's acceptance path.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from cortex.bus.errors import FrameDecodeError

MAGIC = b"CX"
FRAME_VERSION = 1
HEADER = struct.Struct(">2sBB")
COUNT = struct.Struct(">I")
LENGTH = struct.Struct(">I")
FLAG_TRUNCATED = 0x01
MAX_EVENTS_PER_FRAME = 65_535


class Kind(enum.IntEnum):
    EVENTS = 1
    HEADS = 2
    HEADS_REQUEST = 3
    RANGE_REQUEST = 4
    EVENTS_REPLY = 5
    SNAPSHOT_REQUEST = 6
    SNAPSHOT_REPLY = 7
    ERROR_REPLY = 8


class ErrorCode(enum.Enum):
    """Errors a peer returns to a sync request instead of events."""

    BAD_REQUEST = "bad_request"
    """The request did not decode, or a range or limit is out of bounds."""
    NOT_ALLOWED = "not_allowed"
    """The requester is not on this node's allowlist."""


@dataclass(frozen=True)
class EventsReply:
    events: list[bytes]
    truncated: bool


@dataclass(frozen=True)
class SnapshotReply:
    heads: dict[str, int]
    events: list[bytes]
    truncated: bool


@dataclass(frozen=True)
class ErrorReply:
    code: ErrorCode
    message: str


def encoded_event_size(wire: bytes) -> int:
    """Bytes that one event adds to an EVENTS body."""
    return LENGTH.size + len(wire)


EVENTS_OVERHEAD = HEADER.size + COUNT.size + 1


def _header(kind: Kind) -> bytes:
    return HEADER.pack(MAGIC, FRAME_VERSION, kind)


def _events_body(wires: Sequence[bytes]) -> bytes:
    if len(wires) > MAX_EVENTS_PER_FRAME:
        raise ValueError(f"{len(wires)} events exceed the limit of {MAX_EVENTS_PER_FRAME} per frame")
    parts = [COUNT.pack(len(wires))]
    for wire in wires:
        parts.append(LENGTH.pack(len(wire)))
        parts.append(wire)
    return b"".join(parts)


def encode_events(wires: Sequence[bytes]) -> bytes:
    return _header(Kind.EVENTS) + _events_body(wires)


def encode_heads(heads: dict[str, int]) -> bytes:
    return _header(Kind.HEADS) + orjson.dumps(heads, option=orjson.OPT_SORT_KEYS)


def encode_heads_request() -> bytes:
    return _header(Kind.HEADS_REQUEST)


def encode_range_request(ranges: Iterable[tuple[str, int, int]], max_events: int) -> bytes:
    body = {"ranges": [list(item) for item in ranges], "max_events": max_events}
    return _header(Kind.RANGE_REQUEST) + orjson.dumps(body)


def encode_events_reply(wires: Sequence[bytes], truncated: bool) -> bytes:
    flags = FLAG_TRUNCATED if truncated else 0
    return _header(Kind.EVENTS_REPLY) + bytes([flags]) + _events_body(wires)


def encode_snapshot_request(max_events: int, after: tuple[str, int] | None) -> bytes:
    body = {"max_events": max_events, "after": list(after) if after is not None else None}
    return _header(Kind.SNAPSHOT_REQUEST) + orjson.dumps(body)


def encode_snapshot_reply(heads: dict[str, int], wires: Sequence[bytes], truncated: bool) -> bytes:
    flags = FLAG_TRUNCATED if truncated else 0
    heads_json = orjson.dumps(heads, option=orjson.OPT_SORT_KEYS)
    return _header(Kind.SNAPSHOT_REPLY) + bytes([flags]) + LENGTH.pack(len(heads_json)) + heads_json + _events_body(wires)


def encode_error(code: ErrorCode, message: str) -> bytes:
    return _header(Kind.ERROR_REPLY) + orjson.dumps({"code": code.value, "message": message})


def decode_kind(data: bytes) -> tuple[Kind, memoryview]:
    """Check the header; return the kind and a view of the body."""
    if len(data) < HEADER.size:
        raise FrameDecodeError(f"message of {len(data)} bytes is shorter than the {HEADER.size}-byte header")
    magic, version, kind = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FrameDecodeError(f"message starts with {magic!r}, expected {MAGIC!r}; the peer does not speak the bus protocol")
    if version != FRAME_VERSION:
        raise FrameDecodeError(f"frame version {version} is not supported (this node speaks {FRAME_VERSION}); upgrade the older node")
    try:
        return Kind(kind), memoryview(data)[HEADER.size :]
    except ValueError:
        raise FrameDecodeError(f"unknown message kind {kind}") from None


def decode_events_body(body: memoryview) -> list[bytes]:
    if len(body) < COUNT.size:
        raise FrameDecodeError("events body is missing its count")
    (count,) = COUNT.unpack_from(body)
    offset = COUNT.size
    wires: list[bytes] = []
    for index in range(count):
        if offset + LENGTH.size > len(body):
            raise FrameDecodeError(f"events body ends before event {index} of {count}")
        (length,) = LENGTH.unpack_from(body, offset)
        offset += LENGTH.size
        if offset + length > len(body):
            raise FrameDecodeError(f"event {index} claims {length} bytes but only {len(body) - offset} remain")
        wires.append(bytes(body[offset : offset + length]))
        offset += length
    if offset != len(body):
        raise FrameDecodeError(f"{len(body) - offset} trailing bytes after {count} events")
    return wires


def decode_json(body: memoryview) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise FrameDecodeError(f"invalid JSON body: {error}") from None


def decode_heads_body(body: memoryview) -> dict[str, int]:
    heads = decode_json(body)
    if not isinstance(heads, dict) or not all(
        isinstance(author, str) and type(seq) is int and seq >= 0 for author, seq in heads.items()
    ):
        raise FrameDecodeError("heads must be a JSON object of author to non-negative int")
    return heads


def decode_flagged_events(body: memoryview) -> EventsReply:
    if len(body) < 1:
        raise FrameDecodeError("events reply is missing its flags byte")
    return EventsReply(events=decode_events_body(body[1:]), truncated=bool(body[0] & FLAG_TRUNCATED))


def decode_snapshot_reply(body: memoryview) -> SnapshotReply:
    if len(body) < 1 + LENGTH.size:
        raise FrameDecodeError("snapshot reply is shorter than its flags and heads length")
    (heads_length,) = LENGTH.unpack_from(body, 1)
    heads_end = 1 + LENGTH.size + heads_length
    if heads_end > len(body):
        raise FrameDecodeError(f"snapshot heads claim {heads_length} bytes but the reply is shorter")
    heads = decode_heads_body(body[1 + LENGTH.size : heads_end])
    events = decode_events_body(body[heads_end:])
    return SnapshotReply(heads=heads, events=events, truncated=bool(body[0] & FLAG_TRUNCATED))


def decode_error(body: memoryview) -> ErrorReply:
    fields = decode_json(body)
    try:
        return ErrorReply(code=ErrorCode(fields["code"]), message=str(fields["message"]))
    except (KeyError, TypeError, ValueError):
        raise FrameDecodeError(f"invalid error reply {fields!r}") from None
