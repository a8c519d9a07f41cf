"""Fixtures for the replay tools: logs written through the real Acceptor, and the CLI in-process."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cortex.cli import main
from cortex.registry import RegistryReducer
from events import Acceptor, Event, Identity, LogStore, PeerHeartbeat, PeerJoined, Projection, ShardClaimed, ShardLoaded
from events import ShardReleased, sign_event

MODEL = "ab" * 32
START_MS = 1_764_800_000_000


class NodeLog:
    """One node's log: a LogStore, an Acceptor and the Registry projection, fed signed wires."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = LogStore(path)
        self.registry = Projection(RegistryReducer())
        self.acceptor = Acceptor(self.store, [self.registry])

    def accept(self, wires: list[bytes]) -> None:
        result = self.acceptor.accept_many(wires)
        assert not result.rejected, result.rejected

    def close(self) -> None:
        self.store.close()


class Author:
    """A signing identity that numbers its own events (seq) and shares a Lamport clock."""

    def __init__(self, identity: Identity, clock: list[int]) -> None:
        self.identity = identity
        self.seq = 0
        self._clock = clock

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def sign(self, body: Any, refs: tuple[str, ...] = (), time_ms: int | None = None, seq: int | None = None) -> Event:
        if seq is None:
            self.seq += 1
            seq = self.seq
        self._clock[0] += 1
        when = START_MS + self._clock[0] * 1000 if time_ms is None else time_ms
        return sign_event(self.identity, body, seq=seq, lamport=self._clock[0], time_ms=when, refs=refs)


def joined(author: Author, index: int = 0) -> PeerJoined:
    return PeerJoined(
        bus_addresses=(f"/ip4/127.0.0.1/tcp/{4001 + index}",),
        data_endpoint=f"tcp://127.0.0.1:{5001 + index}",
        curve_public_key=author.identity.curve_public_key.decode(),
        hardware={"cpu_cores": 4 + index, "gpu": False},
        protocol_version="1.0",
        software_version="0.1.0",
    )


@dataclass
class Scenario:
    """A small swarm history: three authors, shard events with refs, heartbeats and a release."""

    authors: list[Author]
    events: list[Event]
    claim: Event
    """A ShardClaimed that later events ref, used as the "request" of timelines."""


def build_scenario(identities: list[Identity]) -> Scenario:
    clock = [0]
    authors = [Author(identity, clock) for identity in identities]
    events: list[Event] = []
    for index, author in enumerate(authors):
        events.append(author.sign(joined(author, index)))
    first, second, third = authors
    claim = first.sign(ShardClaimed(model_id=MODEL, fragment="block[0:4]", memory_bytes=1000))
    events.append(claim)
    events.append(first.sign(ShardLoaded(model_id=MODEL, fragment="block[0:4]", memory_bytes=1024), refs=(claim.id,)))
    events.append(second.sign(ShardClaimed(model_id=MODEL, fragment="head", memory_bytes=500), refs=(claim.id,)))
    loaded = second.sign(ShardLoaded(model_id=MODEL, fragment="head", memory_bytes=512), refs=(claim.id,))
    events.append(loaded)
    events.append(third.sign(ShardLoaded(model_id=MODEL, fragment="expert[1][3]", memory_bytes=64), refs=(loaded.id,)))
    events.append(third.sign(PeerHeartbeat(latest_seq=third.seq)))
    events.append(first.sign(PeerHeartbeat(latest_seq=first.seq)))
    events.append(third.sign(ShardReleased(model_id=MODEL, fragment="expert[1][3]", reason="rebalance")))
    events.append(second.sign(PeerHeartbeat(latest_seq=second.seq)))
    return Scenario(authors, events, claim)


@pytest.fixture(scope="session")
def identities() -> list[Identity]:
    return [Identity.generate() for _ in range(3)]


@pytest.fixture
def scenario(identities: list[Identity]) -> Scenario:
    return build_scenario(identities)


@pytest.fixture
def scenario_log(tmp_path: Path, scenario: Scenario) -> Iterator[Path]:
    """A node's data directory whose log holds the scenario, accepted in order."""
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    node = NodeLog(data_dir / "events.db")
    node.accept([event.wire for event in scenario.events])
    node.close()
    yield data_dir


@dataclass
class CliResult:
    status: int
    stdout: str
    stderr: str


def run_cli(*arguments: str, stdin: str | None = None) -> CliResult:
    """Run `cortex ARGUMENTS` in this process and capture its output (stdout is not a terminal)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr, sys.stdin
    sys.stdout, sys.stderr = stdout, stderr
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        status = main(list(arguments))
    finally:
        sys.stdout, sys.stderr, sys.stdin = saved
    return CliResult(status, stdout.getvalue(), stderr.getvalue())
