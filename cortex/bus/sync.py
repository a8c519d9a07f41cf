"""The sync protocol: a node requests the events it lacks from one peer.

Requests and replies travel over `Transport.request` (a libp2p stream
`/cortex/sync/1.0.0`, NATS request/reply, or a direct call in memory); their
encoding is in `cortex.bus.frames`.

* HEADS_REQUEST -> HEADS: the peer's highest stored seq per author.
* RANGE_REQUEST(ranges, max_events) -> EVENTS_REPLY: the stored events of each
  (author, first, last) range, in (author, seq) order. The reply holds at most
  `min(max_events, MAX_EVENTS_PER_REPLY)` events and at most the transport's
  reply size; when a limit cuts it short, `truncated` is set and the requester
  asks again for what is still missing. A range the peer holds only in part
  returns the part it holds.
* SNAPSHOT_REQUEST(max_events, after) -> SNAPSHOT_REPLY: the events a joining
  node needs under the retention policy (`cortex.bus.retention`), in (author,
  seq) order after the cursor `after`, with the peer's contiguous heads (the
  joiner's sync floors).
* Any request -> ERROR_REPLY(code, message) when it is malformed, exceeds
  `MAX_RANGES_PER_REQUEST`, or comes from a peer outside the allowlist. The
  requester raises SyncError with the code.

Requests are served one at a time on the node's event loop, because the log
store is one SQLite connection that only the loop's thread may use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cortex.bus import frames
from cortex.bus.errors import FrameDecodeError, SyncError
from cortex.bus.frames import ErrorCode, Kind
from cortex.bus.retention import live_events
from cortex.bus.transport import Transport
from events.model import SWARM_SCOPE
from events.store import LogStore

logger = logging.getLogger(__name__)

MAX_EVENTS_PER_REPLY = 2000
MAX_RANGES_PER_REQUEST = 256
MAX_REPLY_BYTES = 4 * 1024 * 1024

Range = tuple[str, int, int]


def contiguous_heads(store: LogStore) -> dict[str, int]:
    """Return, per author, the highest seq s such that the store contains every seq 1..s."""
    heads: dict[str, int] = {}
    for author in store.authors():
        gaps = store.missing_ranges(author)
        heads[author] = gaps[0][0] - 1 if gaps else store.max_seq(author)
    return heads


def intersect_ranges(first: list[tuple[int, int]], second: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return the seq ranges (inclusive) present in both sorted, disjoint lists."""
    result: list[tuple[int, int]] = []
    i = j = 0
    while i < len(first) and j < len(second):
        low = max(first[i][0], second[j][0])
        high = min(first[i][1], second[j][1])
        if low <= high:
            result.append((low, high))
        if first[i][1] < second[j][1]:
            i += 1
        else:
            j += 1
    return result


class SyncServer:
    """Serves sync requests from a node's log store."""

    def __init__(
        self,
        store: LogStore,
        reply_bytes: int,
        is_allowed: Callable[[str], bool],
        heads: Callable[[], dict[str, int]],
    ) -> None:
        self.store = store
        self.heads = heads
        self.reply_bytes = min(reply_bytes, MAX_REPLY_BYTES)
        self.is_allowed = is_allowed
        self.served = 0
        self.errors = 0

    async def serve(self, peer: str, data: bytes) -> bytes:
        if not self.is_allowed(peer):
            return self._error(peer, ErrorCode.NOT_ALLOWED, f"peer {peer} is not on this node's allowlist")
        try:
            reply = self._dispatch(data)
        except (FrameDecodeError, ValueError, TypeError, KeyError) as error:
            return self._error(peer, ErrorCode.BAD_REQUEST, str(error))
        self.served += 1
        return reply

    def _error(self, peer: str, code: ErrorCode, message: str) -> bytes:
        self.errors += 1
        logger.warning("sync request from %s refused (%s): %s", peer, code.value, message)
        return frames.encode_error(code, message)

    def _dispatch(self, data: bytes) -> bytes:
        kind, body = frames.decode_kind(data)
        if kind is Kind.HEADS_REQUEST:
            return frames.encode_heads(self.heads())
        if kind is Kind.RANGE_REQUEST:
            ranges, max_events = _parse_range_request(frames.decode_json(body))
            return self._serve_ranges(ranges, max_events)
        if kind is Kind.SNAPSHOT_REQUEST:
            fields = frames.decode_json(body)
            return self._serve_snapshot(_parse_max_events(fields), _parse_cursor(fields.get("after")))
        raise FrameDecodeError(f"message kind {kind.name} is not a sync request")

    def _serve_ranges(self, ranges: list[Range], max_events: int) -> bytes:
        wires: list[bytes] = []
        size = frames.EVENTS_OVERHEAD
        for author, first, last in ranges:
            for wire in self.store.wires(author=author, first_seq=first, last_seq=last):
                size += frames.encoded_event_size(wire)
                if len(wires) >= max_events or size > self.reply_bytes:
                    return frames.encode_events_reply(wires, truncated=True)
                wires.append(wire)
        return frames.encode_events_reply(wires, truncated=False)

    def _serve_snapshot(self, max_events: int, after: tuple[str, int] | None) -> bytes:
        # NOTE: each page re-reads and filters the whole log, so a joiner's snapshot costs
        # O(pages x log size) on the serving peer; fine for logs of tens of thousands of events.
        heads = contiguous_heads(self.store)
        # Request-scoped records stay on their request's route: a snapshot offers swarm events only.
        swarm_events = self.store.events(scope=SWARM_SCOPE)
        kept = [event for event in live_events(swarm_events) if event.seq <= heads.get(event.author, 0)]
        kept.sort(key=lambda event: (event.author, event.seq))
        wires: list[bytes] = []
        size = frames.EVENTS_OVERHEAD + 1024 + 80 * len(heads)
        for event in kept:
            if after is not None and (event.author, event.seq) <= after:
                continue
            size += frames.encoded_event_size(event.wire)
            if len(wires) >= max_events or size > self.reply_bytes:
                return frames.encode_snapshot_reply(heads, wires, truncated=True)
            wires.append(event.wire)
        return frames.encode_snapshot_reply(heads, wires, truncated=False)


