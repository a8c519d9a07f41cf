"""Acceptance path: check wire bytes, append them to the log, fold them into the views.

For each incoming event, in this order (cheap checks before the signature):

1. size, JSON, canonical form, envelope, version, author and body checks (`parse_event`);
2. duplicate: an id already stored with the same bytes is dropped silently and counted;
3. Ed25519 signature over the received payload;
4. an event signed with this node's own key that this node did not write is rejected
   (`own_identity_conflict`): another process is running with a copy of the key;
5. append to the log, in one transaction per batch (`accept_many`);
6. equivocation: a second, different event with an author and seq already stored is kept
   as evidence and recorded. From then on the views ignore that author's events from the
   disputed seq on, so they are refolded from the log once, when it is detected. Seqs
   count per scope (`events.model`): a request-scoped record with a seq taken by the
   author's swarm event is no conflict. Two request-scoped records with one author and
   seq are kept and counted (`request_equivocations`), but not recorded, because the views
   and the equivocation table are about the swarm sequence;
7. after the commit, fold each new event into every view. Events of unknown types (a newer
   minor version) are stored and passed to the views, whose dispatch skips them.

A rejected event raises EventRejected, changes neither the log nor the views, and counts
under its reason in `counters`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from events.codec import Event, parse_event, verify_event
from events.errors import EventRejected, RejectReason
from events.model import REQUEST_SCOPE, scope_of, skipped_after_equivocation
from events.store import Equivocation, LogStore
from events.views import Projection

logger = logging.getLogger(__name__)


@dataclass
class AcceptResult:
    """Outcome of `accept_many`: new events in input order, duplicates, rejections by input index."""

    accepted: list[Event] = field(default_factory=list)
    duplicates: int = 0
    rejected: list[tuple[int, EventRejected]] = field(default_factory=list)
    equivocations: list[Equivocation] = field(default_factory=list)


class Acceptor:
    """Owns a node's log store and views; every event, received or own, enters through it."""

    def __init__(
        self, store: LogStore, projections: Sequence[Projection[Any]] = (), own_peer_id: str | None = None
    ) -> None:
        self.store = store
        self.projections = list(projections)
        self.own_peer_id = own_peer_id
        self.counters: collections.Counter[str] = collections.Counter()
        self.lamport = store.max_lamport()
        self._excluded: dict[str, int] = {}
        self._deferred: list[tuple[Event, list[str]]] = []
        self._own_deferred: dict[str, Event] = {}  # by id, in signing order
        for equivocation in store.equivocations():
            self._exclude(equivocation.author, equivocation.seq)
        if self.projections:
            self.rebuild_views()

    @property
    def excluded_authors(self) -> dict[str, int]:
        """Authors caught equivocating, with the lowest disputed seq (views ignore from there on)."""
        return dict(self._excluded)

    def accept(self, wire: bytes) -> Event | None:
        """Accept one event; return it if it is new, None for a duplicate; raise EventRejected."""
        result = self.accept_many((wire,))
        if result.rejected:
            raise result.rejected[0][1]
        return result.accepted[0] if result.accepted else None

    def accept_many(self, wires: Iterable[bytes], *, defer: bool = False) -> AcceptResult:
        """Accept a batch in one log transaction; rejections are returned, not raised.

        With `defer` (request-scoped records on the data plane's hot path), every check runs
        now and `accepted` lists the events that passed. They are appended and folded at the
        next `flush_deferred`, which the data plane schedules for the next event loop
        iteration. A duplicate within the deferred ones is dropped then.
        """
        if defer:
            return self._accept_later(wires)
        result = AcceptResult()
        store = self.store
        with store.transaction():
            for event, earlier in self._checked(wires, result):
                self._insert(event, earlier, result)
        self.counters["accepted"] += len(result.accepted)
        self.counters["duplicates"] += result.duplicates
        self._apply_all(result)
        return result

    @property
    def deferred_count(self) -> int:
        """How many events wait for `flush_deferred`, own and received."""
        return len(self._deferred) + len(self._own_deferred)

    def defer_own(self, events: Sequence[Event]) -> None:
        """Hold events this node signed until `flush_deferred`, which appends them first.

        Until then, one of them arriving back (a node calling its own handler) is a
        duplicate, not a copy of this node's key in use elsewhere.
        """
        self._check_own(events)
        self._own_deferred.update((event.id, event) for event in events)

    def flush_deferred(self) -> None:
        """Append and fold the deferred events in one transaction: own ones (`defer_own`) first,
        then the received ones `accept_many(..., defer=True)` checked."""
        if not self._deferred and not self._own_deferred:
            return
        own, self._own_deferred = list(self._own_deferred.values()), {}
        checked, self._deferred = self._deferred, []
        own_result, result = AcceptResult(), AcceptResult()
        with self.store.transaction():
            self._insert_own(own, own_result)
            for event, earlier in checked:
                self._insert(event, earlier, result)
        self.counters["own"] += len(own)
        self.counters["accepted"] += len(result.accepted)
        self.counters["duplicates"] += result.duplicates
        own_result.accepted.extend(result.accepted)
        own_result.equivocations.extend(result.equivocations)
        self._apply_all(own_result)

    def accept_decoded_later(self, events: Sequence[Event]) -> AcceptResult:
        """`accept_many(..., defer=True)` for events that `parse_event` already decoded from received bytes.

        The data plane decodes each record to check its tensor before the signature. This
        skips a second parse. Every other check runs as in `accept_many`.
        """
        return self._accept_later(events)

    def _accept_later(self, wires: Iterable[bytes | Event]) -> AcceptResult:
        result = AcceptResult()
        for checked in self._checked(wires, result):
            self._deferred.append(checked)
            result.accepted.append(checked[0])
            # The clock rises now, not at the flush: a reply signed before then must sort
            # after the records it replies to.
            if checked[0].lamport > self.lamport:
                self.lamport = checked[0].lamport
        self.counters["duplicates"] += result.duplicates
        return result

    def _checked(self, wires: Iterable[bytes | Event], result: AcceptResult) -> Iterator[tuple[Event, list[str]]]:
        """Yield each new event with the ids stored at its (author, seq); count rejections and duplicates in `result`."""
        for index, wire in enumerate(wires):
            try:
                checked = self._check(wire)
            except EventRejected as rejection:
                self._count_rejection(rejection)
                result.rejected.append((index, rejection))
                continue
            if checked is None:
                result.duplicates += 1
                continue
            yield checked

    def accept_own(self, event: Event) -> None:
        """Append an event this node signed (synchronous=NORMAL) and fold it into the views.

        Only `EventWriter` calls this, before it publishes the event. The commit is not
        fsynced: the writer's fsynced seq reservation is what keeps seqs from being reused
        after power loss (see `events.writer`).
        """
        self.accept_own_many((event,))

    def accept_own_many(self, events: Sequence[Event]) -> None:
        """Append events this node signed in one transaction (see `accept_own`), then fold them."""
        self._check_own(events)
        result = AcceptResult()
        with self.store.transaction():
            self._insert_own(events, result)
        self.counters["own"] += len(events)
        self._apply_all(result)

    def _check_own(self, events: Sequence[Event]) -> None:
        for event in events:
            if event.author != self.own_peer_id:
                raise ValueError(f"accept_own got an event by {event.author}, but this node is {self.own_peer_id}")

    def _insert_own(self, events: Sequence[Event], result: AcceptResult) -> None:
        store = self.store
        for event in events:
            scope = scope_of(event.type)
            earlier = []
            if event.seq <= store.max_seq(event.author, scope):
                earlier = [stored_id for stored_id, _wire in store.stored_at(event.author, event.seq, scope)]
            self._insert(event, earlier, result)

    def rebuild_views(self) -> None:
        """Refold every view from the log, skipping what equivocating authors wrote since."""
        # NOTE: the whole log is read into memory once per rebuild (at start and on each new
        # equivocation). That is fine for logs of up to a few million events; beyond that, this
        # needs view snapshots.
        events = list(self.store.events())
        for projection in self.projections:
            projection.rebuild(events, self._excluded)

    def _check(self, received: bytes | Event) -> tuple[Event, list[str]] | None:
        """Return the checked event and the ids stored at its (author, seq), or None for a duplicate."""
        event = received if isinstance(received, Event) else parse_event(received)
        wire = event.wire
        earlier: list[str] = []
        scope = scope_of(event.type)
        if event.seq <= self.store.max_seq(event.author, scope):
            for stored_id, stored_wire in self.store.stored_at(event.author, event.seq, scope):
                if stored_id != event.id:
                    earlier.append(stored_id)
                    continue
                if stored_wire != wire:
                    # Same payload, other signature bytes: a duplicate if the signature is valid.
                    verify_event(event)
                return None
        pending = self._own_deferred.get(event.id)
        if pending is not None:
            # Signed here and waiting for `flush_deferred`: a duplicate, as if it were stored.
            if pending.wire != wire:
                verify_event(event)
            return None
        verify_event(event)
        if event.author == self.own_peer_id:
            logger.error(
                "rejected %s seq %d signed with this node's key but not written by it: "
                "another node is running with a copy of this key",
                event.type,
                event.seq,
            )
            raise EventRejected(
                RejectReason.OWN_IDENTITY_CONFLICT,
                f"{event.type} seq {event.seq} is signed with this node's key ({event.author}) but this node "
                "did not write it; stop the other node that uses a copy of this key directory",
            )
        return event, earlier

    def _insert(self, event: Event, earlier: list[str], result: AcceptResult) -> None:
        if not self.store.insert(event):
            result.duplicates += 1
            return
        result.accepted.append(event)
        if not event.is_known_type:
            self.counters["stored_unknown_type"] += 1
        if earlier and scope_of(event.type) == REQUEST_SCOPE:
            self.counters["request_equivocations"] += 1
            logger.warning(
                "%s signed two request-scoped records with seq %d (%s and %s); both kept",
                event.author,
                event.seq,
                earlier[0],
                event.id,
            )
            return
        for stored_id in earlier:
            equivocation = self.store.record_equivocation(event.author, event.seq, stored_id, event.id)
            result.equivocations.append(equivocation)
            self.counters["equivocations"] += 1
            logger.warning(
                "equivocation: %s signed two events with seq %d (%s and %s); both kept as evidence",
                event.author,
                event.seq,
                stored_id,
                event.id,
            )

    def _apply_all(self, result: AcceptResult) -> None:
        for event in result.accepted:
            if event.lamport > self.lamport:
                self.lamport = event.lamport
        newly_excluded = False
        for equivocation in result.equivocations:
            newly_excluded |= self._exclude(equivocation.author, equivocation.seq)
        if newly_excluded:
            self.rebuild_views()
            return
        for event in result.accepted:
            if self._excluded and self._is_excluded(event):
                continue
            for projection in self.projections:
                projection.apply(event)

    def _exclude(self, author: str, seq: int) -> bool:
        current = self._excluded.get(author)
        if current is not None and current <= seq:
            return False
        self._excluded[author] = seq
        return True

    def _is_excluded(self, event: Event) -> bool:
        return skipped_after_equivocation(event.type, event.seq, self._excluded.get(event.author))

    def _count_rejection(self, rejection: EventRejected) -> None:
        count = self.counters[rejection.reason.value] + 1
        self.counters[rejection.reason.value] = count
        # Log the 1st, 2nd, 4th, 8th, ... rejection per reason, so a flood cannot fill the log.
        level = logging.WARNING if count & (count - 1) == 0 else logging.DEBUG
        logger.log(level, "rejected event (%d so far for %s): %s", count, rejection.reason.value, rejection)
