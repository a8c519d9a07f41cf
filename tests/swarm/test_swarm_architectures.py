"""Other architectures and swarm sizes: each swarm's greedy output equals transformers'.

Mixtral on 2 nodes, Qwen2-MoE on 3 nodes, Llama as a 2-stage pipeline (layer 0 with the
head on one node, layer 1 on another), and the DeepSeek-V3 test model on 8 nodes. Each
swarm serves one short request and stops. A hang would fail on the client's timeout.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import PROMPT, ask, assert_served_by_plan, open_client, reference_greedy, start_swarm

from cortex.node.launcher import demo_layout
from cortex.node.report import expert_records
from cortex.runtime.loader import Loader

pytestmark = pytest.mark.slow

TOKENS = 12


async def _answer_equals_reference(folder: Path, layout: list[list[str]], root: Path) -> None:
    swarm = await asyncio.to_thread(start_swarm, root / "swarm", folder, layout)
    try:
        client = await open_client(swarm, root / "client")
        try:
            result = await ask(client, swarm, PROMPT, TOKENS)
        finally:
            await client.stop()
    finally:
        await swarm.stop()
    # The plan check first: a degraded or taken-over answer then fails with its reason, not
    # only with different tokens.
    assert_served_by_plan(swarm, result)
    assert result.token_ids == list(reference_greedy(folder, PROMPT, TOKENS))
    if len(layout) > 1 and any(f.startswith("expert") for f in layout[1]):
        authors = {record.author for record in expert_records(swarm.nodes[0].data_dir, {result.request_id})}
        expert_nodes = {node.peer_id for node in swarm.nodes[1:]}
        assert authors, "no expert output record reached the driver's log"
        # The router covers each layer's experts with as few replicas as it can, so when
        # every expert node holds every expert, one of them may serve the whole request.
        assert authors <= expert_nodes


@pytest.mark.parametrize(("arch", "nodes"), [("mixtral", 2), ("qwen2_moe", 3), ("deepseek_v3", 8)])
async def test_moe_swarm_equals_transformers(arch: str, nodes: int, checkpoint: object, tmp_path: Path) -> None:
    folder = checkpoint(arch)  # type: ignore[operator]
    loader = Loader(folder, device="cpu")
    layout = demo_layout(loader.num_layers, loader.moe_layers, loader.num_experts, nodes)
    await _answer_equals_reference(folder, layout, tmp_path)


async def test_llama_two_stage_pipeline(checkpoint: object, tmp_path: Path) -> None:
    folder = checkpoint("llama")  # type: ignore[operator]
    layout = [["head", "block[0:1]"], ["block[1:2]"]]
    await _answer_equals_reference(folder, layout, tmp_path)


async def test_kv_budget_rejects_at_admission(checkpoint: object, tmp_path: Path) -> None:
    folder = checkpoint("llama")  # type: ignore[operator]
    layout = [["head", "block[0:1]"], ["block[1:2]"]]
    # Llama test model: 2 KV heads x 16 dims x 2 (keys and values) x 4 bytes = 256 bytes per token
    # and layer, so a 0.01 MiB budget (10,485 bytes) admits 40 tokens on each one-layer block.
    swarm = await asyncio.to_thread(start_swarm, tmp_path / "swarm", folder, layout, "libp2p", 0.01)
    try:
        client = await open_client(swarm, tmp_path / "client")
        try:
            refused = await ask(client, swarm, PROMPT, 64)
            admitted = await ask(client, swarm, PROMPT, 8)
        finally:
            await client.stop()
    finally:
        await swarm.stop()

    assert refused.failed is not None
    assert refused.failed.reason_code == "kv_budget_exceeded"
    assert refused.token_ids == []
    assert "needed_bytes" in refused.failed.details
    assert admitted.token_ids == list(reference_greedy(folder, PROMPT, 8))
    assert_served_by_plan(swarm, admitted)
