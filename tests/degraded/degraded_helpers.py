"""Helpers of the degraded-mode tests: a test checkpoint, its local greedy reference, swarms and requests.

Swarms are real node processes on loopback (`LocalSwarm`); requests go through a real bus
client (`SwarmClient`). Nodes keep the default fallback model (the packaged demo model), a
different model from the swarm's, so a degraded answer differs from the swarm's answer.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from pathlib import Path
from typing import Any

from cortex.node.client import RequestResult, SwarmClient
from cortex.node.launcher import LocalSwarm, SwarmNode
from cortex.node.report import expert_records
from cortex.runtime.testmodels import make_test_checkpoint, test_tokenizer
from cortex.scheduler import RequestAccepted
from events import Identity, LogStore, wall_clock_ms

PROMPT = "Return the number of items in the container"
CALL_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 120.0


def make_checkpoint(root: Path) -> Path:
    return make_test_checkpoint("deepseek_v3", root / "deepseek_v3", seed=0, tokenizer=test_tokenizer())


@functools.lru_cache(maxsize=4)
def reference_tokens(folder: Path, prompt: str, max_tokens: int) -> tuple[int, ...]:
    """Greedy tokens of the whole model in this process, up to and including the first EOS token."""
    from transformers import AutoTokenizer

    from cortex.runtime.engine import LocalModel
    from cortex.runtime.generation import _eos_ids, generate_tokens

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = LocalModel.load(folder, device="cpu", terminal=False)
    ids = list(tokenizer(prompt)["input_ids"])
    return tuple(generate_tokens(model, ids, max_tokens, eos_token_ids=_eos_ids(tokenizer, model.config)))


def start_swarm(root: Path, folder: Path, layout: list[list[str]]) -> LocalSwarm:
    swarm = LocalSwarm(root, folder, layout, call_timeout_s=CALL_TIMEOUT_S)
    asyncio.run(swarm.start())
    return swarm


def live_fragments(swarm: LocalSwarm) -> set[str]:
    return {f for node in swarm.nodes if node.process and node.process.poll() is None for f in node.fragments}


async def open_client(swarm: LocalSwarm, root: Path) -> SwarmClient:
    """Start a bus client and wait until its view lists every live node's fragments as loaded by that node.

    Every head holder must be in the client's view before it submits: the client seals the
    prompt only to the head holders in its view, and a takeover needs a second one that can read.
    """
    client = SwarmClient(root, swarm.client_transport_factory())
    await client.start()
    model_id = client.resolve_model(str(swarm.model_dir))
    await client.wait_for_model(model_id, live_fragments(swarm), 60.0)
    live = [node for node in swarm.nodes if node.process is not None and node.process.poll() is None]
    deadline = time.monotonic() + 60.0
    while not all(node.peer_id in client.registry.view.holders(model_id, fragment, wall_clock_ms()) for node in live for fragment in node.fragments):
        assert time.monotonic() < deadline, "the client did not see every live node's fragments within 60 s"
        await asyncio.sleep(0.1)
    return client


async def ask(client: SwarmClient, swarm: LocalSwarm, max_tokens: int, deadline_ms: int = 0, on_text: Any = None) -> RequestResult:
    model_id = client.resolve_model(str(swarm.model_dir))
    request_id = await client.submit(model_id, PROMPT, max_tokens, deadline_ms=deadline_ms)
    return await client.run(request_id, REQUEST_TIMEOUT_S, on_text)


def holders_of(swarm: LocalSwarm, fragment: str) -> list[int]:
    return [node.index for node in swarm.nodes if fragment in node.fragments]


def pause(swarm: LocalSwarm, indexes: list[int], paused: bool) -> None:
    """SIGSTOP (or SIGCONT) the node processes: a holder that stops answering without dying."""
    for index in indexes:
        process = swarm.nodes[index].process
        assert process is not None and process.poll() is None
        os.kill(process.pid, signal.SIGSTOP if paused else signal.SIGCONT)


async def join(swarm: LocalSwarm, fragments: list[str], wait: bool = True) -> SwarmNode:
    """Start a new node (a fresh key and data directory) holding `fragments`; return it.

    A restart with the stopped node's key is covered by the bus tests
    (`test_restart_with_same_key_is_heard`), so this helper uses a fresh key and these tests
    depend only on the degraded-mode rules.
    """
    from cortex.bus.libp2p_transport import free_port_address

    index = len(swarm.nodes)
    data_dir = swarm.root / f"node{index}"
    identity = Identity.load_or_create(data_dir / "node.key")
    node = SwarmNode(index, data_dir, identity.peer_id, list(fragments), free_port_address(quic=False))
    swarm.nodes.append(node)
    swarm._spawn(node)  # the launcher's own start of one node, as in LocalSwarm.start
    if wait:
        await swarm._wait_serving(node)
    return node


async def wait_loaded(client: SwarmClient, swarm: LocalSwarm, node: SwarmNode, timeout_s: float = 60.0) -> None:
    """Wait until the client's view shows `node` live with every fragment of it loaded."""
    model_id = client.resolve_model(str(swarm.model_dir))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        coverage = client.registry.view.coverage(model_id, wall_clock_ms())
        if all(node.peer_id in coverage[f].loaded for f in node.fragments if f in coverage):
            if all(f in coverage for f in node.fragments):
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"node {node.index} did not show its fragments as loaded within {timeout_s} s")


def stop(swarm: LocalSwarm, index: int, kill: bool) -> None:
    """SIGKILL (a crash) or SIGTERM (a clean leave) node `index` and wait for it to exit."""
    process = swarm.nodes[index].process
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()
            process.wait()


def assert_swarm_served(swarm: LocalSwarm, result: RequestResult) -> None:
    """Assert the request completed, not degraded, with expert outputs from remote holders of those experts."""
    assert result.failed is None, result.failed
    assert result.completed is not None
    assert result.completed.degraded is False, result.completed.degraded_reason
    assert result.route, "a swarm answer has a route of block holders"
    fragments_of = {node.peer_id: set(node.fragments) for node in swarm.nodes}
    block_holders = set(result.route.values())
    records = [r for node in swarm.nodes if node.peer_id in block_holders for r in expert_records(node.data_dir, {result.request_id})]
    assert records, "no expert output of this request is in the block holders' logs"
    for record in records:
        assert record.author not in block_holders
        assert f"expert[{record.layer}][{record.expert}]" in fragments_of[record.author]


def accepted_by(store: LogStore, request_id: str) -> list[tuple[str, RequestAccepted]]:
    """Return (author, body) of every RequestAccepted of the request in `store`, in log order."""
    return [
        (event.author, event.body)
        for event in store.events(type="RequestAccepted")
        if isinstance(event.body, RequestAccepted) and event.body.request_id == request_id
    ]
