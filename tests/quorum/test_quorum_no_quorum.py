"""No quorum can form: redundancy 2 with one honest and one faulty replica, and no third one.

Node 0 drives; node 1 holds every expert honestly; node 2 holds every expert and scales its
outputs by 1.10. The two outputs of each expert disagree and no other replica exists, so the
request fails with the `no_quorum` code, and nobody is penalized for a split without a majority.

The same swarm receives an equivocation: a client signs two, then three different events with
one seq. Every node publishes one `PeerPenalized(equivocated)` for it, with two of the event
ids as evidence, and no second one for the third version.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from quorum_swarm import DRIVER, EXPERTS, PROMPT, QuorumSwarm, ask, start, swarm_shared, trust_view

from cortex.node.config import QuorumConfig
from cortex.quorum import EQUIVOCATED, TRUST_MAX, PeerPenalized
from cortex.scheduler.request_events import NO_QUORUM
from events import Event, Identity, LogStore, sign_event

pytestmark = pytest.mark.slow

MAX_TOKENS = 4


@pytest.fixture(scope="module")
def swarm(quorum_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuorumSwarm]:
    layout = [DRIVER, list(EXPERTS), list(EXPERTS)]
    swarm = start(tmp_path_factory.mktemp("quorum-none"), quorum_checkpoint, layout, {2: QuorumConfig(fault="scale=1.10")})
    try:
        yield swarm
    finally:
        asyncio.run(swarm.stop())


def test_request_fails_with_no_quorum(swarm: QuorumSwarm, tmp_path: Path) -> None:
    result = asyncio.run(ask(swarm, tmp_path, PROMPT, MAX_TOKENS, redundancy=2))

    assert result.completed is None
    assert result.failed is not None
    assert result.failed.reason_code == NO_QUORUM
    assert "no quorum for expert[" in result.failed.message
    assert result.token_ids == []
    view = trust_view(swarm.nodes[0].data_dir)
    assert view.counts()["no_quorum"] >= 1
    assert view.trust_of(swarm.peer(1)) == TRUST_MAX


def equivocation_penalties(swarm: QuorumSwarm, index: int, peer: str) -> list[Event]:
    store = LogStore(swarm.nodes[index].data_dir / "events.db")
    try:
        penalties = store.events(type="PeerPenalized")
        return [event for event in penalties if event.body.reason == EQUIVOCATED and event.body.peer == peer]
    finally:
        store.close()


def wait_for_penalties(swarm: QuorumSwarm, peer: str, count: int, timeout_s: float = 30.0) -> None:
    """Wait until node 0's log contains `count` equivocation penalties of `peer`, or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while len(equivocation_penalties(swarm, 0, peer)) < count and time.monotonic() < deadline:
        time.sleep(0.2)


async def equivocate(swarm: QuorumSwarm, root: Path, versions: int) -> tuple[str, list[str]]:
    """Publish `versions` different events with one seq from a fresh client; return its peer id and the ids."""
    client = await swarm_shared.open_client(swarm, root)
    try:
        target = Identity.generate().peer_id
        first = client.writer.write(PeerPenalized(target, "test_marker", (), "version 0"))
        events = [first]
        for version in range(1, versions):
            body = PeerPenalized(target, "test_marker", (), f"version {version}")
            events.append(sign_event(client.identity, body, seq=first.seq, lamport=first.lamport, time_ms=first.time_ms))
        for event in events:
            await client.bus.publish(event)
            await client.bus.flush()
            await asyncio.sleep(0.5)
        return client.identity.peer_id, [event.id for event in events]
    finally:
        await client.stop()


def test_equivocation_penalized_once(swarm: QuorumSwarm, tmp_path: Path) -> None:
    peer, ids = asyncio.run(equivocate(swarm, tmp_path, versions=3))
    wait_for_penalties(swarm, peer, count=len(swarm.nodes))
    time.sleep(1.0)  # room for a wrong second penalty for the third version to arrive
    penalties = equivocation_penalties(swarm, 0, peer)

    assert sorted(event.author for event in penalties) == sorted(node.peer_id for node in swarm.nodes)
    for event in penalties:
        assert len(event.body.evidence) == 2
        assert set(event.body.evidence) <= set(ids)
    assert trust_view(swarm.nodes[0].data_dir).trust_of(peer) == 0
