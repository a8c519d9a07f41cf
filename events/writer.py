"""EventWriter: the only way a node creates its own events.

The writer picks the next sequence number and Lamport clock, signs, and appends the event to
the log before it returns the event for publishing, so every event that left the node was
committed to its log first. The rule it keeps: the node never signs two events with one seq,
which peers would record as equivocation, not even after a crash.

Own events are committed with `synchronous=NORMAL` (no fsync, see `events.store`). Such a
commit survives a process crash and SIGKILL, but power loss or an OS crash can drop the
last ones. An fsync per event (about 3 ms on a typical SSD) would dominate the data plane,
which signs a record per tensor call, so the writer fsyncs once per block instead:

- Before it signs a seq above its reservation, it stores a new reservation in a durable
  (fsynced) transaction: seqs up to `seq + SEQ_RESERVATION_BLOCK - 1` and Lamport clocks up
  to `lamport + LAMPORT_RESERVATION_BLOCK - 1`, with the current OS boot id. So every seq
  and Lamport clock it ever signed is covered by a reservation that is on disk.
- `close()` lowers the reservation to the last seq written, in a durable transaction that
  also makes every own event on disk.

At start the writer compares the log with the stored reservation:

- The log contains every reserved seq (`max stored seq >= seq_up_to`, so after `close()` or
  for a log written before reservations existed): it resumes at the next seq.
- The stop was unclean, but the OS has not rebooted since the reservation (the stored boot
  id equals the current one): every NORMAL commit is still in the OS page cache, so the log
  is complete and it resumes at the next seq. This is the SIGKILL, OOM kill and crash case.
- Otherwise (another boot, or an OS without a boot id), events with seqs between the max
  stored seq and `seq_up_to` may have been published and then lost with the power. The
  writer voids that range: it resumes at `seq_up_to + 1` with a Lamport clock above
  `lamport_up_to`, so it sorts after anything it may have published, and its first event
  is `SequenceSkipped(first, last)`, which `LogStore.missing_ranges` honours. Peers that
  hold events from that range keep them, and peers that lack them stop asking.

Request-scoped records (`events.model`, scope `request`) take their seqs from a second
sequence of the same author, with its own reservation (`request_reservation_key`) kept the
same way. After an unclean stop in another boot the writer resumes that sequence above its
reservation, without a `SequenceSkipped`: gaps in it are never looked for. Lamport clocks are one
sequence for both scopes. `write_many` signs several events and appends them in one
transaction, which is what the data plane uses for the records of one message.

Deferred appends: `write_many(..., defer=True)` signs request-scoped records and returns
them at once, and appends them a moment later (`flush`, about DEFERRED_FLUSH_DELAY_S
after the first one waits, an event loop timer), in one transaction with the acceptor's deferred received
records, so the data plane sends a tensor without waiting for an SQLite commit and a group
of records shares one commit. A record can then leave the node before it is in the log,
and a kill can lose it from the log (the records of about the last 25 ms). So the request sequence never resumes below its reservation after an unclean
stop, in any boot: the start finds `seq_up_to` above the stored records and resumes above
it, with a Lamport clock above the stored reservation. Any write that is not deferred,
`flush` and `close` append the deferred records first.

NOTE: the boot-id check assumes the log is on a local file system. On a network file
system, a server crash can lose unsynced writes while the client's boot id stays the same.
"""

from __future__ import annotations

import dataclasses
import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from events.acceptance import Acceptor
from events.codec import MAX_INT, Event, sign_event
from events.errors import EventError, LogStoreError
from events.identity import Identity
from events.membership import SequenceSkipped
from events.model import REQUEST_SCOPE, type_of
from events.store import SeqReservation, request_reservation_key

logger = logging.getLogger(__name__)

