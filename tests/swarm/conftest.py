"""Swarm test helpers: test checkpoints, transformers greedy references, swarms and requests.

Swarms are real node processes on loopback (`LocalSwarm`); a module shares one swarm
through a module-scoped fixture. Requests go through a real bus client (`SwarmClient`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cortex.node.client import RequestResult, SwarmClient
from cortex.node.launcher import LocalSwarm
from cortex.node.report import expert_records
from cortex.runtime.testmodels import make_test_checkpoint, test_tokenizer

PROMPT = "Return the number of items in the container"
CALL_TIMEOUT_S = 5.0

CheckpointFactory = Callable[[str], Path]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """Return `make(arch)`, which writes each test checkpoint once per session."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("swarm-checkpoints")

    def make(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_test_checkpoint(arch, root / arch, seed=0, tokenizer=test_tokenizer())
        return made[arch]

    return make


@functools.lru_cache(maxsize=8)
def reference_greedy(folder: Path, prompt: str, max_tokens: int) -> tuple[int, ...]:
    """Return transformers' greedy tokens for `prompt`, up to and including the first EOS token.

    transformers generates past EOS here (`eos_token_id=None`, so the run cannot stop
    early for another reason). The cut at EOS matches the driver, which stops after it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        # An explicit mask: the BOS id may equal the pad id, which generate would mask out.
        mask = torch.ones_like(ids)
        output = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None)
    tokens = [int(token) for token in output[0, ids.shape[1] :]]
    eos = model.config.eos_token_id
    if isinstance(eos, int) and eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    return tuple(tokens)


def start_swarm(
    root: Path, folder: Path, layout: list[list[str]], backend: str = "libp2p", kv_cache_budget_mb: float = 256.0
) -> LocalSwarm:
    swarm = LocalSwarm(root, folder, layout, backend=backend, call_timeout_s=CALL_TIMEOUT_S, kv_cache_budget_mb=kv_cache_budget_mb)
    asyncio.run(swarm.start())
    return swarm


def swarm_fixture(swarm: LocalSwarm) -> Iterator[LocalSwarm]:
    try:
        yield swarm
    finally:
        asyncio.run(swarm.stop())


async def open_client(swarm: LocalSwarm, root: Path) -> SwarmClient:
    """Start a bus client and wait until every fragment of the swarm's layout has a live holder."""
    client = SwarmClient(root, swarm.client_transport_factory())
    await client.start()
    model_id = client.resolve_model(str(swarm.model_dir))
    live_fragments = {f for node in swarm.nodes if node.process and node.process.poll() is None for f in node.fragments}
    await client.wait_for_model(model_id, live_fragments, 60.0)
    return client


async def ask(client: SwarmClient, swarm: LocalSwarm, prompt: str, max_tokens: int, **on: Any) -> RequestResult:
    request_id = await client.submit(client.resolve_model(str(swarm.model_dir)), prompt, max_tokens)
    return await client.run(request_id, 240.0, on.get("on_text"))


def assert_served_by_plan(swarm: LocalSwarm, result: RequestResult) -> None:
    """Assert the request was not degraded and every expert output came from a remote holder of that expert."""
    assert result.failed is None, result.failed
    assert result.completed is not None
    assert result.completed.degraded is False, result.completed.degraded_reason
    fragments_of = {node.peer_id: set(node.fragments) for node in swarm.nodes}
    block_holders = {holder for holder in result.route.values()}
    records = [r for node in swarm.nodes if node.peer_id in block_holders for r in expert_records(node.data_dir, {result.request_id})]
    if any(f.startswith("expert") for fragments in fragments_of.values() for f in fragments):
        assert records, "no expert output of this request is in the block holders' logs"
    for record in records:
        assert record.author not in block_holders
        assert f"expert[{record.layer}][{record.expert}]" in fragments_of[record.author]
    if result.driver in block_holders:
        assert result.completed.records_count > 0
