"""Failures during a request: a stalled or killed driver, lost expert holders. The text never switches models.

Two nodes hold the head and every block, two others hold every expert each (two replicas, so
one slow call moves to the other replica). The tests run in order on one swarm:

1. SIGSTOP the request's driver when the first text reaches the submitter and SIGCONT it once
   the other head holder took the request over: the stalled driver stops driving it, and the
   submitter gets the reference tokens, exactly as many as requested.
2. SIGSTOP the driver the submitter chooses just before the submission and SIGCONT it once
   the other head holder accepted the request: the stalled node never accepts it.
3. SIGKILL the request's driver when the first text reaches the submitter: the other head
   holder takes the request over once the driver is silent, replays the prompt and the
   streamed tokens, and streams on from the next step.
4. SIGKILL every expert holder at the first text, then start a new one: the driver waits,
   replays, and the answer equals the reference.
5. SIGKILL every expert holder at the first text with none to come back: the request fails at
   its deadline with `deadline_exceeded`, after streaming only swarm tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from degraded_helpers import PROMPT, accepted_by, join, open_client, pause, reference_tokens, start_swarm, stop

import cortex.scheduler  # noqa: F401 - registers the request event types
from cortex.node.client import SwarmClient
from cortex.node.launcher import LocalSwarm, SwarmNode
from cortex.node.node import LATE_REQUEST_WAIT_S
from cortex.runtime.loader import Loader
from cortex.scheduler import RequestAccepted, RequestCompleted, TokenGenerated
from events import LogStore

pytestmark = pytest.mark.slow

MAX_TOKENS = 48
STALL_TOKENS = 160  # long enough that the stalled driver learns of the takeover well before the end
STOPPED_DRIVER_LINE = "stopping this node's driver of it"
LATE_REQUEST_LINE = "has no driver here yet; waiting"


@pytest.fixture(scope="module")
def swarm(degraded_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    loader = Loader(degraded_checkpoint, device="cpu")
    block = f"block[0:{loader.num_layers}]"
    experts = [f"expert[{layer}][{index}]" for layer in loader.moe_layers for index in range(loader.num_experts)]
    swarm = start_swarm(tmp_path_factory.mktemp("takeover-swarm"), degraded_checkpoint, [["head", block], ["head", block], experts, experts])
    try:
        yield swarm
    finally:
        asyncio.run(swarm.stop())


async def test_stalled_driver_stops_after_its_takeover(swarm: LocalSwarm, tmp_path: Path) -> None:
    client = await open_client(swarm, tmp_path)
    request: list[str] = []
    paused: list[int] = []
    resumed: list[asyncio.Task[None]] = []

    def on_text(piece: str) -> None:
        if paused:
            return
        driver = accepted_by(client.store, request[0])[0][0]
        index = next(node.index for node in swarm.nodes if node.peer_id == driver)
        pause(swarm, [index], paused=True)
        paused.append(index)
        # Keep the driver stopped until the successor's acceptance reaches the submitter, so the
        # takeover happened while the driver was silent.
        taken_over = lambda: any(body.takeover_of == driver for _, body in accepted_by(client.store, request[0]))  # noqa: E731
        resumed.append(asyncio.ensure_future(_resume_once(swarm, index, taken_over)))

    try:
        request.append(await client.submit(client.resolve_model(str(swarm.model_dir)), PROMPT, STALL_TOKENS))
        result = await client.run(request[0], 180.0, on_text)
        if resumed:
            await resumed[0]
        accepted = accepted_by(client.store, request[0])
    finally:
        await _stop_client(client, swarm, paused, resumed)

    assert paused, "no text arrived before the end, so the stall did not land mid-stream"
    stalled = swarm.nodes[paused[0]]
    successor = next(node.peer_id for node in swarm.nodes if "head" in node.fragments and node.peer_id != stalled.peer_id)
    assert [author for author, _ in accepted] == [stalled.peer_id, successor]
    assert accepted[1][1].takeover_of == stalled.peer_id
    assert result.failed is None, result.failed
    assert result.completed is not None and result.completed.degraded is False
    assert result.driver == successor
    assert result.token_ids == list(reference_tokens(swarm.model_dir, PROMPT, STALL_TOKENS))
    assert len(result.token_ids) == STALL_TOKENS

    # Once running again, the stalled driver learns of the takeover and stops: it logs that it
    # stops, it streams no step up to the end, and the only end of the request in its log is
    # the successor's.
    deadline = time.monotonic() + 30.0
    while True:
        log = stalled.log_path.read_text()
        ends = _logged(stalled, RequestCompleted, request[0])
        if (STOPPED_DRIVER_LINE in log and ends) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert STOPPED_DRIVER_LINE in log, log[-3000:]
    assert request[0][:12] in log.split(STOPPED_DRIVER_LINE)[0].splitlines()[-1]
    assert [author for author, _ in ends] == [successor]
    streamed = [body for author, body in _logged(stalled, TokenGenerated, request[0]) if author == stalled.peer_id]
    assert streamed, "the stalled driver streamed nothing before the stall"
    assert max(body.step_stop for body in streamed) < STALL_TOKENS


async def test_driver_stalled_before_accepting_never_accepts(swarm: LocalSwarm, tmp_path: Path) -> None:
    import cortex.node.client as client_module

    client = await open_client(swarm, tmp_path)
    paused: list[int] = []
    resumed: list[asyncio.Task[None]] = []
    request: list[str] = []
    choose = client_module.prompt_readers

    def stop_the_chosen_driver(*args: object, **kwargs: object) -> list[str]:
        # Stop the driver the submitter chooses just before the submission goes out, so the
        # request reaches it only once it runs again, after another peer accepted it.
        readers = choose(*args, **kwargs)  # type: ignore[arg-type]
        index = next(node.index for node in swarm.nodes if node.peer_id == readers[0])
        pause(swarm, [index], paused=True)
        paused.append(index)
        accepted = lambda: bool(accepted_by(client.store, request[0])) if request else False  # noqa: E731
        resumed.append(asyncio.ensure_future(_resume_once(swarm, index, accepted)))
        return readers

    client_module.prompt_readers = stop_the_chosen_driver  # type: ignore[assignment]
    try:
        request.append(await client.submit(client.resolve_model(str(swarm.model_dir)), PROMPT, MAX_TOKENS))
        client_module.prompt_readers = choose
        result = await client.run(request[0], 180.0)
        await resumed[0]
        accepted = accepted_by(client.store, request[0])
    finally:
        client_module.prompt_readers = choose
        await _stop_client(client, swarm, paused, resumed)

    stalled = swarm.nodes[paused[0]]
    successor = next(node.peer_id for node in swarm.nodes if "head" in node.fragments and node.peer_id != stalled.peer_id)
    assert result.failed is None, result.failed
    assert result.completed is not None and result.completed.degraded is False
    assert result.driver == successor
    assert result.token_ids == list(reference_tokens(swarm.model_dir, PROMPT, MAX_TOKENS))
    assert [(author, body.takeover_of) for author, body in accepted] == [(successor, "")]

    # Running again, the stalled node gets the submission late, waits for a takeover, finds the
    # successor's acceptance and never accepts the request itself.
    deadline = time.monotonic() + 30.0
    while LATE_REQUEST_LINE not in stalled.log_path.read_text() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    log = stalled.log_path.read_text()
    assert LATE_REQUEST_LINE in log, log[-3000:]
    assert request[0][:12] in log.split(LATE_REQUEST_LINE)[0].splitlines()[-1]
    await asyncio.sleep(LATE_REQUEST_WAIT_S + 1.0)
    assert [author for author, _ in _logged(stalled, RequestAccepted, request[0])] == [successor]


async def _resume_once(swarm: LocalSwarm, index: int, ready: Callable[[], bool]) -> None:
    """SIGCONT node `index` once `ready()` holds, or after 60 s; never leave the process stopped."""
    try:
        deadline = time.monotonic() + 60.0
        while not ready() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        _resume(swarm, [index])


def _resume(swarm: LocalSwarm, indexes: list[int]) -> None:
    pause(swarm, [index for index in indexes if swarm.nodes[index].process.poll() is None], paused=False)  # type: ignore[union-attr]


async def _stop_client(client: SwarmClient, swarm: LocalSwarm, paused: list[int], resumed: list[asyncio.Task[None]]) -> None:
    for task in resumed:
        task.cancel()
    _resume(swarm, paused)
    await client.stop()


def _logged(node: SwarmNode, kind: type, request_id: str) -> list[tuple[str, Any]]:
    """Return (author, body) of the request's events of type `kind` in the log of `node`."""
    store = LogStore(node.data_dir / "events.db")
    try:
        return [
            (event.author, event.body)
            for event in store.events(type=kind.__name__)
            if isinstance(event.body, kind) and event.body.request_id == request_id
        ]
    finally:
        store.close()