def _parse_max_events(fields: Any) -> int:
    max_events = fields["max_events"]
    if type(max_events) is not int or max_events < 1:
        raise ValueError(f"max_events must be a positive int, got {max_events!r}")
    return min(max_events, MAX_EVENTS_PER_REPLY)


def _parse_cursor(after: Any) -> tuple[str, int] | None:
    if after is None:
        return None
    if not (isinstance(after, list) and len(after) == 2 and isinstance(after[0], str) and type(after[1]) is int):
        raise ValueError(f"after must be null or [author, seq], got {after!r}")
    return after[0], after[1]


def _parse_range_request(fields: Any) -> tuple[list[Range], int]:
    raw_ranges = fields["ranges"]
    if not isinstance(raw_ranges, list) or len(raw_ranges) > MAX_RANGES_PER_REQUEST:
        raise ValueError(f"ranges must be a list of at most {MAX_RANGES_PER_REQUEST} [author, first, last]")
    ranges: list[Range] = []
    for item in raw_ranges:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            raise ValueError(f"range {item!r} is not [author, first, last]")
        author, first, last = item
        if type(first) is not int or type(last) is not int or not 1 <= first <= last:
            raise ValueError(f"range {item!r} needs ints with 1 <= first <= last")
        ranges.append((author, first, last))
    return ranges, _parse_max_events(fields)


class SyncClient:
    """Sends sync requests to peers and decodes their replies."""

    def __init__(self, transport: Transport, timeout_s: float) -> None:
        self.transport = transport
        self.timeout_s = timeout_s

    async def _ask(self, peer: str, request: bytes, expected: Kind) -> memoryview:
        try:
            reply = await self.transport.request(peer, request, self.timeout_s)
        except TimeoutError:
            raise SyncError(peer, f"no reply within {self.timeout_s} s") from None
        except Exception as error:  # noqa: BLE001 - any transport failure is one failed sync
            raise SyncError(peer, f"request failed: {error!r}") from error
        try:
            kind, body = frames.decode_kind(reply)
            if kind is Kind.ERROR_REPLY:
                error_reply = frames.decode_error(body)
                raise SyncError(peer, f"{error_reply.code.value}: {error_reply.message}")
            if kind is not expected:
                raise SyncError(peer, f"expected a {expected.name} reply, got {kind.name}")
        except FrameDecodeError as error:
            raise SyncError(peer, f"invalid reply: {error}") from None
        return body

    async def heads(self, peer: str) -> dict[str, int]:
        body = await self._ask(peer, frames.encode_heads_request(), Kind.HEADS)
        try:
            return frames.decode_heads_body(body)
        except FrameDecodeError as error:
            raise SyncError(peer, f"invalid heads: {error}") from None

    async def ranges(self, peer: str, ranges: list[Range], max_events: int) -> frames.EventsReply:
        request = frames.encode_range_request(ranges[:MAX_RANGES_PER_REQUEST], max_events)
        body = await self._ask(peer, request, Kind.EVENTS_REPLY)
        try:
            return frames.decode_flagged_events(body)
        except FrameDecodeError as error:
            raise SyncError(peer, f"invalid events reply: {error}") from None

    async def snapshot(self, peer: str, max_events: int, after: tuple[str, int] | None) -> frames.SnapshotReply:
        body = await self._ask(peer, frames.encode_snapshot_request(max_events, after), Kind.SNAPSHOT_REPLY)
        try:
            return frames.decode_snapshot_reply(body)
        except FrameDecodeError as error:
            raise SyncError(peer, f"invalid snapshot reply: {error}") from None
