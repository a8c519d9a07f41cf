"""DeepSeek-V3 test model on the demo layout: head and blocks on node 0, experts over three nodes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from conftest import PROMPT, ask, assert_served_by_plan, open_client, reference_greedy, start_swarm, swarm_fixture

from cortex.node.claims import fragment_sizes
from cortex.node.launcher import LocalSwarm, demo_layout
from cortex.node.report import expert_records
from cortex.runtime.loader import Loader

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swarm(checkpoint: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    folder = checkpoint("deepseek_v3")  # type: ignore[operator]
    loader = Loader(folder, device="cpu")
    layout = demo_layout(loader.num_layers, loader.moe_layers, loader.num_experts, nodes=4)
    yield from swarm_fixture(start_swarm(tmp_path_factory.mktemp("deepseek-swarm"), folder, layout))


async def test_greedy_equals_transformers(swarm: LocalSwarm, tmp_path: Path) -> None:
    client = await open_client(swarm, tmp_path)
    try:
        result = await ask(client, swarm, PROMPT, 32)
    finally:
        await client.stop()

    assert result.token_ids == list(reference_greedy(swarm.model_dir, PROMPT, 32))
    assert_served_by_plan(swarm, result)
    authors = {record.author for record in expert_records(swarm.nodes[0].data_dir, {result.request_id})}
    assert authors == {node.peer_id for node in swarm.nodes[1:]}


def test_submit_command_streams_answer(swarm: LocalSwarm) -> None:
    submit = subprocess.run(
        [sys.executable, "-m", "cortex", "submit", "--model", swarm.model_dir.name, "--bootstrap",
         swarm.nodes[0].bootstrap_address, "--max-tokens", "16", "--json", PROMPT],
        capture_output=True, text=True, timeout=180,
    )

    assert submit.returncode == 0, submit.stderr[-3000:]
    answer = orjson.loads(submit.stdout)
    assert answer["token_ids"] == list(reference_greedy(swarm.model_dir, PROMPT, 16))
    assert answer["driver"] == swarm.nodes[0].peer_id
    assert answer["completed"]["degraded"] is False
    assert answer["failed"] is None


async def test_stop_string_ends_text(swarm: LocalSwarm, tmp_path: Path) -> None:
    client = await open_client(swarm, tmp_path)
    try:
        full = await ask(client, swarm, PROMPT, 16)
        stop = full.text[len(full.text) // 2 :][:3]
        model_id = client.resolve_model(str(swarm.model_dir))
        stopped = await client.run(await client.submit(model_id, PROMPT, 16, stop=[stop]), 240.0)
    finally:
        await client.stop()

    assert stop
    assert stopped.completed is not None
    assert stopped.completed.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    assert stopped.token_ids == full.token_ids[: len(stopped.token_ids)]
    assert len(stopped.token_ids) < len(full.token_ids)


def test_expert_nodes_read_only_their_experts(swarm: LocalSwarm) -> None:
    sizes = fragment_sizes(Loader(swarm.model_dir, device="cpu"))
    total = sum(sizes.values())
    for node in swarm.nodes[1:]:
        assert node.status is not None
        read = next(iter(node.status["checkpoint_bytes_read"].values()))
        expected = sum(sizes[fragment] for fragment in node.fragments)
        assert read == expected
        assert read < total / 2


async def test_concurrent_requests_overlap(swarm: LocalSwarm, tmp_path: Path) -> None:
    prompts = [PROMPT, "Open the file", "Return a new list", "Raise ValueError if"]
    client = await open_client(swarm, tmp_path)
    try:
        results = await asyncio.gather(*(ask(client, swarm, prompt, 16) for prompt in prompts))
    finally:
        await client.stop()

    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == list(reference_greedy(swarm.model_dir, prompt, 16))
        assert_served_by_plan(swarm, result)
    spans = sorted((min(r.token_event_times_ms), max(r.token_event_times_ms)) for r in results)
    overlapping = sum(1 for before, after in zip(spans, spans[1:]) if after[0] < before[1])
    assert overlapping >= 1


async def test_expert_holder_killed_mid_generation(swarm: LocalSwarm, tmp_path: Path) -> None:
    client = await open_client(swarm, tmp_path)
    victim = swarm.nodes[3]
    killed_after_tokens: list[int] = []
    streamed: list[str] = []

    def on_text(piece: str) -> None:
        streamed.append(piece)
        if not killed_after_tokens:
            swarm.kill(victim.index)
            killed_after_tokens.append(len(streamed))

    try:
        result = await ask(client, swarm, PROMPT, 32, on_text=on_text)
    finally:
        await client.stop()

    assert killed_after_tokens, "no token arrived before the end, so the kill did not land mid-stream"
    assert result.token_ids == list(reference_greedy(swarm.model_dir, PROMPT, 32))
    assert_served_by_plan(swarm, result)
    records = expert_records(swarm.nodes[0].data_dir, {result.request_id})
    steps_by_victim = [record.step for record in records if record.author == victim.peer_id]
    steps_by_others = [record.step for record in records if record.author != victim.peer_id]
    # The victim served the first steps, and only the other replicas served the last ones.
    assert steps_by_victim
    assert max(steps_by_others) > max(steps_by_victim)
    assert min(steps_by_victim) == 0
