"""Swarm helpers of the quorum tests: swarms with per-node quorum settings, requests, trust views.

The checkpoint, the transformers reference and the client helpers are the swarm tests' own
(`tests/swarm/conftest.py`), loaded here by path under another module name so both test
folders can run in one session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import time
from pathlib import Path
from typing import Any

from cortex.node.client import RequestResult, SwarmClient
from cortex.node.config import NodeConfig, QuorumConfig
from cortex.node.launcher import LocalSwarm, SwarmNode
from cortex.quorum import TrustReducer, TrustView
from events import LogStore

_spec = importlib.util.spec_from_file_location("swarm_shared", Path(__file__).parents[1] / "swarm" / "conftest.py")
assert _spec is not None and _spec.loader is not None
swarm_shared: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(swarm_shared)

PROMPT = swarm_shared.PROMPT
reference_greedy = swarm_shared.reference_greedy
CALL_TIMEOUT_S = 10.0
QUORUM_TYPES = ("QuorumVoted", "QuorumDecided", "PeerPenalized")

SETTLED_S = 0.5  # how long the quorum events of the compared nodes must stay the same


class QuorumSwarm(LocalSwarm):
    """A LocalSwarm whose nodes get their own `quorum:` config section (policy and fault mode)."""

    def __init__(self, root: Path, model_dir: Path, layout: list[list[str]], quorum: dict[int, QuorumConfig]) -> None:
        super().__init__(root, model_dir, layout, backend="nats", call_timeout_s=CALL_TIMEOUT_S)
        self.quorum = quorum

    def config_for(self, node: SwarmNode) -> NodeConfig:
        config = super().config_for(node)
        return dataclasses.replace(config, quorum=self.quorum.get(node.index, QuorumConfig()), fallback_model=None)

    def peer(self, index: int) -> str:
        return self.nodes[index].peer_id


NUM_LAYERS = 3  # the DeepSeek-V3 test checkpoint: layer 0 dense, layers 1 and 2 MoE with 16 experts
EXPERTS = [f"expert[{layer}][{index}]" for layer in (1, 2) for index in range(16)]
DRIVER = ["head", f"block[0:{NUM_LAYERS}]"]


def split_experts(parts: int) -> list[list[str]]:
    """Return the experts dealt round-robin into `parts` disjoint lists."""
    return [EXPERTS[part::parts] for part in range(parts)]


def start(root: Path, folder: Path, layout: list[list[str]], quorum: dict[int, QuorumConfig]) -> QuorumSwarm:
    swarm = QuorumSwarm(root, folder, layout, quorum)
    asyncio.run(swarm.start())
    return swarm


async def ask(swarm: LocalSwarm, root: Path, prompt: str, max_tokens: int, redundancy: int) -> RequestResult:
    """Submit one request through a fresh client and wait for its result."""
    client: SwarmClient = await swarm_shared.open_client(swarm, root)
    try:
        model_id = client.resolve_model(str(swarm.model_dir))
        request_id = await client.submit(model_id, prompt, max_tokens, redundancy=redundancy)
        return await client.run(request_id, 240.0)
    finally:
        await client.stop()


def assert_reference_answer(swarm: LocalSwarm, result: RequestResult, prompt: str, max_tokens: int) -> None:
    """Assert the request completed, not degraded, with transformers' greedy tokens."""
    assert result.failed is None, result.failed
    assert result.completed is not None
    assert result.completed.degraded is False
    assert result.token_ids == list(reference_greedy(swarm.model_dir, prompt, max_tokens))


def trust_view(data_dir: Path) -> TrustView:
    """Fold the quorum events of a node's log into a fresh trust view."""
    store = LogStore(data_dir / "events.db")
    try:
        reducer = TrustReducer()
        view = reducer.empty()
        for author, seq in store.disputed_seqs().items():
            view = reducer.apply_equivocation(view, author, seq)
        for type_name in QUORUM_TYPES:
            for event in store.events(type=type_name):
                view = reducer.apply(view, event)
        return view
    finally:
        store.close()


def quorum_event_ids(data_dir: Path) -> set[str]:
    store = LogStore(data_dir / "events.db")
    try:
        return {event.id for type_name in QUORUM_TYPES for event in store.events(type=type_name)}
    finally:
        store.close()


def wait_for_same_quorum_events(swarm: LocalSwarm, indexes: list[int], timeout_s: float = 30.0) -> set[str]:
    """Wait until the nodes at `indexes` hold the same quorum events (gossip settles); return their ids.

    The sets must also stay the same for SETTLED_S: a voter publishes in the background, so
    its log can match its peers' for a moment while more of its events are still queued.
    """
    deadline = time.monotonic() + timeout_s
    previous: set[str] | None = None
    while True:
        sets = [quorum_event_ids(swarm.nodes[index].data_dir) for index in indexes]
        same = all(ids == sets[0] for ids in sets)
        if (same and sets[0] == previous) or time.monotonic() > deadline:
            return sets[0]
        previous = sets[0] if same else None
        time.sleep(SETTLED_S)
