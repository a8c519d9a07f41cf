"""Log store: idempotent append, canonical order, queries, gaps, reopening, durability settings."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events import (
    Event,
    Identity,
    LogStore,
    LogStoreError,
    PeerHeartbeat,
    PeerLeft,
    SeqReservation,
    SequenceSkipped,
    ShardClaimed,
    sign_event,
)

AUTHORS = [Identity.generate() for _ in range(3)]


def heartbeat(identity: Identity, seq: int, lamport: int | None = None, time_ms: int = 0, refs: tuple[str, ...] = ()) -> Event:
    return sign_event(identity, PeerHeartbeat(seq - 1), seq=seq, lamport=lamport or seq, time_ms=time_ms, refs=refs)


def test_store_uses_wal(store: LogStore) -> None:
    assert store.settings == {
        "journal_mode": "wal",
        "synchronous_peer_events": "NORMAL",
        "synchronous_own_events": "NORMAL",
        "synchronous_seq_reservations": "FULL",
    }


def test_append_is_idempotent(store: LogStore, alice: Identity) -> None:
    event = heartbeat(alice, 1)

    assert store.append(event)
    assert not store.append(event)
    assert len(store) == 1
    assert store.get(event.id) == event


def test_get_missing_returns_none(store: LogStore) -> None:
    assert store.get("00" * 32) is None
    assert "00" * 32 not in store


@settings(max_examples=25, deadline=None)
@given(lamports=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=12), data=st.data())
def test_iteration_in_canonical_order(tmp_path_factory: pytest.TempPathFactory, lamports: list[int], data: st.DataObject) -> None:
    events = []
    next_seq = {identity.peer_id: 1 for identity in AUTHORS}
    for lamport in lamports:
        identity = data.draw(st.sampled_from(AUTHORS))
        events.append(heartbeat(identity, next_seq[identity.peer_id], lamport=lamport))
        next_seq[identity.peer_id] += 1
    shuffled = data.draw(st.permutations(events))

    with LogStore(tmp_path_factory.mktemp("order") / "log.db") as store:
        with store.transaction():
            for event in shuffled:
                store.insert(event)
        stored = list(store.events())

    assert stored == sorted(events, key=lambda event: (event.lamport, event.author, event.seq))


def test_queries_by_type_author_ref_and_time(store: LogStore, alice: Identity, bob: Identity) -> None:
    request = heartbeat(alice, 1, time_ms=100)
    first = sign_event(bob, ShardClaimed("m", "head", 1), seq=1, lamport=2, time_ms=200, refs=(request.id,))
    second = sign_event(alice, PeerLeft(), seq=2, lamport=3, time_ms=300, refs=(request.id, "ab" * 32))
    unrelated = heartbeat(bob, 2, lamport=4, time_ms=400)
    for event in (request, first, second, unrelated):
        store.append(event)

    assert [e.id for e in store.events(type="PeerHeartbeat")] == [request.id, unrelated.id]
    assert [e.id for e in store.events(author=bob.peer_id)] == [first.id, unrelated.id]
    assert [e.id for e in store.events(ref=request.id)] == [first.id, second.id]
    assert [e.id for e in store.events(ref="ab" * 32)] == [second.id]
    assert [e.id for e in store.events(since_ms=200, until_ms=400)] == [first.id, second.id]
    assert [e.id for e in store.events(author=alice.peer_id, ref=request.id)] == [second.id]
    assert list(store.events(type="ShardLoaded")) == []


def test_missing_ranges(store: LogStore, alice: Identity, bob: Identity) -> None:
    for seq in (2, 3, 6, 9):
        store.append(heartbeat(alice, seq))

    assert store.missing_ranges(alice.peer_id) == [(1, 1), (4, 5), (7, 8)]
    assert store.missing_ranges(alice.peer_id, up_to=12) == [(1, 1), (4, 5), (7, 8), (10, 12)]
    assert store.missing_ranges(alice.peer_id, up_to=5) == [(1, 1), (4, 5), (7, 8)]
    assert store.missing_ranges(bob.peer_id) == []
    assert store.missing_ranges(bob.peer_id, up_to=3) == [(1, 3)]


def skipped(identity: Identity, seq: int, first: int, last: int) -> Event:
    return sign_event(identity, SequenceSkipped(first, last), seq=seq, lamport=seq, time_ms=0)


def test_missing_ranges_exclude_skipped(store: LogStore, alice: Identity, bob: Identity) -> None:
    for seq in (1, 2, 9, 12):
        store.append(heartbeat(alice, seq))
    store.append(skipped(alice, 10, 3, 7))

    assert store.skipped_ranges(alice.peer_id) == [(3, 7)]
    assert store.missing_ranges(alice.peer_id) == [(8, 8), (11, 11)]
    assert store.missing_ranges(alice.peer_id, up_to=15) == [(8, 8), (11, 11), (13, 15)]


def test_skip_by_other_author_ignored(store: LogStore, alice: Identity, bob: Identity) -> None:
    store.append(heartbeat(alice, 5))
    store.append(skipped(bob, 5, 1, 4))

    assert store.skipped_ranges(alice.peer_id) == []
    assert store.missing_ranges(alice.peer_id) == [(1, 4)]
    assert store.missing_ranges(bob.peer_id) == []


@settings(max_examples=40, deadline=None)
@given(data=st.data(), up_to=st.none() | st.integers(min_value=1, max_value=40))
def test_missing_ranges_match_naive(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, up_to: int | None) -> None:
    author = AUTHORS[0]
    stored_seqs = data.draw(st.sets(st.integers(min_value=1, max_value=30), min_size=1, max_size=20))
    declared: set[int] = set()
    events = []
    for seq in sorted(stored_seqs):
        if seq > 1 and data.draw(st.booleans()):
            first = data.draw(st.integers(min_value=1, max_value=seq - 1))
            last = data.draw(st.integers(min_value=first, max_value=seq - 1))
            declared.update(range(first, last + 1))
            events.append(skipped(author, seq, first, last))
        else:
            events.append(heartbeat(author, seq))
    top = max(max(stored_seqs), up_to or 0)
    absent = [seq for seq in range(1, top + 1) if seq not in stored_seqs and seq not in declared]
    expected: list[tuple[int, int]] = []
    for seq in absent:
        if expected and expected[-1][1] == seq - 1:
            expected[-1] = (expected[-1][0], seq)
        else:
            expected.append((seq, seq))

    with LogStore(tmp_path_factory.mktemp("skips") / "log.db") as store:
        with store.transaction():
            for event in events:
                store.insert(event)
        missing = store.missing_ranges(author.peer_id, up_to=up_to)

    assert missing == expected


def test_seq_reservation_round_trip(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    path = tmp_path / "log.db"
    with LogStore(path) as store:
        assert store.seq_reservation(alice.peer_id) is None
        store.reserve_seqs(alice.peer_id, SeqReservation(1024, 65_536, "boot-a"))
        store.reserve_seqs(alice.peer_id, SeqReservation(7, 65_536, None))
        store.reserve_seqs(bob.peer_id, SeqReservation(3, 9, "boot-b"))

    with LogStore(path) as store:
        assert store.seq_reservation(alice.peer_id) == SeqReservation(7, 65_536, None)
        assert store.seq_reservation(bob.peer_id) == SeqReservation(3, 9, "boot-b")


def test_file_without_reservation_table_opens(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "log.db"
    with LogStore(path) as store:
        store.append(heartbeat(alice, 1))
    connection = sqlite3.connect(path)
    connection.execute("DROP TABLE seq_reservations")
    connection.close()

    with LogStore(path) as store:
        assert store.max_seq(alice.peer_id) == 1
        assert store.seq_reservation(alice.peer_id) is None
        store.reserve_seqs(alice.peer_id, SeqReservation(5, 5, None))
        assert store.seq_reservation(alice.peer_id) == SeqReservation(5, 5, None)
        assert store.integrity_check() == "ok"


def test_no_gaps_for_contiguous_author(store: LogStore, alice: Identity) -> None:
    for seq in range(1, 6):
        store.append(heartbeat(alice, seq))

    assert store.missing_ranges(alice.peer_id) == []
    assert store.max_seq(alice.peer_id) == 5
    assert [len(wire) > 64 for wire in store.wires(author=alice.peer_id, first_seq=2, last_seq=3)] == [True, True]


def test_reopen_keeps_events_and_max_seq(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "log.db"
    with LogStore(path) as store:
        for seq in range(1, 4):
            store.append(heartbeat(alice, seq, lamport=seq + 10))

    with LogStore(path) as store:
        assert len(store) == 3
        assert store.max_seq(alice.peer_id) == 3
        assert store.max_lamport() == 13
        assert store.authors() == [alice.peer_id]
        assert store.integrity_check() == "ok"


def test_rollback_on_error_keeps_nothing(store: LogStore, alice: Identity) -> None:
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.insert(heartbeat(alice, 1))
            raise RuntimeError("abort")

    assert len(store) == 0
    assert store.max_seq(alice.peer_id) == 0


def test_newer_format_version_rejected(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version=7")
    connection.close()

    with pytest.raises(LogStoreError, match="format version 7"):
        LogStore(path)


def test_file_that_is_not_sqlite_rejected(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    path.write_bytes(b"this is not a database" * 100)

    with pytest.raises(LogStoreError, match="cannot open log store"):
        LogStore(path)
