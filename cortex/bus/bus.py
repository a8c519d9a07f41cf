"""GossipBus: publishes a node's signed events and brings every peer's events in.

Outgoing: the node's own events (already appended to its log by EventWriter)
are coalesced into EVENTS frames of at most `max_frame_bytes`. A frame is sent
when it is full, or at once if the previous frame left at least
`flush_delay_s` ago, else when that much time has passed since the previous one.

Incoming: each event of a frame passes admission (allowlist, per-author rate
limit) and then the event core's acceptance path on its own, so one forged
event does not spoil the others of its frame.

Repair (anti-entropy): every node gossips a HEADS frame (its highest seq per
author) each `heads_interval_s`. An author whose events have a gap, or whose
announced head is above what this node stores, is checked each
`repair_interval_s`. Ranges still missing on two checks in a row are not just
in flight, so they are fetched from peers with the sync protocol
(`cortex.bus.sync`), from the author itself first. At start the node syncs with one peer: all history
(`join_mode="full"`) or a snapshot of what the live views need
(`join_mode="live"`, see `cortex.bus.retention`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from cortex.bus import frames
from cortex.bus.admission import Admission
from cortex.bus.errors import FrameDecodeError, FrameTooLarge, SyncError, TransportClosed
from cortex.bus.frames import Kind
from cortex.bus.sync import MAX_EVENTS_PER_REPLY, Range, SyncClient, SyncServer, intersect_ranges
from cortex.bus.transport import Delivery, Subscription, Transport
from events.acceptance import AcceptResult, Acceptor
from events.codec import Event, parse_event
from events.errors import EventRejected
from events.membership import PeerHeartbeat

logger = logging.getLogger(__name__)

AUTHOR_PREFIX = b'{"author":"'
MAX_REPAIR_SKIPS = 10
MAX_FRAMES_PER_DRAIN = 64
Listener = Callable[[list[Event]], None]


@dataclass
class BusConfig:
    """Batching, repair, join and admission settings of a GossipBus."""

    topic: str = "events"
    max_frame_bytes: int = 256 * 1024
    """Frame size cap; kept well below the 1 MiB that libp2p and NATS carry."""
    flush_delay_s: float = 0.005
    heads_interval_s: float = 1.0
    repair_interval_s: float = 0.5
    sync_timeout_s: float = 10.0
    join_mode: str = "live"
    """"live": at start, fetch a retention-filtered snapshot of what the views need (see
    `cortex.bus.retention`); "full": fetch every author's whole history."""
    join_wait_s: float = 5.0
    """How long start() waits for a first peer before giving up on the join sync."""
    rate_per_s: float = 5000.0
    rate_burst: float = 20000.0
    allowlist: frozenset[str] | None = None
    state_path: Path | None = None
    """File that keeps the sync floors of a live join across restarts (JSON)."""

    def __post_init__(self) -> None:
        if self.join_mode not in ("full", "live"):
            raise ValueError(f"join_mode={self.join_mode!r}; use 'full' or 'live'")


def peek_author(wire: bytes) -> str | None:
    """Return the author of an event without decoding it, or None if the payload does not start with it.

    The codec requires canonical JSON with sorted keys, so `author` is the first key of every
    valid payload. The acceptance path checks the whole event afterwards.
    """
    if not wire.startswith(AUTHOR_PREFIX):
        return None
    end = wire.find(b'"', len(AUTHOR_PREFIX), len(AUTHOR_PREFIX) + 128)
    return wire[len(AUTHOR_PREFIX) : end].decode("ascii", "replace") if end > 0 else None