# One fsync per 1024 own events costs under 3 us per event if an fsync takes 3 ms (an estimate
# for a physical disk), small next to signing. After power loss at most 1023 unused seqs are voided, nothing next to 2**63.
SEQ_RESERVATION_BLOCK = 1024
# The Lamport clock also rises with every peer event received, so its block is larger: at
# 10,000 events/s across the swarm this is one fsync every 6.5 s. After power loss the clock
# jumps ahead by at most this much, which only orders the node's next events later.
LAMPORT_RESERVATION_BLOCK = 65_536
# Deferred records are committed in groups: one transaction per this delay, or sooner once
# this many wait. A commit writes every index page a record touches, so a group of a few
# tokens' records costs little more than one record (docs/dataplane.md, "Records on the hot path").
DEFERRED_FLUSH_DELAY_S = 0.025
DEFERRED_FLUSH_MAX_RECORDS = 512

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def wall_clock_ms() -> int:
    """Return the wall clock in integer milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def current_boot_id() -> str | None:
    """Return the Linux kernel's random id of the current boot, or None where there is none.

    The id changes at every boot, so an equal id proves that no power loss or OS crash
    happened in between. In a container it is the host kernel's id.
    """
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as file:
            return file.read().strip() or None
    except OSError:
        return None


class EventWriter:
    """Signs, appends and returns this node's own events with fresh seq and Lamport values.

    If the start finds that seqs may have been lost to power loss, the constructor writes a
    `SequenceSkipped` event and keeps it in `skipped` for the caller to publish. Peers also
    fetch it through anti-entropy, because it raises the node's head.
    """

    def __init__(
        self,
        identity: Identity,
        acceptor: Acceptor,
        clock_ms: Callable[[], int] = wall_clock_ms,
        boot_id: Callable[[], str | None] = current_boot_id,
    ) -> None:
        if acceptor.own_peer_id != identity.peer_id:
            raise EventError(
                f"the acceptor's own_peer_id is {acceptor.own_peer_id}, but the writer's identity is "
                f"{identity.peer_id}; build the Acceptor with own_peer_id=identity.peer_id"
            )
        self.identity = identity
        self.acceptor = acceptor
        self._clock_ms = clock_ms
        self._boot_id = boot_id()
        store = acceptor.store
        self._last_seq = store.max_seq(identity.peer_id)
        reservation = store.seq_reservation(identity.peer_id) or SeqReservation(0, 0, None)
        self._reservation = reservation
        self._lamport_floor = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._last_lamport = 0
        self._request_key = request_reservation_key(identity.peer_id)
        self._last_request_seq = store.max_seq(identity.peer_id, REQUEST_SCOPE)
        self._request_reservation = store.seq_reservation(self._request_key) or SeqReservation(0, 0, None)
        self.skipped: Event | None = None
        if reservation.seq_up_to > self._last_seq and not self._same_boot(reservation):
            self.skipped = self._void_reserved_range(reservation)
        elif self._last_seq:
            logger.info("event writer for %s resumes after seq %d", identity.peer_id, self._last_seq)
        request_reserved = self._request_reservation.seq_up_to
        if request_reserved > self._last_request_seq:
            # Deferred records may have been sent and never stored, in this boot or another one.
            logger.warning(
                "event writer for %s stopped uncleanly: its request sequence resumes after "
                "the reserved seq %d, not after the stored seq %d",
                identity.peer_id,
                request_reserved,
                self._last_request_seq,
            )
            self._last_request_seq = request_reserved
            self._lamport_floor = max(self._lamport_floor, reservation.lamport_up_to)

    @property
    def last_seq(self) -> int:
        """The seq of the last event this node wrote, 0 if none."""
        return self._last_seq

    @property
    def last_request_seq(self) -> int:
        """The seq of the last request-scoped record this node wrote, 0 if none."""
        return self._last_request_seq

    @property
    def reservation(self) -> SeqReservation:
        """The seqs and Lamport clocks this writer may sign before its next fsync."""
        return self._reservation

    def write(self, body: Any, refs: tuple[str, ...] = ()) -> Event:
        """Sign `body` as this node's next event, append it and fold it into the views.

        Returns the event; publish `event.wire` only after this returns. If signing or the
        append fails, the seq is not used, and the next call signs a new event with that seq.
        A request-scoped body takes the next seq of the request sequence.
        """
        return self.write_many((body,), refs)[0]

    def write_many(self, bodies: Sequence[Any], refs: tuple[str, ...] = (), *, defer: bool = False) -> list[Event]:
        """Sign `bodies` in order, all with `refs`, and append them in one transaction.

        Each body takes the next seq of its scope's sequence and the next Lamport clock. If
        anything fails, none of the seqs is used. Returns the events in the order given.
        With `defer`, which only request-scoped bodies may use, the append happens at the
        next `flush` (scheduled on the running event loop; see the module docstring).
        """
        if not bodies:
            return []
        scopes = [type_of(body).scope == REQUEST_SCOPE for body in bodies]
        if defer and not all(scopes):
            raise EventError("only request-scoped records can be appended later; write swarm events with defer=False")
        if not defer:
            self.flush()
        requests = sum(scopes)
        last_seq, last_request_seq = self._last_seq + len(bodies) - requests, self._last_request_seq + requests
        lamport = max(self.acceptor.lamport, self._lamport_floor, self._last_lamport)
        # NOTE: a valid peer can sign an event with a Lamport clock near 2**63 and so exhaust
        # every node's clock. Bounding the jump a peer may make is left to the admission policy.
        if lamport + len(bodies) > MAX_INT:
            raise EventError(f"the Lamport clock reached the limit of {MAX_INT}; this log cannot grow further")
        if last_seq > self._reservation.seq_up_to or lamport + len(bodies) > self._reservation.lamport_up_to:
            self._reserve(last_seq, lamport + len(bodies))
        if last_request_seq > self._request_reservation.seq_up_to:
            self._reserve_requests(last_request_seq)
        time_ms = self._clock_ms()
        events: list[Event] = []
        seq, request_seq = self._last_seq, self._last_request_seq
        for body, is_request in zip(bodies, scopes):
            lamport += 1
            if is_request:
                request_seq += 1
            else:
                seq += 1
            number = request_seq if is_request else seq
            events.append(sign_event(self.identity, body, seq=number, lamport=lamport, time_ms=time_ms, refs=refs))
        if defer:
            self.acceptor.defer_own(events)
            self._schedule_flush()
        else:
            self.acceptor.accept_own_many(events)
        self._last_seq, self._last_request_seq, self._last_lamport = seq, request_seq, lamport
        if logger.isEnabledFor(logging.DEBUG):
            for event in events:
                logger.debug("wrote %s seq %d lamport %d id %s", event.type, event.seq, event.lamport, event.id)
        return events

    def flush(self) -> None:
        """Append the deferred records and the acceptor's deferred ones in one transaction."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self.acceptor.flush_deferred()

    def _schedule_flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self.acceptor.deferred_count >= DEFERRED_FLUSH_MAX_RECORDS:
            self._flush_soon()
        elif self._flush_handle is None or self._flush_loop is not loop:
            # A handle of another loop (one that has ended) would never run.
            self._flush_handle = loop.call_later(DEFERRED_FLUSH_DELAY_S, self._flush_soon)
            self._flush_loop = loop

    def _flush_soon(self) -> None:
        try:
            self.flush()
        except (LogStoreError, sqlite3.Error):
            # The records were sent; the reservation keeps their seqs from being signed again.
            logger.exception("could not append deferred records of %s to the log", self.identity.peer_id)

    def close(self) -> None:
        """Release the reserved seqs not yet used, so the next start resumes at `last_seq + 1`.

        The release is a durable transaction, so it also puts every own event on disk. A
        failed release is logged, not raised: the reservation then stays, and the next start
        in another boot voids the unused seqs, which is safe. A `write` after `close` reserves
        a new block.
        """
        try:
            self.flush()
        except (LogStoreError, sqlite3.Error):
            logger.exception("could not append deferred records of %s to the log at close", self.identity.peer_id)
        request = self._request_reservation
        if request.seq_up_to > self._last_request_seq:
            released_requests = SeqReservation(self._last_request_seq, request.lamport_up_to, self._boot_id)
            try:
                self.acceptor.store.reserve_seqs(self._request_key, released_requests)
                self._request_reservation = released_requests
            except (LogStoreError, sqlite3.Error) as error:
                logger.warning("could not release the request seqs of %s: %r", self.identity.peer_id, error)
        current = self._reservation
        if current.seq_up_to <= self._last_seq:
            return
        released = SeqReservation(self._last_seq, current.lamport_up_to, self._boot_id)
        try:
            self.acceptor.store.reserve_seqs(self.identity.peer_id, released)
        except (LogStoreError, sqlite3.Error) as error:
            logger.warning(
                "could not release seqs %d to %d of %s; a start after a reboot will declare them skipped: %r",
                self._last_seq + 1,
                current.seq_up_to,
                self.identity.peer_id,
                error,
            )
            return
        self._reservation = released
        logger.info("event writer for %s closed at seq %d", self.identity.peer_id, self._last_seq)

    def _same_boot(self, reservation: SeqReservation) -> bool:
        return self._boot_id is not None and reservation.boot_id == self._boot_id

    def _reserve(self, seq: int, lamport: int) -> None:
        """Store a reservation that covers `seq` and `lamport` durably, before either is signed."""
        current = self._reservation
        reservation = SeqReservation(
            max(current.seq_up_to, min(seq + SEQ_RESERVATION_BLOCK - 1, MAX_INT)),
            max(current.lamport_up_to, min(lamport + LAMPORT_RESERVATION_BLOCK - 1, MAX_INT)),
            self._boot_id,
        )
        self._store_reservation(reservation)
        logger.debug(
            "reserved seqs up to %d and Lamport clocks up to %d for %s",
            reservation.seq_up_to,
            reservation.lamport_up_to,
            self.identity.peer_id,
        )

    def _reserve_requests(self, seq: int) -> None:
        """Store a reservation of the request sequence that covers `seq`, durably, before it is signed."""
        up_to = max(self._request_reservation.seq_up_to, min(seq + SEQ_RESERVATION_BLOCK - 1, MAX_INT))
        reservation = SeqReservation(up_to, 0, self._boot_id)
        self.acceptor.store.reserve_seqs(self._request_key, reservation)
        self._request_reservation = reservation

    def _store_reservation(self, reservation: SeqReservation) -> None:
        self.acceptor.store.reserve_seqs(self.identity.peer_id, reservation)
        self._reservation = reservation

    def _void_reserved_range(self, reservation: SeqReservation) -> Event:
        """Resume above a reservation that may cover lost, published events, and declare the range void."""
        first, last = self._last_seq + 1, reservation.seq_up_to
        logger.warning(
            "event writer for %s stopped uncleanly in an earlier OS boot (reserved in boot %s, now %s): "
            "seqs %d to %d may have been published and lost, so they are declared skipped and never reused",
            self.identity.peer_id,
            reservation.boot_id,
            self._boot_id,
            first,
            last,
        )
        self._last_seq = last
        self._lamport_floor = reservation.lamport_up_to
        # Reserve without a boot id until the SequenceSkipped is stored: a reservation that
        # named this boot would let a restart in this boot resume contiguously, and so reuse
        # the voided seqs, if this process died before the event was committed.
        boot_id, self._boot_id = self._boot_id, None
        try:
            event = self.write(SequenceSkipped(first=first, last=last))
        finally:
            self._boot_id = boot_id
        self._store_reservation(dataclasses.replace(self._reservation, boot_id=boot_id))
        return event
