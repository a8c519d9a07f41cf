"""LogReader: read-only opening, canonical order, id prefixes, and reading while a node writes."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Scenario

from events import Acceptor, Event, Identity, LogStore, PeerHeartbeat, sign_event
from replay.errors import EventNotFound, LogOpenError
from replay.reader import EventFilter, LogReader

CHILD = Path(__file__).with_name("log_writer_child.py")


def file_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes()).hexdigest()


def test_reader_canonical_order_matches_store(scenario_log: Path) -> None:
    with LogStore(scenario_log / "events.db") as store:
        expected = [event.id for event in store.events()]
    with LogReader(scenario_log) as reader:
        assert [event.id for event in reader.canonical()] == expected
        assert reader.count() == len(expected)


def test_reader_never_writes_the_file(scenario_log: Path) -> None:
    path = scenario_log / "events.db"
    before = file_digest(path)
    with LogReader(path) as reader:
        list(reader.canonical())
        reader.integrity_check()
        with pytest.raises(sqlite3.OperationalError):
            reader.query("DELETE FROM events")
    assert file_digest(path) == before


def test_reader_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(LogOpenError, match="does not exist"):
        LogReader(tmp_path / "missing.db")


def test_reader_rejects_foreign_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE notes (text TEXT)")
    connection.close()
    with pytest.raises(LogOpenError, match="not a Cortex event log"):
        LogReader(path)


def test_reader_rejects_other_format_version(scenario_log: Path) -> None:
    path = scenario_log / "events.db"
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 7")
    connection.close()
    with pytest.raises(LogOpenError, match="format version 7"):
        LogReader(path)


def test_reader_resolves_id_prefixes(scenario_log: Path, scenario: Scenario) -> None:
    with LogReader(scenario_log) as reader:
        target = scenario.claim.id
        assert reader.resolve_id(target[:9]) == target
        assert reader.resolve_id(target.upper()[:12]) == target
        with pytest.raises(EventNotFound, match="no event"):
            reader.resolve_id("0000000000000000000000")
        with pytest.raises(EventNotFound, match="4 to 64"):
            reader.resolve_id("ab")


def test_reader_ambiguous_prefix_lists_candidates(tmp_path: Path, identities: list[Identity]) -> None:
    # Sign heartbeats until two ids share their first 4 hex digits (a birthday search, ~300 events).
    by_prefix: dict[str, Event] = {}
    seq = 0
    while True:
        seq += 1
        event = sign_event(identities[0], PeerHeartbeat(latest_seq=seq - 1), seq=seq, lamport=seq, time_ms=seq)
        other = by_prefix.setdefault(event.id[:4], event)
        if other is not event:
            break
    with LogStore(tmp_path / "events.db") as store:
        Acceptor(store).accept_many([other.wire, event.wire])
    with LogReader(tmp_path) as reader:
        with pytest.raises(EventNotFound, match="2 events .* give more digits"):
            reader.resolve_id(event.id[:4])
        assert reader.resolve_id(event.id[:20]) == event.id


def test_reader_canonical_index_and_filters(scenario_log: Path, scenario: Scenario) -> None:
    with LogReader(scenario_log) as reader:
        order = [event.id for event in reader.canonical()]
        assert reader.canonical_index(scenario.claim.id) == order.index(scenario.claim.id)
        referencing = list(reader.canonical(EventFilter(request=scenario.claim.id)))
        assert referencing[0].id == scenario.claim.id
        assert {event.id for event in referencing[1:]} == {
            event.id for event in scenario.events if scenario.claim.id in event.refs
        }
        suffix = scenario.authors[1].peer_id[-8:]
        by_author = list(reader.canonical(EventFilter(author=suffix)))
        assert by_author
        assert all(event.author == scenario.authors[1].peer_id for event in by_author)


def test_reader_follows_writer_subprocess(tmp_path: Path) -> None:
    """A reader polls a log that a separate node process keeps writing: every read is consistent."""
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().startswith("ready")
        reader = LogReader(tmp_path)
        child.stdin.write("write 300\n")
        child.stdin.flush()
        versions = set()
        seen_counts = []
        while True:
            versions.add(reader.data_version())
            seqs = [event.seq for event in reader.canonical()]
            # Each snapshot is a whole prefix of the writer's sequence: no gap, no torn row.
            assert seqs == list(range(1, len(seqs) + 1))
            seen_counts.append(len(seqs))
            if len(seqs) == 301:
                break
        assert child.stdout.readline().strip() == "wrote 301"
        assert len(versions) > 1, "data_version must change while another process commits"
        assert seen_counts == sorted(seen_counts)
        reader.close()
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(30)
    assert child.returncode == 0
