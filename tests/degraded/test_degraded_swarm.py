"""Degraded mode on a swarm of node processes: deadlines, lost expert holders, recovery and churn.

One swarm serves every test of this module, in order: node 0 holds the head and every block,
nodes 1 to 3 the routed experts, two replicas each. Each test leaves the swarm able to serve.
The nodes' fallback model is the packaged demo model, so a degraded answer is the demo
model's greedy text, not the swarm model's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from degraded_helpers import (
    PROMPT,
    assert_swarm_served,
    ask,
    holders_of,
    join,
    open_client,
    pause,
    reference_tokens,
    start_swarm,
    stop,
    wait_loaded,
)

import cortex.scheduler  # noqa: F401 - registers the request event types
from cortex.commands.generate import DEMO_MODEL_DIR
from cortex.node.client import RequestResult
from cortex.node.launcher import LocalSwarm, demo_layout
from cortex.node.lifecycle import read_status
from cortex.node.report import expert_records
from cortex.runtime.loader import Loader
from cortex.scheduler import RequestCompleted, RequestFailed
from events import LogStore, wall_clock_ms

pytestmark = pytest.mark.slow

EXPERT_NODES = [1, 2, 3]


@pytest.fixture(scope="module")
def swarm(degraded_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    loader = Loader(degraded_checkpoint, device="cpu")
    layout = demo_layout(loader.num_layers, loader.moe_layers, loader.num_experts, nodes=4)
    swarm = start_swarm(tmp_path_factory.mktemp("degraded-swarm"), degraded_checkpoint, layout)
    try:
        yield swarm
    finally:
        for node in swarm.nodes:
            if node.process is not None and node.process.poll() is None:
                pause(swarm, [node.index], False)  # a failed test may leave a node stopped
        asyncio.run(swarm.stop())


def assert_fallback_answer(result: RequestResult, max_tokens: int) -> None:
    """Assert the request completed degraded, with the fallback (demo) model's greedy tokens."""
    assert result.failed is None, result.failed
    assert result.completed is not None
    assert result.completed.degraded is True
    assert result.route == {}, "a degraded answer is accepted with an empty route"
    assert result.token_ids == list(reference_tokens(DEMO_MODEL_DIR, PROMPT, max_tokens))


async def test_deadline_before_first_token_degrades_and_late_results_are_dropped(swarm: LocalSwarm, tmp_path: Path) -> None:
    client = await open_client(swarm, tmp_path)
    try:
        pause(swarm, EXPERT_NODES, True)  # every expert call now waits past the 2 s deadline
        try:
            late = await ask(client, swarm, 16, deadline_ms=2_000)
        finally:
            pause(swarm, EXPERT_NODES, False)  # their replies to the abandoned calls now reach the driver
        assert_fallback_answer(late, 16)
        assert late.completed is not None and late.completed.degraded_reason.startswith("deadline_exceeded:")

        # The abandoned attempt's late replies must leave sessions, caches and views intact,
        # and none of their output records may enter the driver's log.
        await asyncio.sleep(1.0)
        assert expert_records(swarm.nodes[0].data_dir, {late.request_id}) == []
        again = await ask(client, swarm, 32)
        assert again.token_ids == list(reference_tokens(swarm.model_dir, PROMPT, 32))
        assert_swarm_served(swarm, again)
    finally:
        await client.stop()


async def test_killed_expert_holders_degrade_then_a_restart_recovers(swarm: LocalSwarm, tmp_path: Path) -> None:
    loader = Loader(swarm.model_dir, device="cpu")
    fragment = f"expert[{loader.moe_layers[0]}][0]"
    victims = holders_of(swarm, fragment)
    assert len(victims) == 2
    client = await open_client(swarm, tmp_path)
    try:
        for index in victims:
            stop(swarm, index, kill=True)
        degraded = await ask(client, swarm, 16)
        assert_fallback_answer(degraded, 16)
        assert degraded.completed is not None
        reason = degraded.completed.degraded_reason
        assert reason.split(":")[0] in ("holder_failed", "fragment_unserved"), reason
        assert "expert[" in reason, reason

        holder = await join(swarm, swarm.nodes[victims[0]].fragments)  # a holder of the lost experts starts again
        await wait_loaded(client, swarm, holder)
        served = await ask(client, swarm, 32)
        assert served.token_ids == list(reference_tokens(swarm.model_dir, PROMPT, 32))
        assert_swarm_served(swarm, served)
    finally:
        await client.stop()


