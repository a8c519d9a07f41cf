"""Replicated block steps: a faulty block holder among four holders of the block, redundancy 3.

Node 0 holds only the head and drives. Nodes 1 to 4 each hold the whole block[0:3] and every
expert. With no latency measured yet, rankings break ties by peer id, so the holder whose
peer id sorts first gets `block_scale=1.10` (it scales the output of every block step it
serves) and is among the first three, and the one that sorts last is the spare. Each block
step runs on three holders, and the two honest outputs win. The faulty holder is penalized
until the trust view excludes it and it leaves the session. Then the spare joins by replay
of the session's earlier inputs, and its outputs agree with the honest ones.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from quorum_swarm import EXPERTS, NUM_LAYERS, PROMPT, QuorumSwarm, ask, assert_reference_answer, start, trust_view, wait_for_same_quorum_events

from cortex.node.client import RequestResult
from cortex.node.config import QuorumConfig
from cortex.node.lifecycle import read_status
from cortex.quorum import TRUST_MAX
from events import Identity, LogStore

pytestmark = pytest.mark.slow

DRIVER = 0
HOLDERS = [1, 2, 3, 4]
BLOCK = f"block[0:{NUM_LAYERS}]"
MAX_TOKENS = 10
# Three dissents exclude a peer; steps already running when the third decision folds, and
# rankings reused for up to 100 ms, may add a few more before the holder leaves the session.
DISSENTS_TO_EXCLUDE = 3
IN_FLIGHT_SLACK = 4


@pytest.fixture(scope="module")
def swarm(quorum_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuorumSwarm]:
    root = tmp_path_factory.mktemp("quorum-blocks")
    # Keys made before start, so the faulty holder can be one ranked among the first three.
    peers = {index: Identity.load_or_create(root / f"node{index}" / "node.key").peer_id for index in HOLDERS}
    by_peer = sorted(HOLDERS, key=peers.__getitem__)
    holder = [BLOCK, *EXPERTS]
    layout = [["head"], *(list(holder) for _ in HOLDERS)]
    swarm = start(root, quorum_checkpoint, layout, {by_peer[0]: QuorumConfig(fault="block_scale=1.10")})
    swarm.roles = {"faulty": by_peer[0], "honest": by_peer[1:3], "spare": by_peer[3]}  # type: ignore[attr-defined]
    try:
        yield swarm
    finally:
        asyncio.run(swarm.stop())


def role(swarm: QuorumSwarm, name: str) -> Any:
    return swarm.roles[name]  # type: ignore[attr-defined]


def honest(swarm: QuorumSwarm) -> list[int]:
    """Return the indexes of the nodes that stay honest: the driver, the two honest holders and the spare."""
    return [DRIVER, *role(swarm, "honest"), role(swarm, "spare")]


@pytest.fixture(scope="module")
def first(swarm: QuorumSwarm, tmp_path_factory: pytest.TempPathFactory) -> RequestResult:
    return asyncio.run(ask(swarm, tmp_path_factory.mktemp("blocks-client"), PROMPT, MAX_TOKENS, redundancy=3))


def block_decisions(swarm: QuorumSwarm, request_id: str) -> list[Any]:
    """Return the bodies of the driver's block decisions for one request, in step order."""
    store = LogStore(swarm.nodes[DRIVER].data_dir / "events.db")
    try:
        bodies = [event.body for event in store.events(type="QuorumDecided", ref=request_id) if event.body.block == BLOCK]
        return sorted(bodies, key=lambda body: body.step)
    finally:
        store.close()


def test_block_answer_equals_reference(swarm: QuorumSwarm, first: RequestResult) -> None:
    decisions = block_decisions(swarm, first.request_id)

    assert_reference_answer(swarm, first, PROMPT, MAX_TOKENS)
    assert first.driver == swarm.peer(DRIVER)
    assert len(decisions) >= DISSENTS_TO_EXCLUDE
    assert all(decision.outcome == "agreed" for decision in decisions)


def test_faulty_block_holder_excluded(swarm: QuorumSwarm, first: RequestResult) -> None:
    wait_for_same_quorum_events(swarm, honest(swarm))
    view = trust_view(swarm.nodes[DRIVER].data_dir)
    faulty_peer = swarm.peer(role(swarm, "faulty"))
    faulty = view.peer(faulty_peer)
    block_dissents = [decision for decision in block_decisions(swarm, first.request_id) if faulty_peer in decision.dissenting]

    assert view.is_excluded(faulty_peer)
    # Its experts are honest, so every dissent counted comes from a block step.
    assert DISSENTS_TO_EXCLUDE <= faulty.dissents <= DISSENTS_TO_EXCLUDE + IN_FLIGHT_SLACK
    assert len(block_dissents) == faulty.dissents
    for index in honest(swarm)[1:]:
        assert view.trust_of(swarm.peer(index)) == TRUST_MAX


def test_spare_joins_by_replay(swarm: QuorumSwarm, first: RequestResult) -> None:
    decisions = block_decisions(swarm, first.request_id)
    spare = swarm.peer(role(swarm, "spare"))
    joined = [index for index, decision in enumerate(decisions) if spare in decision.agreeing]

    # The spare joins once the faulty holder has left, so never at the first step, and then stays.
    assert joined
    assert joined[0] > 0
    assert joined == list(range(joined[0], len(decisions)))
    assert all(spare not in decision.dissenting for decision in decisions)


def test_block_views_agree(swarm: QuorumSwarm, first: RequestResult) -> None:
    events = wait_for_same_quorum_events(swarm, honest(swarm))
    digests = {trust_view(swarm.nodes[index].data_dir).digest() for index in honest(swarm)}

    assert events
    assert len(digests) == 1


def test_excluded_holder_not_used_again(swarm: QuorumSwarm, first: RequestResult, tmp_path: Path) -> None:
    wait_for_same_quorum_events(swarm, honest(swarm))
    second = asyncio.run(ask(swarm, tmp_path, "Open the file", MAX_TOKENS, redundancy=3))
    decisions = block_decisions(swarm, second.request_id)
    producers = {peer for decision in decisions for peer in (*decision.agreeing, *decision.dissenting)}

    assert_reference_answer(swarm, second, "Open the file", MAX_TOKENS)
    assert decisions
    assert producers == {swarm.peer(index) for index in honest(swarm)[1:]}


def test_status_counts_block_steps(swarm: QuorumSwarm, first: RequestResult) -> None:
    """Stop the driver (last test of the module) and read the counts its status file got at the stop."""
    process = swarm.nodes[DRIVER].process
    assert process is not None
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    status = read_status(swarm.nodes[DRIVER].data_dir)
    assert status is not None
    (counts,) = status["router"].values()

    assert status["state"] == "stopped"
    assert counts["quorum"]["block_decisions"] >= len(block_decisions(swarm, first.request_id))
    assert DISSENTS_TO_EXCLUDE <= counts["quorum"]["block_dissents"] <= DISSENTS_TO_EXCLUDE + IN_FLIGHT_SLACK
    assert "hedges" in counts
