"""EquivocationReporter on a real log: one penalty per (author, seq), none again after a restart."""

from __future__ import annotations

from pathlib import Path

from quorum_helpers import penalty

from cortex.quorum import EQUIVOCATED
from cortex.quorum.equivocation import EquivocationReporter
from events import Acceptor, Identity, LogStore, sign_event
from events.writer import EventWriter

NODE = Identity.generate()
LIAR = Identity.generate()
TARGET = Identity.generate().peer_id


def equivocate(acceptor: Acceptor, seq: int, versions: int) -> list[str]:
    """Accept `versions` different events of LIAR with one seq; return their ids."""
    events = [sign_event(LIAR, penalty(TARGET, f"code_{version}"), seq=seq, lamport=seq, time_ms=1_000) for version in range(versions)]
    acceptor.accept_many([event.wire for event in events])
    return [event.id for event in events]


def reporter_of(acceptor: Acceptor) -> EquivocationReporter:
    return EquivocationReporter(acceptor.store, NODE.peer_id, lambda: acceptor.counters["equivocations"])


def test_equivocation_penalty_once_per_seq(tmp_path: Path) -> None:
    acceptor = Acceptor(LogStore(tmp_path / "events.db"), own_peer_id=NODE.peer_id)
    reporter = reporter_of(acceptor)
    ids = equivocate(acceptor, seq=1, versions=2)

    first = reporter.new_penalties()
    equivocate(acceptor, seq=1, versions=3)
    second = reporter.new_penalties()

    assert [(body.peer, body.reason) for body in first] == [(LIAR.peer_id, EQUIVOCATED)]
    assert set(first[0].evidence) == set(ids)
    assert second == []


def test_equivocation_penalty_not_repeated_after_restart(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "events.db")
    acceptor = Acceptor(store, own_peer_id=NODE.peer_id)
    equivocate(acceptor, seq=1, versions=2)
    (published,) = reporter_of(acceptor).new_penalties()
    EventWriter(NODE, acceptor).write(published)
    equivocate(acceptor, seq=2, versions=2)

    restarted = reporter_of(acceptor).new_penalties()

    assert [(body.peer, body.detail) for body in restarted] == [(LIAR.peer_id, "two events with seq 2")]
