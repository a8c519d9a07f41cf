"""Event scopes: request-scoped records take their own sequence and stay out of anti-entropy.

A test type registered here with scope `request` stands for the data plane's records, so
these tests do not depend on `cortex.comm`. Everything runs on real SQLite files.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from events import (
    REQUEST_SCOPE,
    SWARM_SCOPE,
    Acceptor,
    EventError,
    EventWriter,
    Identity,
    LogStore,
    PeerHeartbeat,
    event_type,
    parse_event,
    request_reservation_key,
    scope_of,
    sign_event,
)
from events.model import SchemaError, skipped_after_equivocation
from events.writer import DEFERRED_FLUSH_DELAY_S


@event_type(version="1.0", family="scopetest", scope=REQUEST_SCOPE)
@dataclass(frozen=True, slots=True)
class ScopeTestRecord:
    """A request-scoped test record: one tensor digest of one request."""

    digest: str


REQUEST_ID = "ab" * 32


def _writer(store: LogStore, identity: Identity, boot: str = "boot-a") -> EventWriter:
    return EventWriter(identity, Acceptor(store, own_peer_id=identity.peer_id), boot_id=lambda: boot)


def test_scope_comes_from_the_registered_type() -> None:
    assert scope_of("ScopeTestRecord") == REQUEST_SCOPE
    assert scope_of("PeerHeartbeat") == SWARM_SCOPE
    assert scope_of("SomeTypeThisNodeDoesNotKnow") == SWARM_SCOPE
    with pytest.raises(SchemaError, match="scope 'route'"):
        event_type(version="1.0", family="scopetest", scope="route")


@pytest.mark.parametrize(
    ("type_name", "seq", "disputed", "skipped"),
    [
        ("PeerHeartbeat", 4, None, False),
        ("PeerHeartbeat", 4, 5, False),
        ("PeerHeartbeat", 5, 5, True),
        ("PeerHeartbeat", 9, 5, True),
        ("ScopeTestRecord", 1, None, False),
        ("ScopeTestRecord", 1, 5, True),
        ("ScopeTestRecord", 900, 5, True),
    ],
)
def test_equivocator_skip_rule_per_scope(type_name: str, seq: int, disputed: int | None, skipped: bool) -> None:
    assert skipped_after_equivocation(type_name, seq, disputed) is skipped


def test_records_take_their_own_sequence(store: LogStore, alice: Identity) -> None:
    writer = _writer(store, alice)
    first = writer.write(PeerHeartbeat(0))
    records = writer.write_many([ScopeTestRecord("1"), ScopeTestRecord("2")], refs=(REQUEST_ID,))
    second = writer.write(PeerHeartbeat(writer.last_seq))

    assert [first.seq, second.seq] == [1, 2]
    assert [record.seq for record in records] == [1, 2]
    # Lamport clocks are one sequence across scopes: the records sort between the heartbeats.
    assert [first.lamport, *(record.lamport for record in records), second.lamport] == [1, 2, 3, 4]
    assert (writer.last_seq, writer.last_request_seq) == (2, 2)
    assert store.max_seq(alice.peer_id) == 2
    assert store.max_seq(alice.peer_id, REQUEST_SCOPE) == 2
    assert store.missing_ranges(alice.peer_id) == []
    assert store.missing_ranges(alice.peer_id, up_to=2) == []
    # Anti-entropy serves swarm-scoped events only; iteration and ref queries see both.
    assert list(store.wires(author=alice.peer_id)) == [first.wire, second.wire]
    assert [event.id for event in store.events(ref=REQUEST_ID)] == [record.id for record in records]
    assert len(store) == 4
    # A join snapshot reads the swarm scope only.
    assert [event.id for event in store.events(scope=SWARM_SCOPE)] == [first.id, second.id]
    assert [event.id for event in store.events(scope=REQUEST_SCOPE)] == [record.id for record in records]
    assert store.equivocations() == []


def test_received_records_leave_swarm_heads_alone(store: LogStore, alice: Identity, bob: Identity) -> None:
    acceptor = Acceptor(store, own_peer_id=bob.peer_id)
    heartbeat = sign_event(alice, PeerHeartbeat(0), seq=1, lamport=1, time_ms=1)
    # Seq 1 and 5 of the request sequence: neither is a conflict with, or a gap after, swarm seq 1.
    record_1 = sign_event(alice, ScopeTestRecord("1"), seq=1, lamport=2, time_ms=1, refs=(REQUEST_ID,))
    record_5 = sign_event(alice, ScopeTestRecord("5"), seq=5, lamport=3, time_ms=1, refs=(REQUEST_ID,))

    result = acceptor.accept_many([heartbeat.wire, record_1.wire, record_5.wire])

    assert len(result.accepted) == 3
    assert result.equivocations == []
    assert store.max_seq(alice.peer_id) == 1
    assert store.max_seq(alice.peer_id, REQUEST_SCOPE) == 5
    assert store.missing_ranges(alice.peer_id) == []
    assert store.authors() == [alice.peer_id]
    assert acceptor.accept(record_1.wire) is None  # a duplicate record is recognized in its own scope
    assert [stored_id for stored_id, _wire in store.stored_at(alice.peer_id, 1, REQUEST_SCOPE)] == [record_1.id]


def test_request_seq_conflict_kept_not_recorded(store: LogStore, alice: Identity, bob: Identity) -> None:
    acceptor = Acceptor(store, own_peer_id=bob.peer_id)
    one = sign_event(alice, ScopeTestRecord("1"), seq=1, lamport=1, time_ms=1, refs=(REQUEST_ID,))
    other = sign_event(alice, ScopeTestRecord("other"), seq=1, lamport=2, time_ms=1, refs=(REQUEST_ID,))

    acceptor.accept_many([one.wire, other.wire])

    assert acceptor.counters["request_equivocations"] == 1
    assert store.equivocations() == []
    assert acceptor.excluded_authors == {}
    assert len(store.stored_at(alice.peer_id, 1, REQUEST_SCOPE)) == 2


def test_write_many_is_all_or_nothing(store: LogStore, alice: Identity) -> None:
    writer = _writer(store, alice)
    writer.write(PeerHeartbeat(0))

    def fail(events: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    real = writer.acceptor.accept_own_many
    writer.acceptor.accept_own_many = fail  # type: ignore[method-assign]
    with pytest.raises(sqlite3.OperationalError):
        writer.write_many([ScopeTestRecord("1"), PeerHeartbeat(1)], refs=(REQUEST_ID,))
    writer.acceptor.accept_own_many = real  # type: ignore[method-assign]

    assert (writer.last_seq, writer.last_request_seq) == (1, 0)
    events = writer.write_many([ScopeTestRecord("1"), PeerHeartbeat(1)], refs=(REQUEST_ID,))
    assert [(event.type, event.seq) for event in events] == [("ScopeTestRecord", 1), ("PeerHeartbeat", 2)]
    assert writer.write_many([]) == []


def test_request_sequence_resumes_above_reservation_after_unclean_stop(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "log.db"
    with LogStore(path) as store:
        writer = _writer(store, alice)
        writer.write_many([ScopeTestRecord("1"), ScopeTestRecord("2")], refs=(REQUEST_ID,))
        reserved = store.seq_reservation(request_reservation_key(alice.peer_id))
        assert reserved is not None
        assert reserved.seq_up_to > 2
        writer.close()
        assert store.seq_reservation(request_reservation_key(alice.peer_id)).seq_up_to == 2  # type: ignore[union-attr]

    # A clean stop: the next start continues the request sequence.
    with LogStore(path) as store:
        writer = _writer(store, alice)
        assert writer.write(ScopeTestRecord("3"), refs=(REQUEST_ID,)).seq == 3
        up_to = store.seq_reservation(request_reservation_key(alice.peer_id)).seq_up_to  # type: ignore[union-attr]
        # No close: an unclean stop.

    # Even in the same boot: deferred records may have been sent and not stored.
    with LogStore(path) as store:
        writer = _writer(store, alice)
        assert writer.write(ScopeTestRecord("4"), refs=(REQUEST_ID,)).seq == up_to + 1
        # The swarm sequence has no gap to declare: it had no events.
        assert writer.skipped is None
        assert store.missing_ranges(alice.peer_id) == []


async def test_deferred_records_are_appended_a_moment_later(store: LogStore, alice: Identity) -> None:
    writer = _writer(store, alice)
    records = writer.write_many([ScopeTestRecord("1"), ScopeTestRecord("2")], refs=(REQUEST_ID,), defer=True)
    assert [record.seq for record in records] == [1, 2]
    assert list(store.events(ref=REQUEST_ID)) == []
    await asyncio.sleep(0)
    assert list(store.events(ref=REQUEST_ID)) == []  # grouped: not yet, DEFERRED_FLUSH_DELAY_S later
    await asyncio.sleep(2 * DEFERRED_FLUSH_DELAY_S)
    assert [event.id for event in store.events(ref=REQUEST_ID)] == [record.id for record in records]

    deferred = writer.write(ScopeTestRecord("3"), refs=(REQUEST_ID,))  # not deferred: appended at once
    later = writer.write_many([ScopeTestRecord("4")], refs=(REQUEST_ID,), defer=True)[0]
    heartbeat = writer.write(PeerHeartbeat(0))  # a write that is not deferred appends the deferred ones first
    assert store.get(later.id) == later
    assert heartbeat.lamport > later.lamport > deferred.lamport
    with pytest.raises(EventError, match="only request-scoped"):
        writer.write_many([PeerHeartbeat(1)], defer=True)


async def test_close_appends_deferred_records(store: LogStore, alice: Identity) -> None:
    writer = _writer(store, alice)
    record = writer.write_many([ScopeTestRecord("1")], refs=(REQUEST_ID,), defer=True)[0]

    writer.close()  # before the loop ran the scheduled append

    assert store.get(record.id) == record
    await asyncio.sleep(2 * DEFERRED_FLUSH_DELAY_S)  # the scheduled append then finds nothing left to do
    assert len(list(store.events(ref=REQUEST_ID))) == 1


def test_store_opens_log_without_scope_column(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "old.db"
    with LogStore(path) as store:
        event = _writer(store, alice).write(PeerHeartbeat(0))
    # Rebuild the events table as the format before scopes had it.
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("DROP INDEX events_author_scope_seq")
        connection.execute("ALTER TABLE events DROP COLUMN scope")
        connection.execute("CREATE INDEX events_author_seq ON events (author, seq)")
    connection.close()

    with LogStore(path) as store:
        assert store.get(event.id) == event
        assert store.max_seq(alice.peer_id) == 1
        scopes = sqlite3.connect(path).execute("SELECT DISTINCT scope FROM events").fetchall()
        assert scopes == [(SWARM_SCOPE,)]


def test_decoded_records_are_still_verified(store: LogStore, alice: Identity, bob: Identity) -> None:
    acceptor = Acceptor(store, own_peer_id=bob.peer_id)
    good = sign_event(alice, ScopeTestRecord("1"), seq=1, lamport=1, time_ms=1, refs=(REQUEST_ID,))
    forged_wire = good.wire[:-64] + bytes(64)  # the same payload with a zeroed signature
    other = sign_event(alice, ScopeTestRecord("2"), seq=2, lamport=2, time_ms=1, refs=(REQUEST_ID,))
    forged = parse_event(other.wire[:-64] + bytes(64))

    result = acceptor.accept_decoded_later([parse_event(good.wire), forged])

    assert [event.id for event in result.accepted] == [good.id]
    assert [rejection.reason.value for _index, rejection in result.rejected] == ["bad_signature"]
    assert store.get(good.id) is None  # appended at the next flush
    acceptor.flush_deferred()
    assert store.get(good.id) == good
    # The stored payload again with a zeroed signature is no duplicate: it is rejected.
    again = acceptor.accept_decoded_later([parse_event(forged_wire)])
    assert [rejection.reason.value for _index, rejection in again.rejected] == ["bad_signature"]
