"""EventWriter: fresh seq and Lamport values, append before return, seq reservations, no seq reuse.

SIGKILL runs a real child process. Power loss is simulated by deleting the newest own events
from the SQLite file (what an OS crash can drop from NORMAL commits) while the fsynced
reservation stays, and by giving the restarted writer another boot id.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.registry import RegistryReducer
from events import (
    LAMPORT_RESERVATION_BLOCK,
    SEQ_RESERVATION_BLOCK,
    Acceptor,
    Event,
    EventError,
    EventWriter,
    Identity,
    LogStore,
    PeerHeartbeat,
    Projection,
    SeqReservation,
    SequenceSkipped,
    ShardLoaded,
    current_boot_id,
    sign_event,
)

CHILD = Path(__file__).with_name("writer_child.py")


def test_writer_numbers_and_appends(acceptor: Acceptor, alice: Identity, bob: Identity) -> None:
    own = Acceptor(acceptor.store, acceptor.projections, own_peer_id=alice.peer_id)
    writer = EventWriter(alice, own, clock_ms=lambda: 5_000)
    own.accept(sign_event(bob, ShardLoaded("m", "head", 1), seq=1, lamport=30, time_ms=1).wire)

    first = writer.write(PeerHeartbeat(0))
    second = writer.write(ShardLoaded("m", "head", 1), refs=(first.id,))

    assert (first.seq, first.lamport, first.time_ms) == (1, 31, 5_000)
    assert (second.seq, second.lamport, second.refs) == (2, 32, (first.id,))
    assert own.store.get(second.id) == second
    assert own.counters["own"] == 2


def test_writer_resumes_after_reopen(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "log.db"
    with LogStore(path) as store:
        writer = EventWriter(alice, Acceptor(store, own_peer_id=alice.peer_id))
        for _ in range(3):
            writer.write(PeerHeartbeat(writer.last_seq))

    with LogStore(path) as store:
        writer = EventWriter(alice, Acceptor(store, own_peer_id=alice.peer_id))
        event = writer.write(PeerHeartbeat(writer.last_seq))

        assert event.seq == 4
        assert event.lamport == 4
        assert store.equivocations() == []


def test_writer_requires_matching_acceptor(acceptor: Acceptor, alice: Identity) -> None:
    with pytest.raises(EventError, match="own_peer_id"):
        EventWriter(alice, acceptor)


def test_own_event_echo_is_duplicate(tmp_path: Path, alice: Identity) -> None:
    with LogStore(tmp_path / "log.db") as store:
        acceptor = Acceptor(store, own_peer_id=alice.peer_id)
        event = EventWriter(alice, acceptor).write(PeerHeartbeat(0))

        assert acceptor.accept(event.wire) is None
        assert len(store) == 1


def _writer(store: LogStore, identity: Identity, boot: str | None) -> EventWriter:
    return EventWriter(identity, Acceptor(store, own_peer_id=identity.peer_id), boot_id=lambda: boot)


def _own_seqs(store: LogStore, identity: Identity) -> list[int]:
    return sorted(event.seq for event in store.events(author=identity.peer_id))


def _lose_newest_events(path: Path, author: str, keep_up_to: int) -> None:
    """Delete `author`'s events above `keep_up_to` from the file, as power loss can; keep the reservation."""
    connection = sqlite3.connect(path)
    with connection:
        connection.execute(
            "DELETE FROM refs WHERE event_rowid IN (SELECT rowid FROM events WHERE author = ? AND seq > ?)", (author, keep_up_to)
        )
        connection.execute("DELETE FROM events WHERE author = ? AND seq > ?", (author, keep_up_to))
    connection.close()


