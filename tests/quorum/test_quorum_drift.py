"""Honest drift and recovery in a swarm of real node processes.

Node 0 drives. Nodes 1 and 2 are honest replicas of every expert. Node 3 scales its outputs
by 1.0001 (float32 drift), and node 4 computes layer 1's experts in bfloat16. Node 5 scales
its first served call by 1.10 and is right afterwards. Requests ask for redundancy 5, so
layer 1 compares five outputs under the bfloat16 tolerance and layer 2 four float32 outputs
under the float32 tolerance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from quorum_swarm import DRIVER, EXPERTS, PROMPT, QuorumSwarm, ask, assert_reference_answer, start, trust_view, wait_for_same_quorum_events

from cortex.node.client import RequestResult
from cortex.node.config import QuorumConfig
from cortex.quorum import TRUST_MAX, QuorumVoted
from cortex.quorum.compare import TOLERANCE_BY_DTYPE
from cortex.quorum.events import NANO
from cortex.quorum.rules import DISSENT_PENALTY, PROBATION_DECISIONS, RECOVERY_STEP, TRUST_START
from events import LogStore

pytestmark = pytest.mark.slow

DRIVER_NODE, HONEST_A, HONEST_B, DRIFT, BFLOAT16, ONCE_WRONG = range(6)
MAX_TOKENS = 16
LAYER_ONE = [expert for expert in EXPERTS if expert.startswith("expert[1]")]


@pytest.fixture(scope="module")
def swarm(quorum_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuorumSwarm]:
    layout = [DRIVER, list(EXPERTS), list(EXPERTS), list(EXPERTS), LAYER_ONE, list(EXPERTS)]
    quorum = {
        DRIFT: QuorumConfig(fault="scale=1.0001"),
        BFLOAT16: QuorumConfig(fault="bfloat16"),
        ONCE_WRONG: QuorumConfig(fault="scale=1.10,calls=1"),
    }
    swarm = start(tmp_path_factory.mktemp("quorum-drift"), quorum_checkpoint, layout, quorum)
    try:
        yield swarm
    finally:
        asyncio.run(swarm.stop())


@pytest.fixture(scope="module")
def result(swarm: QuorumSwarm, tmp_path_factory: pytest.TempPathFactory) -> RequestResult:
    answer = asyncio.run(ask(swarm, tmp_path_factory.mktemp("quorum-drift-client"), PROMPT, MAX_TOKENS, redundancy=5))
    wait_for_same_quorum_events(swarm, list(range(6)))
    return answer


def _votes(swarm: QuorumSwarm) -> list[QuorumVoted]:
    store = LogStore(swarm.nodes[DRIVER_NODE].data_dir / "events.db")
    try:
        return [event.body for event in store.events(type="QuorumVoted")]
    finally:
        store.close()


def test_answer_equals_reference(swarm: QuorumSwarm, result: RequestResult) -> None:
    assert_reference_answer(swarm, result, PROMPT, MAX_TOKENS)


def test_drift_gets_no_penalty(swarm: QuorumSwarm, result: RequestResult) -> None:
    view = trust_view(swarm.nodes[DRIVER_NODE].data_dir)

    for index in (HONEST_A, HONEST_B, DRIFT, BFLOAT16):
        record = view.peer(swarm.peer(index))
        assert record.trust == TRUST_MAX, index
        assert record.dissents == 0, index
        assert record.agreements > 0, index


def test_votes_use_dtype_tolerance(swarm: QuorumSwarm, result: RequestResult) -> None:
    votes = _votes(swarm)
    by_layer = {layer: [vote for vote in votes if vote.layer == layer] for layer in (1, 2)}
    float32_tolerance = round(TOLERANCE_BY_DTYPE[torch.float32] * NANO)
    bfloat16_tolerance = round(TOLERANCE_BY_DTYPE[torch.bfloat16] * NANO)

    assert by_layer[1] and by_layer[2]
    assert {vote.dtype for vote in by_layer[1]} == {"bfloat16"}
    assert {vote.tolerance_nano for vote in by_layer[1]} == {bfloat16_tolerance}
    assert {vote.dtype for vote in by_layer[2]} == {"float32"}
    assert {vote.tolerance_nano for vote in by_layer[2]} == {float32_tolerance}
    drift = swarm.peer(DRIFT)
    drift_distances = [d for vote in by_layer[2] for p, d in zip(vote.producers, vote.distances_nano, strict=True) if p == drift]
    assert drift_distances
    # 1.0001 sits at relative distance 1e-4: inside the float32 tolerance, far above float32 noise.
    assert all(50_000 < distance < float32_tolerance for distance in drift_distances)


def test_wrong_once_recovers_by_rule(swarm: QuorumSwarm, result: RequestResult) -> None:
    record = trust_view(swarm.nodes[DRIVER_NODE].data_dir).peer(swarm.peer(ONCE_WRONG))
    expected = min(TRUST_MAX, TRUST_START - DISSENT_PENALTY + RECOVERY_STEP * max(0, record.agreements - PROBATION_DECISIONS))

    assert record.dissents == 1
    assert record.agreements > PROBATION_DECISIONS
    assert record.trust == expected
    assert record.trust > TRUST_START - DISSENT_PENALTY


def test_all_views_agree(swarm: QuorumSwarm, result: RequestResult) -> None:
    digests = {trust_view(node.data_dir).digest() for node in swarm.nodes}

    assert len(digests) == 1
