"""Replay rebuilds exactly the views that real node processes had at the end of a run.

Three `cortex node` processes serve a tiny Mixtral checkpoint (node 0 the head and blocks,
nodes 1 and 2 a replica of every expert each), a client sends one request with redundancy 2
so the quorum votes, and the swarm stops.
Each node writes the digest of every view it folds (registry, scheduler, router, quorum) to
its status file as it stops. Replaying its log must give the same digests.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cortex.node.client import SwarmClient
from cortex.node.launcher import LocalSwarm, demo_layout
from cortex.node.lifecycle import read_status
from cortex.runtime.loader import Loader
from cortex.runtime.testmodels import make_test_checkpoint
from cortex.runtime.testmodels import test_tokenizer as tokenizer_for_tests
from replay.fold import Folder
from replay.reader import LogReader
from replay.views import load_view, view_digest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LIVE_VIEWS = ("registry", "scheduler", "router", "quorum")


async def _run_swarm(root: Path, folder: Path) -> LocalSwarm:
    loader = Loader(folder, device="cpu")
    layout = demo_layout(loader.num_layers, loader.moe_layers, loader.num_experts, 3)
    swarm = LocalSwarm(root / "swarm", folder, layout, backend="nats", call_timeout_s=5.0)
    await swarm.start()
    try:
        client = SwarmClient(root / "client", swarm.client_transport_factory())
        await client.start()
        try:
            model_id = client.resolve_model(str(folder))
            await client.wait_for_model(model_id, {f for node in swarm.nodes for f in node.fragments}, 60.0)
            request_id = await client.submit(model_id, "Count the items", 6, redundancy=2)
            result = await client.run(request_id, 120.0, None)
        finally:
            await client.stop()
        assert result.failed is None, result.failed
        assert result.completed is not None
    finally:
        await swarm.stop()
    return swarm


def test_replayed_views_equal_live_node_views(tmp_path: Path) -> None:
    folder = make_test_checkpoint("mixtral", tmp_path / "mixtral", seed=0, tokenizer=tokenizer_for_tests())
    swarm = asyncio.run(_run_swarm(tmp_path, folder))
    expert_outputs = votes = 0
    for node in swarm.nodes:
        status = read_status(node.data_dir)
        assert status is not None
        assert status["state"] == "stopped"
        live = status["view_digests"]
        # Every view the node reports is checked, including any added after these four.
        assert set(LIVE_VIEWS) <= set(live)
        with LogReader(node.data_dir) as reader:
            replayed = Folder(reader, [load_view(name) for name in sorted(live)])
            assert replayed.run() > 0
            assert {name: view_digest(view) for name, view in replayed.views.items()} == live, node.data_dir
            router = replayed.view("router")
            votes += replayed.view("quorum").counts()["votes"]
        expert_outputs += sum(router.replica_stats(peer).expert_outputs for peer in router.stats)
    assert expert_outputs > 0, "no expert output reached the router views, so the check covered no routing"
    assert votes > 0, "no quorum vote reached the logs, so the check covered no trust"