def test_writer_reserves_one_block_at_a_time(tmp_path: Path, alice: Identity) -> None:
    with LogStore(tmp_path / "log.db") as store:
        writer = _writer(store, alice, "boot-a")
        reservations: list[SeqReservation] = []
        reserve = store.reserve_seqs

        def record_and_reserve(author: str, reservation: SeqReservation) -> None:
            reservations.append(reservation)
            reserve(author, reservation)

        store.reserve_seqs = record_and_reserve  # type: ignore[method-assign]
        for _ in range(SEQ_RESERVATION_BLOCK + 1):
            writer.write(PeerHeartbeat(writer.last_seq))

        assert reservations == [
            SeqReservation(SEQ_RESERVATION_BLOCK, LAMPORT_RESERVATION_BLOCK, "boot-a"),
            SeqReservation(2 * SEQ_RESERVATION_BLOCK, SEQ_RESERVATION_BLOCK + LAMPORT_RESERVATION_BLOCK, "boot-a"),
        ]
        assert store.seq_reservation(alice.peer_id) == reservations[-1]


def test_lamport_jump_extends_reservation(acceptor: Acceptor, alice: Identity, bob: Identity) -> None:
    own = Acceptor(acceptor.store, own_peer_id=alice.peer_id)
    writer = EventWriter(alice, own, boot_id=lambda: "boot-a")
    writer.write(PeerHeartbeat(0))
    own.accept(sign_event(bob, PeerHeartbeat(0), seq=1, lamport=10 * LAMPORT_RESERVATION_BLOCK, time_ms=0).wire)

    event = writer.write(PeerHeartbeat(1))

    assert event.lamport == 10 * LAMPORT_RESERVATION_BLOCK + 1
    assert writer.reservation.lamport_up_to == event.lamport + LAMPORT_RESERVATION_BLOCK - 1
    assert writer.reservation.seq_up_to == event.seq + SEQ_RESERVATION_BLOCK - 1
    assert acceptor.store.seq_reservation(alice.peer_id) == writer.reservation


