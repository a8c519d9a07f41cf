"""A straggler: one expert replica delayed by 5 s per call, a second replica live.

Node 0 drives; nodes 1 and 2 hold every expert. The replica whose peer id sorts first gets
the `delay=5` fault: with no latency measured yet, rankings break ties by peer id, so the
first calls go to it and must be hedged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from quorum_swarm import DRIVER, EXPERTS, PROMPT, QuorumSwarm, ask, assert_reference_answer, start

from cortex.node.client import RequestResult
from cortex.node.config import QuorumConfig
from cortex.quorum.policy import HEDGE_MAX_S
from events import Identity

pytestmark = pytest.mark.slow

DELAY_S = 5.0
MAX_TOKENS = 12
HEDGE_LINE = "hedging on"


@pytest.fixture(scope="module")
def swarm(quorum_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuorumSwarm]:
    root = tmp_path_factory.mktemp("quorum-stragglers")
    # Keys made before start, so the slow replica can be the one ranked first.
    peers = {index: Identity.load_or_create(root / f"node{index}" / "node.key").peer_id for index in (1, 2)}
    slow = min(peers, key=peers.__getitem__)
    swarm = start(root, quorum_checkpoint, [DRIVER, list(EXPERTS), list(EXPERTS)], {slow: QuorumConfig(fault=f"delay={DELAY_S}")})
    swarm.slow_index = slow  # type: ignore[attr-defined]
    try:
        yield swarm
    finally:
        asyncio.run(swarm.stop())


def _hedges(swarm: QuorumSwarm) -> int:
    return swarm.nodes[0].log_path.read_text(errors="replace").count(HEDGE_LINE)


@pytest.fixture(scope="module")
def first(swarm: QuorumSwarm, tmp_path_factory: pytest.TempPathFactory) -> RequestResult:
    return asyncio.run(ask(swarm, tmp_path_factory.mktemp("straggler-client"), PROMPT, MAX_TOKENS, redundancy=1))


def test_tokens_flow_past_straggler(swarm: QuorumSwarm, first: RequestResult) -> None:
    gaps_ms = [later - earlier for earlier, later in zip(first.token_event_times_ms, first.token_event_times_ms[1:], strict=False)]

    assert_reference_answer(swarm, first, PROMPT, MAX_TOKENS)
    assert _hedges(swarm) >= 1
    # Without hedging, every call to the slow replica would hold its token for 5 s.
    assert max(gaps_ms, default=0) < DELAY_S * 1000
    assert _hedges(swarm) <= 2


def test_routing_avoids_straggler_after(swarm: QuorumSwarm, first: RequestResult, tmp_path: Path) -> None:
    hedges_before = _hedges(swarm)
    second = asyncio.run(ask(swarm, tmp_path, "Open the file", MAX_TOKENS, redundancy=1))

    assert_reference_answer(swarm, second, "Open the file", MAX_TOKENS)
    assert _hedges(swarm) == hedges_before
    assert HEDGE_MAX_S < DELAY_S
