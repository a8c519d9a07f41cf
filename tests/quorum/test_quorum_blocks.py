"""Replicated block steps: a faulty block holder among three holders of the block, redundancy 3.

Node 0 holds only the head and drives. Nodes 1 to 3 each hold the whole block[0:3] and every
expert; node 3 scales the output of every block step it serves by 1.10 (`block_scale`).
Each block step runs on the three holders, the two honest outputs win, and node 3 is
penalized until the trust view excludes it and it leaves the session.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from quorum_swarm import EXPERTS, NUM_LAYERS, PROMPT, QuorumSwarm, ask, assert_reference_answer, start, trust_view, wait_for_same_quorum_events

from cortex.node.client import RequestResult
from cortex.node.config import QuorumConfig
from cortex.node.lifecycle import read_status
from cortex.quorum import TRUST_MAX
from events import LogStore

pytestmark = pytest.mark.slow

DRIVER, HONEST_A, HONEST_B, FAULTY = 0, 1, 2, 3
BLOCK = f"block[0:{NUM_LAYERS}]"
MAX_TOKENS = 10
# Three dissents exclude a peer; steps already running when the third decision folds, and
# rankings reused for up to 100 ms, may add a few more before the holder leaves the session.
DISSENTS_TO_EXCLUDE = 3
IN_FLIGHT_SLACK = 4


@pytest.fixture(scope="module")
def swarm(quorum_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuorumSwarm]:
    holder = [BLOCK, *EXPERTS]
    quorum = {FAULTY: QuorumConfig(fault="block_scale=1.10")}
    swarm = start(tmp_path_factory.mktemp("quorum-blocks"), quorum_checkpoint, [["head"], holder, holder, holder], quorum)
    try:
        yield swarm
    finally:
        asyncio.run(swarm.stop())


@pytest.fixture(scope="module")
def first(swarm: QuorumSwarm, tmp_path_factory: pytest.TempPathFactory) -> RequestResult:
    return asyncio.run(ask(swarm, tmp_path_factory.mktemp("blocks-client"), PROMPT, MAX_TOKENS, redundancy=3))


def block_decisions(swarm: QuorumSwarm, request_id: str) -> list[object]:
    """Return the bodies of the driver's block decisions for one request."""
    store = LogStore(swarm.nodes[DRIVER].data_dir / "events.db")
    try:
        return [event.body for event in store.events(type="QuorumDecided", ref=request_id) if event.body.block == BLOCK]
    finally:
        store.close()


def test_block_answer_equals_reference(swarm: QuorumSwarm, first: RequestResult) -> None:
    decisions = block_decisions(swarm, first.request_id)

    assert_reference_answer(swarm, first, PROMPT, MAX_TOKENS)
    assert first.driver == swarm.peer(DRIVER)
    assert len(decisions) >= DISSENTS_TO_EXCLUDE
    assert all(decision.outcome == "agreed" for decision in decisions)  # type: ignore[attr-defined]


def test_faulty_block_holder_excluded(swarm: QuorumSwarm, first: RequestResult) -> None:
    wait_for_same_quorum_events(swarm, [DRIVER, HONEST_A, HONEST_B])
    view = trust_view(swarm.nodes[DRIVER].data_dir)
    faulty = view.peer(swarm.peer(FAULTY))

    block_dissents = [decision for decision in block_decisions(swarm, first.request_id) if swarm.peer(FAULTY) in decision.dissenting]  # type: ignore[attr-defined]

    assert view.is_excluded(swarm.peer(FAULTY))
    # Its experts are honest, so every dissent counted comes from a block step.
    assert DISSENTS_TO_EXCLUDE <= faulty.dissents <= DISSENTS_TO_EXCLUDE + IN_FLIGHT_SLACK
    assert len(block_dissents) == faulty.dissents
    for index in (HONEST_A, HONEST_B):
        assert view.trust_of(swarm.peer(index)) == TRUST_MAX


def test_block_views_agree(swarm: QuorumSwarm, first: RequestResult) -> None:
    events = wait_for_same_quorum_events(swarm, [DRIVER, HONEST_A, HONEST_B])
    digests = {trust_view(swarm.nodes[index].data_dir).digest() for index in (DRIVER, HONEST_A, HONEST_B)}

    assert events
    assert len(digests) == 1


def test_excluded_holder_not_used_again(swarm: QuorumSwarm, first: RequestResult, tmp_path: Path) -> None:
    wait_for_same_quorum_events(swarm, [DRIVER, HONEST_A, HONEST_B])
    second = asyncio.run(ask(swarm, tmp_path, "Open the file", MAX_TOKENS, redundancy=3))
    decisions = block_decisions(swarm, second.request_id)
    producers = {peer for decision in decisions for peer in (*decision.agreeing, *decision.dissenting)}  # type: ignore[attr-defined]

    assert_reference_answer(swarm, second, "Open the file", MAX_TOKENS)
    assert decisions
    assert producers == {swarm.peer(HONEST_A), swarm.peer(HONEST_B)}


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