def test_clean_close_resumes_contiguously(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "log.db"
    with LogStore(path) as store:
        writer = _writer(store, alice, "boot-a")
        for _ in range(3):
            writer.write(PeerHeartbeat(writer.last_seq))
        writer.close()
        assert store.seq_reservation(alice.peer_id) == SeqReservation(3, LAMPORT_RESERVATION_BLOCK, "boot-a")

    # Another boot id: after a clean close even a reboot resumes without a gap.
    with LogStore(path) as store:
        writer = _writer(store, alice, "boot-b")
        event = writer.write(PeerHeartbeat(writer.last_seq))

        assert writer.skipped is None
        assert event.seq == 4
        assert _own_seqs(store, alice) == [1, 2, 3, 4]


def test_close_failure_is_logged(tmp_path: Path, alice: Identity, caplog: pytest.LogCaptureFixture) -> None:
    store = LogStore(tmp_path / "log.db")
    writer = _writer(store, alice, "boot-a")
    writer.write(PeerHeartbeat(0))
    store.close()

    writer.close()

    assert "could not release seqs 2 to 1024" in caplog.text
    assert writer.reservation.seq_up_to == SEQ_RESERVATION_BLOCK


def test_log_without_reservation_resumes(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "log.db"
    with LogStore(path) as store:
        for seq in (1, 2, 3):
            store.append(sign_event(alice, PeerHeartbeat(seq - 1), seq=seq, lamport=seq, time_ms=0), durable=True)

    with LogStore(path) as store:
        writer = _writer(store, alice, "boot-b")
        event = writer.write(PeerHeartbeat(3))

        assert writer.skipped is None
        assert (event.seq, event.lamport) == (4, 4)


def test_unclean_stop_same_boot_resumes(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "log.db"
    with LogStore(path) as store:
        writer = _writer(store, alice, "boot-a")
        for _ in range(5):
            writer.write(PeerHeartbeat(writer.last_seq))

    with LogStore(path) as store:
        writer = _writer(store, alice, "boot-a")
        event = writer.write(PeerHeartbeat(writer.last_seq))

        assert writer.skipped is None
        assert event.seq == 6
        assert writer.reservation.seq_up_to == SEQ_RESERVATION_BLOCK


def _write_and_lose_power(path: Path, identity: Identity, written: int, lost: int) -> list[Event]:
    """Write `written` own events in boot-a without closing, then lose the newest `lost` of them."""
    with LogStore(path) as store:
        writer = _writer(store, identity, "boot-a")
        published = [writer.write(PeerHeartbeat(writer.last_seq)) for _ in range(written)]
    _lose_newest_events(path, identity.peer_id, written - lost)
    return published


def test_power_loss_voids_reserved_range(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "log.db"
    published = _write_and_lose_power(path, alice, written=10, lost=4)

    with LogStore(path) as store:
        assert _own_seqs(store, alice) == list(range(1, 7))
        writer = _writer(store, alice, "boot-b")
        after = writer.write(PeerHeartbeat(writer.last_seq))
        skipped = writer.skipped

        assert skipped is not None
        assert skipped.body == SequenceSkipped(first=7, last=SEQ_RESERVATION_BLOCK)
        assert skipped.seq == SEQ_RESERVATION_BLOCK + 1
        assert skipped.lamport == LAMPORT_RESERVATION_BLOCK + 1
        assert after.seq == SEQ_RESERVATION_BLOCK + 2
        assert min(skipped.lamport, after.lamport) > max(event.lamport for event in published)
        assert store.seq_reservation(alice.peer_id) == SeqReservation(
            2 * SEQ_RESERVATION_BLOCK, 2 * LAMPORT_RESERVATION_BLOCK, "boot-b"
        )
        assert store.missing_ranges(alice.peer_id) == []
        assert store.missing_ranges(alice.peer_id, up_to=after.seq + 3) == [(after.seq + 1, after.seq + 3)]
        assert store.equivocations() == []
        restarted = [skipped, after]

    # A peer that received the lost events keeps them; one that missed them stops asking.
    with LogStore(tmp_path / "peer_with_lost.db") as peer_store:
        result = Acceptor(peer_store).accept_many(event.wire for event in published + restarted)
        assert len(result.accepted) == 12
        assert result.equivocations == []
        assert peer_store.missing_ranges(alice.peer_id) == []
    with LogStore(tmp_path / "peer_without_lost.db") as peer_store:
        Acceptor(peer_store).accept_many(event.wire for event in published[:6] + restarted)
        assert peer_store.missing_ranges(alice.peer_id) == []


@settings(max_examples=12, deadline=None)
@given(written=st.integers(min_value=0, max_value=30), data=st.data())
def test_power_loss_never_reuses_seqs(tmp_path_factory: pytest.TempPathFactory, written: int, data: st.DataObject) -> None:
    identity = Identity.generate()
    lost = data.draw(st.integers(min_value=0, max_value=written))
    path = tmp_path_factory.mktemp("power") / "log.db"
    published = _write_and_lose_power(path, identity, written, lost)

    with LogStore(path) as store:
        writer = _writer(store, identity, "boot-b")
        after = writer.write(PeerHeartbeat(writer.last_seq))
        new_events = [event for event in (writer.skipped, after) if event is not None]

        assert min(event.seq for event in new_events) > max((event.seq for event in published), default=0)
        assert min(event.lamport for event in new_events) > max((event.lamport for event in published), default=0)
        if written == 0:
            assert writer.skipped is None
        else:
            assert writer.skipped is not None
            assert writer.skipped.body == SequenceSkipped(written - lost + 1, SEQ_RESERVATION_BLOCK)
        assert store.missing_ranges(identity.peer_id) == []


def test_interrupted_void_is_voided_again(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "log.db"
    _write_and_lose_power(path, alice, written=5, lost=2)

    with LogStore(path) as store:
        acceptor = Acceptor(store, own_peer_id=alice.peer_id)

        def crash(events: Sequence[Event]) -> None:
            raise KeyboardInterrupt("process died before the SequenceSkipped was committed")

        acceptor.accept_own_many = crash  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            EventWriter(alice, acceptor, boot_id=lambda: "boot-b")
        assert store.seq_reservation(alice.peer_id) == SeqReservation(
            2 * SEQ_RESERVATION_BLOCK, 2 * LAMPORT_RESERVATION_BLOCK, None
        )

    # Same boot as the interrupted start: the range must be voided again, never resumed.
    with LogStore(path) as store:
        writer = _writer(store, alice, "boot-b")

        assert writer.skipped is not None
        assert writer.skipped.body == SequenceSkipped(4, 2 * SEQ_RESERVATION_BLOCK)
        assert writer.skipped.seq == 2 * SEQ_RESERVATION_BLOCK + 1


def _run_child_until_killed(data_dir: Path, acknowledgements: int) -> tuple[int, str, list[tuple[int, str]]]:
    """Start a writer child, SIGKILL it after `acknowledgements` lines.

    Returns the seq it resumed after, its SequenceSkipped id or "-", and every acknowledged (seq, id).
    """
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(data_dir), "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acknowledged: list[tuple[int, str]] = []
    try:
        assert child.stdout is not None
        ready = child.stdout.readline().split()
        assert ready[:1] == ["ready"], child.stderr.read() if child.stderr else ""
        while len(acknowledged) < acknowledgements:
            line = child.stdout.readline()
            assert line, f"writer child exited early: {child.stderr.read() if child.stderr else ''}"
            seq, event_id = line.split()
            acknowledged.append((int(seq), event_id))
        os.kill(child.pid, signal.SIGKILL)
        # Lines printed before the kill landed are acknowledgements too.
        for line in child.stdout:
            seq, event_id = line.split()
            acknowledged.append((int(seq), event_id))
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    assert child.returncode == -signal.SIGKILL
    return int(ready[1]), ready[2], acknowledged


@pytest.mark.skipif(current_boot_id() is None, reason="this OS has no boot id, so every unclean restart voids seqs")
def test_sigkill_loses_no_acknowledged_event(tmp_path: Path) -> None:
    acknowledged: list[tuple[int, str]] = []
    # The middle round crosses a reservation block, so a SIGKILL lands in the second block.
    for round_acknowledgements in (25, SEQ_RESERVATION_BLOCK + 100, 10):
        resumed_after, skipped_id, round_acknowledged = _run_child_until_killed(tmp_path, round_acknowledgements)
        last_acknowledged = max((seq for seq, _ in acknowledged), default=0)

        # Same boot: the child resumes right after its last committed event, without a skip.
        assert skipped_id == "-"
        assert resumed_after in (last_acknowledged, last_acknowledged + 1)
        assert round_acknowledged[0][0] == resumed_after + 1
        acknowledged += round_acknowledged

    identity = Identity.load(tmp_path / "node.key")
    registry = Projection(RegistryReducer())
    with LogStore(tmp_path / "events.db") as store:
        assert store.integrity_check() == "ok"
        acceptor = Acceptor(store, [registry], own_peer_id=identity.peer_id)
        stored = {event.seq: event.id for event in store.events(author=identity.peer_id)}
        reservation = store.seq_reservation(identity.peer_id)

        for seq, event_id in acknowledged:
            assert stored.get(seq) == event_id, f"acknowledged seq {seq} is missing from the log"
        assert sorted(stored) == list(range(1, len(stored) + 1))
        assert list(store.events(type="SequenceSkipped")) == []
        assert store.equivocations() == []
        assert reservation is not None
        assert reservation.seq_up_to >= len(stored)
        assert reservation.boot_id == current_boot_id()

        event = EventWriter(identity, acceptor).write(PeerHeartbeat(len(stored)))
        assert event.seq == len(stored) + 1
        assert event.seq > max(seq for seq, _ in acknowledged)
        assert registry.view.peers[identity.peer_id].latest_seq == event.seq

        # Had the OS rebooted after the kill, the unsigned rest of the block would be voided.
        rebooted = EventWriter(identity, acceptor, boot_id=lambda: "another-boot")
        assert rebooted.skipped is not None
        assert rebooted.skipped.body == SequenceSkipped(event.seq + 1, reservation.seq_up_to)