async def test_driver_killed_mid_stream_is_taken_over(swarm: LocalSwarm, tmp_path: Path) -> None:
    client = await open_client(swarm, tmp_path)
    request: list[str] = []
    killed: list[str] = []

    def on_text(piece: str) -> None:
        if killed:
            return
        driver = accepted_by(client.store, request[0])[0][0]
        swarm.kill(next(node.index for node in swarm.nodes if node.peer_id == driver))
        killed.append(driver)

    try:
        request.append(await client.submit(client.resolve_model(str(swarm.model_dir)), PROMPT, MAX_TOKENS))
        result = await client.run(request[0], 180.0, on_text)
        accepted = accepted_by(client.store, request[0])
        batches = [
            (event.author, event.body)
            for event in client.store.events(type="TokenGenerated")
            if isinstance(event.body, TokenGenerated) and event.body.request_id == request[0]
        ]
    finally:
        await client.stop()

    assert killed, "no text arrived before the end, so the kill did not land mid-stream"
    assert result.failed is None, result.failed
    assert result.completed is not None and result.completed.degraded is False
    streamed = [(author[-6:], body.step_start, body.step_stop) for author, body in batches]
    assert result.token_ids == list(reference_tokens(swarm.model_dir, PROMPT, MAX_TOKENS)), (accepted, streamed)

    successor = next(node.peer_id for node in swarm.nodes if "head" in node.fragments and node.peer_id != killed[0])
    assert [author for author, _ in accepted] == [killed[0], successor]
    assert accepted[1][1].takeover_of == killed[0]
    assert result.driver == successor

    # The log shows the kill mid-stream, and no step streamed twice.
    before = sorted((body.step_start, body.step_stop) for author, body in batches if author == killed[0])
    after = sorted((body.step_start, body.step_stop) for author, body in batches if author == successor)
    assert before and after
    assert before[0][0] == 0
    assert after[0][0] == before[-1][1]
    assert 0 < after[0][0] < len(result.token_ids)
    ranges = before + after
    assert all(first[1] == second[0] for first, second in zip(ranges, ranges[1:]))
    assert ranges[-1][1] == len(result.token_ids)