def expert_nodes(swarm: LocalSwarm) -> list[int]:
    """Return the indexes of the running nodes that hold experts, oldest first."""
    return [
        node.index for node in swarm.nodes
        if node.index > 0 and node.process is not None and node.process.poll() is None
    ]


def can_leave(swarm: LocalSwarm, index: int) -> bool:
    """Return whether every fragment of node `index` has another holder that is serving."""
    others = [
        swarm.nodes[other] for other in expert_nodes(swarm)
        if other != index and (read_status(swarm.nodes[other].data_dir) or {}).get("state") == "serving"
    ]
    return all(any(fragment in node.fragments for node in others) for fragment in swarm.nodes[index].fragments)


async def test_churn_every_request_completes(swarm: LocalSwarm, tmp_path: Path) -> None:
    """Every 3 s a new expert node joins, or one leaves (SIGTERM or SIGKILL), while requests run.

    A node leaves only while each of its experts has another serving holder, so the swarm
    can always serve; a request in flight when a holder dies moves to the other replica.
    """
    reference = list(reference_tokens(swarm.model_dir, PROMPT, 24))
    client = await open_client(swarm, tmp_path)
    steps: list[str] = []
    left: list[list[str]] = [swarm.nodes[index].fragments for index in EXPERT_NODES if index not in expert_nodes(swarm)]

    async def churn() -> None:
        for step in range(8):
            await asyncio.sleep(3.0)
            leaving = next((index for index in expert_nodes(swarm) if can_leave(swarm, index)), None)
            if step % 2 == 1 and leaving is not None:
                stop(swarm, leaving, kill=step % 4 == 1)
                left.append(swarm.nodes[leaving].fragments)
                steps.append(f"{'kill' if step % 4 == 1 else 'term'} {leaving}")
            elif left:
                node = await join(swarm, left.pop(0), wait=False)
                steps.append(f"join {node.index}")

    results: list[RequestResult] = []
    churning = asyncio.ensure_future(churn())
    try:
        while len(results) < 4 or (not churning.done() and len(results) < 12):
            results.append(await asyncio.wait_for(ask(client, swarm, 24), 150.0))
            await asyncio.sleep(0.5)
    finally:
        churning.cancel()
        await client.stop()
    assert any(step.startswith(("kill", "term")) for step in steps) and any(step.startswith("join") for step in steps), steps
    for result in results:
        assert result.failed is None, result.failed
        assert result.completed is not None
        if result.completed.degraded:
            assert result.completed.degraded_reason and result.route == {}
        else:
            assert result.token_ids == reference
    served = [result for result in results if result.completed is not None and not result.completed.degraded]
    assert served, "no request was served by the swarm during the churn"
    print(f"churn: {steps}; {len(served)} of {len(results)} requests served by the swarm, the others degraded")

    # None is lost: the driver's log holds one outcome per request.
    store = LogStore(swarm.nodes[0].data_dir / "events.db")
    try:
        outcomes = {event.body.request_id for event in store.events() if isinstance(event.body, (RequestCompleted, RequestFailed))}
    finally:
        store.close()
    assert {result.request_id for result in results} <= outcomes


async def test_with_no_live_head_holder_a_fallback_node_answers(swarm: LocalSwarm, tmp_path: Path) -> None:
    """The only head holder leaves: an expert node, first in the fallback order, answers degraded."""
    client = await open_client(swarm, tmp_path)
    try:
        head_holder = swarm.nodes[0].peer_id
        stop(swarm, 0, kill=False)  # a clean leave: PeerLeft tells every peer at once
        for _ in range(200):
            if not client.registry.view.is_live(head_holder, wall_clock_ms()):
                break
            await asyncio.sleep(0.1)
        result = await ask(client, swarm, 16)
    finally:
        await client.stop()
    assert_fallback_answer(result, 16)
    assert result.completed is not None and result.completed.degraded_reason.startswith("no_head_holder:")
    assert result.driver in {swarm.nodes[index].peer_id for index in expert_nodes(swarm)}
