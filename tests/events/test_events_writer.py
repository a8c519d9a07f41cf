"""EventWriter: fresh seq and Lamport values, append before return, no seq reuse after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cortex.registry import RegistryReducer
from events import (
    Acceptor,
    EventError,
    EventWriter,
    Identity,
    LogStore,
    PeerHeartbeat,
    Projection,
    ShardLoaded,
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


def _run_child_until_killed(data_dir: Path, acknowledgements: int) -> list[tuple[int, str]]:
    """Start a writer child, SIGKILL it after `acknowledgements` lines, return every acknowledged (seq, id)."""
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(data_dir), "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acknowledged: list[tuple[int, str]] = []
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready", child.stderr.read() if child.stderr else ""
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
    return acknowledged


def test_sigkill_loses_no_acknowledged_event(tmp_path: Path) -> None:
    acknowledged: list[tuple[int, str]] = []
    for round_acknowledgements in (25, 40, 10):
        acknowledged += _run_child_until_killed(tmp_path, round_acknowledgements)

    identity = Identity.load(tmp_path / "node.key")
    registry = Projection(RegistryReducer())
    with LogStore(tmp_path / "events.db") as store:
        assert store.integrity_check() == "ok"
        acceptor = Acceptor(store, [registry], own_peer_id=identity.peer_id)
        stored = {event.seq: event.id for event in store.events(author=identity.peer_id)}

        for seq, event_id in acknowledged:
            assert stored.get(seq) == event_id, f"acknowledged seq {seq} is missing from the log"
        assert sorted(stored) == list(range(1, len(stored) + 1))
        assert store.equivocations() == []

        event = EventWriter(identity, acceptor).write(PeerHeartbeat(len(stored)))
        assert event.seq == len(stored) + 1
        assert event.seq > max(seq for seq, _ in acknowledged)
        assert registry.view.peers[identity.peer_id].latest_seq == event.seq