class GossipBus:
    """Gossip of signed events over one Transport, with batching, admission and repair."""

    def __init__(self, transport: Transport, acceptor: Acceptor, config: BusConfig | None = None) -> None:
        self.transport = transport
        self.acceptor = acceptor
        self.store = acceptor.store
        self.config = config or BusConfig()
        self.admission = Admission(self.config.rate_per_s, self.config.rate_burst, self.config.allowlist)
        self.counters: collections.Counter[str] = collections.Counter()
        self.rejected_by_sender: collections.Counter[str] = collections.Counter()
        self._listeners: list[Listener] = []
        self._pending: list[bytes] = []
        self._pending_bytes = frames.EVENTS_OVERHEAD
        self._has_pending = asyncio.Event()
        self._frame_full = asyncio.Event()
        self._known_heads: dict[str, int] = {}
        self._heads_by_peer: dict[str, dict[str, int]] = {}
        self._dirty: set[str] = set()
        self._last_missing: dict[str, list[tuple[int, int]]] = {}
        self._floors: dict[str, int] = self._load_floors()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscription: Subscription | None = None
        self._own_announced = 0
        self._last_frame_at = 0.0
        self._client = SyncClient(transport, self.config.sync_timeout_s)
        self._server: SyncServer | None = None
        self._random = random.Random()

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Start the transport, subscribe, join-sync with a peer and start the background tasks."""
        frame_limit = self.transport.max_frame_bytes
        if self.config.max_frame_bytes > frame_limit:
            raise FrameTooLarge(self.config.max_frame_bytes, frame_limit)
        own = self.acceptor.own_peer_id
        self._own_announced = self.store.max_seq(own) if own is not None else 0
        self._server = SyncServer(self.store, frame_limit, self.admission.is_allowed_peer, self.local_heads)
        self.transport.set_request_handler(self._server.serve)
        await self.transport.start()
        try:
            subscription = await self.transport.subscribe(self.config.topic)
            self._dirty.update(self.store.authors())
            self._subscription = subscription
            self._spawn(self._receive_loop(subscription), "receive")
            self._spawn(self._flush_loop(), "flush")
            await self._join()
        except BaseException:
            await self.stop()
            raise
        self._spawn(self._heads_loop(), "heads")
        self._spawn(self._repair_loop(), "repair")
        logger.info("bus started on %s as %s (join mode %s)", self.transport.name, self.transport.peer_id, self.config.join_mode)

    async def stop(self) -> None:
        """Flush pending events, cancel the background tasks and stop the transport."""
        if self._pending and self.transport.running:
            with contextlib.suppress(Exception):
                await self._send_pending()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.transport.stop()
        logger.info("bus stopped: %s", dict(self.counters))

    def _spawn(self, coroutine: collections.abc.Coroutine[object, object, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=f"bus-{name}")
        task.add_done_callback(_log_crash)
        self._tasks.append(task)

    # --- outgoing ---------------------------------------------------------------

    async def publish(self, event: Event | bytes) -> None:
        """Queue one of this node's own events (already in its log) for the next frame.

        Takes the Event that `EventWriter.write` returned, or its wire bytes.
        """
        if isinstance(event, bytes):
            event = parse_event(event)
        size = frames.encoded_event_size(event.wire)
        if frames.EVENTS_OVERHEAD + size > self.config.max_frame_bytes:
            raise FrameTooLarge(frames.EVENTS_OVERHEAD + size, self.config.max_frame_bytes)
        if self._pending_bytes + size > self.config.max_frame_bytes:
            await self._send_pending()
        self._pending.append(event.wire)
        self._pending_bytes += size
        self.counters["published_events"] += 1
        self._known_heads[event.author] = max(self._known_heads.get(event.author, 0), event.seq)
        if event.author == self.acceptor.own_peer_id:
            self._own_announced = max(self._own_announced, event.seq)
        self._has_pending.set()

    async def flush(self) -> None:
        """Send the pending events now instead of after the flush delay."""
        if self._pending:
            await self._send_pending()

    async def _send_pending(self) -> None:
        wires, self._pending = self._pending, []
        self._pending_bytes = frames.EVENTS_OVERHEAD
        self._has_pending.clear()
        try:
            await self.transport.publish(self.config.topic, frames.encode_events(wires))
        except Exception as error:  # noqa: BLE001 - the events are in the log; heads and repair resend them
            self.counters["publish_failures"] += 1
            logger.warning("publishing a frame of %d events failed, repair will deliver them: %r", len(wires), error)
            return
        self.counters["published_frames"] += 1

    async def _flush_loop(self) -> None:
        # Frames go out at most every flush_delay_s: at once when the previous frame is older,
        # so a lone event waits for nothing, and events that come faster share frames.
        loop = asyncio.get_running_loop()
        while True:
            await self._has_pending.wait()
            await asyncio.sleep(0)  # let the events queued in this loop iteration join
            wait = self._last_frame_at + self.config.flush_delay_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if self._pending:
                self._last_frame_at = loop.time()
                await self._send_pending()

    # --- incoming ---------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(events)` with each batch of newly accepted events from peers."""
        self._listeners.append(listener)

    async def _receive_loop(self, subscription: Subscription) -> None:
        while True:
            try:
                deliveries = [await subscription.get()]
            except TransportClosed:
                return
            # Drain what is already queued, so that its events share one accept_many transaction.
            while len(deliveries) < MAX_FRAMES_PER_DRAIN and (queued := subscription.get_nowait()) is not None:
                deliveries.append(queued)
            wires: list[bytes] = []
            sources: list[str] = []
            for delivery in deliveries:
                try:
                    events = self._on_frame(delivery)
                except FrameDecodeError as error:
                    self.counters["invalid_frames"] += 1
                    logger.warning("invalid frame from %s dropped: %s", delivery.sender, error)
                    continue
                wires.extend(events)
                sources.extend([delivery.sender] * len(events))
            if wires:
                self._ingest(wires, sources)
            await asyncio.sleep(0)

    def _on_frame(self, delivery: Delivery) -> list[bytes]:
        """Decode a gossip frame; return its events, after noting a HEADS frame (no events)."""
        self.counters["received_frames"] += 1
        kind, body = frames.decode_kind(delivery.data)
        if kind is Kind.EVENTS:
            return frames.decode_events_body(body)
        if kind is Kind.HEADS:
            self._note_heads(delivery.sender, frames.decode_heads_body(body))
            return []
        raise FrameDecodeError(f"gossip frame of kind {kind.name}; only EVENTS and HEADS are gossiped")

    def ingest(self, wires: list[bytes], source: str) -> AcceptResult:
        """Admit and accept events received from `source`; note gaps for repair."""
        return self._ingest(wires, [source] * len(wires))

    def _ingest(self, wires: list[bytes], sources: list[str]) -> AcceptResult:
        admitted: list[bytes] = []
        admitted_sources: list[str] = []
        before: dict[str, int] = {}
        admitted_by_author: collections.Counter[str] = collections.Counter()
        for wire, source in zip(wires, sources):
            author = peek_author(wire)
            if author is not None:
                if not self.admission.admit(author):
                    self.counters["throttled_events"] += 1
                    self._dirty.add(author)
                    continue
                admitted_by_author[author] += 1
                if author not in before:
                    before[author] = self.store.max_seq(author)
            admitted.append(wire)
            admitted_sources.append(source)

        started = time.perf_counter()
        result = self.acceptor.accept_many(admitted)
        logger.debug(
            "%d events from %d senders: %d accepted, %d duplicates in %.1f ms",
            len(wires), len(set(sources)), len(result.accepted), result.duplicates,
            (time.perf_counter() - started) * 1000,
        )
        self.counters["accepted_events"] += len(result.accepted)
        self.counters["duplicate_events"] += result.duplicates
        self.counters["rejected_events"] += len(result.rejected)
        for index, _rejection in result.rejected:
            self.rejected_by_sender[admitted_sources[index]] += 1

        self._note_accepted(result.accepted, before)
        for event in result.accepted:
            admitted_by_author[event.author] -= 1
        for author, unused in admitted_by_author.items():
            if unused > 0:
                self.admission.refund(author, unused)
        if result.accepted:
            for listener in self._listeners:
                listener(result.accepted)
        return result

    def _note_accepted(self, accepted: list[Event], before: dict[str, int]) -> None:
        seqs_by_author: dict[str, list[int]] = collections.defaultdict(list)
        for event in accepted:
            seqs_by_author[event.author].append(event.seq)
            if isinstance(event.body, PeerHeartbeat):
                self._raise_known_head(event.author, event.body.latest_seq)
        for author, seqs in seqs_by_author.items():
            self._raise_known_head(author, max(seqs))
            seqs.sort()
            expected_first = before.get(author, 0) + 1
            if seqs[0] != expected_first or seqs[-1] - seqs[0] != len(seqs) - 1:
                self._dirty.add(author)

    def _raise_known_head(self, author: str, seq: int) -> None:
        if seq > self._known_heads.get(author, 0):
            self._known_heads[author] = seq
            if seq > self.store.max_seq(author):
                self._dirty.add(author)

    def _note_heads(self, peer: str, heads: dict[str, int]) -> None:
        self._heads_by_peer[peer] = heads
        for author, seq in heads.items():
            self._raise_known_head(author, seq)

    # --- repair -----------------------------------------------------------------

    def local_heads(self) -> dict[str, int]:
        """Return the highest stored seq per author, for this node only up to what it published.

        Own events written but not yet handed to `publish` are not announced. Own events left
        unpublished by a crash are announced after the restart, so peers fetch them.
        """
        heads = {author: self.store.max_seq(author) for author in self.store.authors()}
        own = self.acceptor.own_peer_id
        if own is not None and own in heads:
            heads[own] = min(heads[own], self._own_announced)
        return heads

    async def _heads_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heads_interval_s * self._random.uniform(0.8, 1.2))
            heads = self.local_heads()
            if heads:
                try:
                    await self.transport.publish(self.config.topic, frames.encode_heads(heads))
                except Exception as error:  # noqa: BLE001 - the next interval tries again
                    logger.warning("publishing heads failed: %r", error)

    async def _repair_loop(self) -> None:
        skipped = 0
        while True:
            await asyncio.sleep(self.config.repair_interval_s)
            if not self._dirty:
                continue
            # Frames still queued may hold the missing events: wait for the backlog to clear,
            # but no longer than MAX_REPAIR_SKIPS intervals, so a busy node still repairs.
            backlog = self._subscription.pending if self._subscription is not None else 0
            if backlog and skipped < MAX_REPAIR_SKIPS:
                skipped += 1
                continue
            skipped = 0
            await self.repair(wait_for_persistence=True)

    def missing(self) -> dict[str, list[tuple[int, int]]]:
        """Return the seq ranges this node lacks per dirty author, above its sync floors."""
        result: dict[str, list[tuple[int, int]]] = {}
        for author in sorted(self._dirty):
            ranges = self._missing_of(author)
            if ranges:
                result[author] = ranges
        return result

    def _missing_of(self, author: str) -> list[tuple[int, int]]:
        """Return the seq ranges of a dirty author this node lacks. An author lacking none is clean again."""
        known = self._known_heads.get(author, 0)
        ranges = self.store.missing_ranges(author, up_to=known if known > self.store.max_seq(author) else None)
        floor = self._floors.get(author, 0)
        ranges = [(max(first, floor + 1), last) for first, last in ranges if last > floor]
        if not ranges:
            self._dirty.discard(author)
            self._last_missing.pop(author, None)
        return ranges

    def lacks_events_of(self, author: str) -> bool:
        """Return whether peers announced events by `author` that this node has not stored yet."""
        return author in self._dirty and bool(self._missing_of(author))

    async def repair(self, wait_for_persistence: bool = False) -> int:
        """Fetch missing events from peers; return how many were accepted.

        With `wait_for_persistence`, only ranges that were also missing at the previous
        call are fetched, so events still in flight are not requested twice.
        """
        missing = self.missing()
        wanted: list[Range] = []
        for author, ranges in missing.items():
            if wait_for_persistence:
                previous = self._last_missing.get(author, [])
                self._last_missing[author] = ranges
                ranges = intersect_ranges(ranges, previous)
            wanted.extend((author, first, last) for first, last in ranges)
        if not wanted:
            return 0
        self.counters["repair_rounds"] += 1
        return await self.fetch(wanted)

    def _peer_for(self, author: str, last: int, peers: list[str]) -> str | None:
        if author in peers:
            return author
        holders = [peer for peer in peers if self._heads_by_peer.get(peer, {}).get(author, 0) >= last]
        pool = holders or peers
        return self._random.choice(pool) if pool else None

    async def fetch(self, wanted: list[Range]) -> int:
        """Request these (author, first, last) ranges from peers and accept what comes back."""
        peers = [peer for peer in self.transport.peers() if self.admission.is_allowed_peer(peer)]
        by_peer: dict[str, list[Range]] = collections.defaultdict(list)
        for author, first, last in wanted:
            peer = self._peer_for(author, last, peers)
            if peer is not None:
                by_peer[peer].append((author, first, last))
        accepted = 0
        for peer, ranges in by_peer.items():
            try:
                reply = await self._client.ranges(peer, ranges, MAX_EVENTS_PER_REPLY)
            except SyncError as error:
                self.counters["sync_failures"] += 1
                logger.warning("%s", error)
                continue
            self.counters["repaired_events"] += len(reply.events)
            accepted += len(self.ingest(reply.events, peer).accepted)
            for author, _, _ in ranges:
                self._dirty.add(author)
        return accepted

    # --- join -------------------------------------------------------------------

    async def _wait_for_peers(self) -> list[str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.join_wait_s
        while loop.time() < deadline:
            peers = [peer for peer in self.transport.peers() if self.admission.is_allowed_peer(peer)]
            if peers:
                return peers
            await asyncio.sleep(0.05)
        return []

    async def _join(self) -> None:
        peers = await self._wait_for_peers()
        if not peers:
            logger.info("no peer within %s s; starting without a join sync", self.config.join_wait_s)
            return
        for peer in self._random.sample(peers, len(peers)):
            try:
                if self.config.join_mode == "live":
                    await self._join_snapshot(peer)
                else:
                    self._note_heads(peer, await self._client.heads(peer))
                    await self._drain_missing()
            except SyncError as error:
                logger.warning("join sync failed, trying another peer: %s", error)
                continue
            logger.info("joined: synced with %s, %d authors known", peer, len(self._known_heads))
            return

    async def _drain_missing(self, max_rounds: int = 1000) -> None:
        for _ in range(max_rounds):
            missing = self.missing()
            if not missing:
                return
            wanted = [(author, first, last) for author, ranges in missing.items() for first, last in ranges]
            if await self.fetch(wanted) == 0:
                return

    async def _join_snapshot(self, peer: str) -> None:
        after: tuple[str, int] | None = None
        while True:
            reply = await self._client.snapshot(peer, MAX_EVENTS_PER_REPLY, after)
            self.counters["snapshot_events"] += len(reply.events)
            self.ingest(reply.events, peer)
            if after is None:
                self._set_floors(reply.heads)
            if not reply.truncated or not reply.events:
                return
            # The cursor only orders the next page, so the unverified tail event is good enough.
            try:
                tail = parse_event(reply.events[-1])
            except EventRejected:
                return
            after = (tail.author, tail.seq)

    def _set_floors(self, heads: dict[str, int]) -> None:
        for author, seq in heads.items():
            self._floors[author] = max(self._floors.get(author, 0), seq)
            self._raise_known_head(author, seq)
        if self.config.state_path is not None:
            path = self.config.state_path
            temporary = path.with_suffix(".tmp")
            temporary.write_bytes(orjson.dumps({"floors": self._floors}))
            temporary.replace(path)

    def _load_floors(self) -> dict[str, int]:
        path = self.config.state_path
        if path is None or not path.exists():
            return {}
        floors: dict[str, int] = orjson.loads(path.read_bytes()).get("floors", {})
        return floors

    def stats(self) -> dict[str, object]:
        """Counters of the bus, admission and sync server, for logs and benches."""
        server = self._server
        return {
            **self.counters,
            "throttled_by_author": dict(self.admission.throttled),
            "rejected_by_sender": dict(self.rejected_by_sender),
            "sync_served": server.served if server else 0,
            "sync_errors": server.errors if server else 0,
        }


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("bus task %s failed: %r", task.get_name(), task.exception())
