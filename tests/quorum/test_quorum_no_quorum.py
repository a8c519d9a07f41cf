"""No quorum can form: redundancy 2 with one honest and one faulty replica, and no third one.

Node 0 drives; node 1 holds every expert honestly; node 2 holds every expert and scales its
outputs by 1.10. The two outputs of each expert disagree and no other replica exists, so the
request fails with the `no_quorum` code, and nobody is penalized for a split without a majority.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from quorum_swarm import DRIVER, EXPERTS, PROMPT, QuorumSwarm, ask, start, trust_view

from cortex.node.config import QuorumConfig
from cortex.quorum import TRUST_MAX
from cortex.scheduler.request_events import NO_QUORUM

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