def _expert_holders(swarm: LocalSwarm) -> list[int]:
    return [
        node.index for node in swarm.nodes
        if "head" not in node.fragments and node.process is not None and node.process.poll() is None
    ]


async def test_lost_expert_holder_after_the_first_token_is_waited_for(swarm: LocalSwarm, tmp_path: Path) -> None:
    client = await open_client(swarm, tmp_path)
    holders = _expert_holders(swarm)
    killed: list[int] = []
    joined: list[asyncio.Task[object]] = []

    def on_text(piece: str) -> None:
        if not killed:
            for holder in holders:
                stop(swarm, holder, kill=True)
            killed.extend(holders)
            joined.append(asyncio.ensure_future(join(swarm, swarm.nodes[holders[0]].fragments)))

    try:
        request_id = await client.submit(client.resolve_model(str(swarm.model_dir)), PROMPT, MAX_TOKENS, deadline_ms=150_000)
        result = await client.run(request_id, 180.0, on_text)
        accepted = accepted_by(client.store, request_id)
        await asyncio.gather(*joined)
    finally:
        await client.stop()
    assert killed, "no text arrived before the end, so the kill did not land mid-stream"
    assert result.failed is None, result.failed
    assert result.completed is not None and result.completed.degraded is False
    assert result.token_ids == list(reference_tokens(swarm.model_dir, PROMPT, MAX_TOKENS))
    assert len(accepted) == 1, "accepted once: no switch to the fallback model"
    assert accepted[0][1].route


async def test_lost_expert_holder_after_the_first_token_fails_at_the_deadline(swarm: LocalSwarm, tmp_path: Path) -> None:
    client = await open_client(swarm, tmp_path)
    holders = _expert_holders(swarm)
    killed: list[int] = []

    def on_text(piece: str) -> None:
        if not killed:
            for holder in holders:
                stop(swarm, holder, kill=True)
            killed.extend(holders)

    try:
        request_id = await client.submit(client.resolve_model(str(swarm.model_dir)), PROMPT, MAX_TOKENS, deadline_ms=12_000)
        result = await client.run(request_id, 120.0, on_text)
    finally:
        await client.stop()
    assert killed
    assert result.completed is None
    assert result.failed is not None and result.failed.reason_code == "deadline_exceeded", result.failed
    reference = list(reference_tokens(swarm.model_dir, PROMPT, MAX_TOKENS))
    assert 0 < len(result.token_ids) < len(reference)
    assert result.token_ids == reference[: len(result.token_ids)], "only the swarm model's tokens were streamed"
