"""A block holder dies mid-stream while another holder of its layers is live: the session is replayed."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PROMPT, assert_served_by_plan, open_client, reference_greedy, start_swarm, swarm_fixture

import cortex.scheduler  # noqa: F401 - registers the request event types
from cortex.node.client import RequestResult, SwarmClient
from cortex.node.launcher import LocalSwarm
from cortex.runtime.loader import Loader
from cortex.scheduler import RouteReplanned, TokenGenerated
from events import LogStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swarm(checkpoint: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    folder = checkpoint("deepseek_v3")  # type: ignore[operator]
    loader = Loader(folder, device="cpu")
    block = f"block[0:{loader.num_layers}]"
    experts = [f"expert[{layer}][{index}]" for layer in loader.moe_layers for index in range(loader.num_experts)]
    layout = [["head"], [block], [block], experts]
    yield from swarm_fixture(start_swarm(tmp_path_factory.mktemp("failover-swarm"), folder, layout))


async def test_block_holder_killed_session_replayed(swarm: LocalSwarm, tmp_path: Path) -> None:
    client = await open_client(swarm, tmp_path)
    killed: list[str] = []
    routes: list[dict[str, str]] = []

    def on_text(piece: str) -> None:
        if killed:
            return
        holder = next(iter(routes[-1].values())) if routes else ""
        victim = next(node for node in swarm.nodes if node.peer_id == holder)
        swarm.kill(victim.index)
        killed.append(victim.peer_id)

    try:
        request_id = await client.submit(client.resolve_model(str(swarm.model_dir)), PROMPT, 32)
        # The route is known from RequestAccepted before the first token arrives.
        result = await _run_recording_route(client, client.run(request_id, 240.0, on_text), routes)
    finally:
        await client.stop()

    assert killed, "no token arrived before the end, so the kill did not land mid-stream"
    assert result.token_ids == list(reference_greedy(swarm.model_dir, PROMPT, 32))
    assert_served_by_plan(swarm, result)
    assert killed[0] not in result.route.values()

    store = LogStore(swarm.nodes[0].data_dir / "events.db")
    try:
        events = list(store.events(ref=next(e.id for e in store.events(type="RequestSubmitted"))))
    finally:
        store.close()
    replans = [e for e in events if isinstance(e.body, RouteReplanned)]
    assert len(replans) == 1
    assert replans[0].body.failed_holder == killed[0]
    resume = replans[0].body.resume_step
    assert 0 < resume < 32
    batches = [e for e in events if isinstance(e.body, TokenGenerated)]
    assert any(e.body.step_stop <= resume and e.lamport < replans[0].lamport for e in batches)
    assert any(e.body.step_start >= resume and e.lamport > replans[0].lamport for e in batches)


async def _run_recording_route(
    client: SwarmClient, run: Coroutine[Any, Any, RequestResult], routes: list[dict[str, str]]
) -> RequestResult:
    """Await the client's run while copying the accepted route into `routes` as soon as it is known."""
    task = asyncio.ensure_future(run)
    store = client.store
    while not task.done():
        for event in store.events(type="RequestAccepted"):
            if not routes:
                routes.append(dict(event.body.route))
        await asyncio.sleep(0.01)
    return task.result()
