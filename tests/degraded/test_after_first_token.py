"""Failures during a request: a stalled or killed driver, lost expert holders. The text never switches models.

Two nodes hold the head and every block, two others hold every expert each (two replicas, so
one slow call moves to the other replica). The tests run in order on one swarm:

1. SIGSTOP the request's driver when the first token batch reaches the submitter, and
   SIGCONT it once the other head holder took the request over: the stalled driver stops
   driving it, and the submitter gets the reference tokens, exactly as many as requested.
2. SIGSTOP the driver the submitter chooses just before the submission and SIGCONT it once
   the other head holder accepted the request: the stalled node never accepts it.
3. SIGSTOP the head holder that does not drive, and SIGCONT it once the request ended and the
   driver looks silent in its stale view: it takes nothing over.
4. SIGKILL the request's driver when the first token batch reaches the submitter: the other
   head holder takes the request over once the driver is silent, replays the prompt and the
   streamed tokens, and streams on from the next step.
5. SIGKILL every expert holder at the first token batch, then start a new one: the driver
   waits, replays, and the tokens equal the reference.
6. SIGKILL every expert holder at the first token batch with none to come back: the request
   fails at its deadline with `deadline_exceeded`, after streaming only swarm tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from degraded_helpers import PROMPT, accepted_by, join, open_client, pause, reference_tokens, start_swarm

import cortex.scheduler  # noqa: F401 - registers the request event types
from cortex.node.client import RequestResult, SwarmClient
from cortex.node.launcher import LocalSwarm, SwarmNode
from cortex.driver.takeover import DRIVER_SILENCE_MS
from cortex.node.node import HEARTBEAT_S
from cortex.runtime.loader import Loader
from cortex.scheduler import RequestAccepted, RequestCompleted, TokenGenerated
from events import LogStore

pytestmark = pytest.mark.slow

MAX_TOKENS = 48
LONG_TOKENS = 160  # long enough that a failure at the first token batch lands well before the end
STOPPED_DRIVER_LINE = "so this node stops its driver of it"
STALL_LINE = "event loop was stopped for"
CAUGHT_UP_LINE = "caught up with peers"


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
    stall = _Stall(swarm)
    request: list[str] = []

    def stall_the_driver(driver: str) -> None:
        # Keep the driver stopped until the successor's acceptance reaches the submitter, so the
        # takeover happened while the driver was silent.
        stall.start(driver, lambda: any(body.takeover_of == driver for _, body in accepted_by(client.store, request[0])))

    result, accepted = await _run_with_stall(client, swarm, stall, request, LONG_TOKENS, stall_the_driver)
    assert stall.node is not None, "the driver logged no token batch before the end, so the stall did not land mid-stream"
    stalled = stall.node
    successor = next(node.peer_id for node in swarm.nodes if "head" in node.fragments and node.peer_id != stalled.peer_id)
    assert [author for author, _ in accepted] == [stalled.peer_id, successor]
    assert accepted[1][1].takeover_of == stalled.peer_id
    assert result.failed is None, result.failed
    assert result.completed is not None and result.completed.degraded is False
    assert result.driver == successor
    assert result.token_ids == list(reference_tokens(swarm.model_dir, PROMPT, LONG_TOKENS))
    assert len(result.token_ids) == LONG_TOKENS

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
    assert max(body.step_stop for body in streamed) < LONG_TOKENS


async def test_driver_stalled_before_accepting_never_accepts(swarm: LocalSwarm, tmp_path: Path) -> None:
    import cortex.node.client as client_module

    client = await open_client(swarm, tmp_path)
    stall = _Stall(swarm)
    request: list[str] = []
    choose = client_module.prompt_readers

    def stop_the_chosen_driver(*args: object, **kwargs: object) -> list[str]:
        # Stop the driver the submitter chooses just before the submission goes out, so the
        # request reaches it only once it runs again, after another peer accepted it.
        readers = choose(*args, **kwargs)  # type: ignore[arg-type]
        stall.start(readers[0], lambda: bool(request) and bool(accepted_by(client.store, request[0])))
        return readers

    client_module.prompt_readers = stop_the_chosen_driver
    try:
        request.append(await client.submit(client.resolve_model(str(swarm.model_dir)), PROMPT, MAX_TOKENS))
        client_module.prompt_readers = choose
        result = await client.run(request[0], 180.0)
        await stall.resumed()
        accepted = accepted_by(client.store, request[0])
    finally:
        client_module.prompt_readers = choose
        stall.end()
        await client.stop()

    assert stall.node is not None
    stalled = stall.node
    successor = next(node.peer_id for node in swarm.nodes if "head" in node.fragments and node.peer_id != stalled.peer_id)
    assert result.failed is None, result.failed
    assert result.completed is not None and result.completed.degraded is False
    assert result.driver == successor
    assert result.token_ids == list(reference_tokens(swarm.model_dir, PROMPT, MAX_TOKENS))
    assert [(author, body.takeover_of) for author, body in accepted] == [(successor, "")]

    # Running again, the stalled node finds it was stopped, catches up with its peers before it
    # drives the submission it got late, finds the successor's acceptance and never accepts the
    # request itself. Without the catch-up it would accept at once and become the driver.
    await _caught_up(stalled)
    assert [author for author, _ in _logged(stalled, RequestAccepted, request[0])] == [successor]


async def test_stalled_head_holder_takes_nothing_over(swarm: LocalSwarm, tmp_path: Path) -> None:
    client = await open_client(swarm, tmp_path)
    stall = _Stall(swarm)
    request: list[str] = []

    def stall_the_other_head_holder(driver: str) -> None:
        other = next(node.peer_id for node in swarm.nodes if "head" in node.fragments and node.peer_id != driver)
        # Keep the other head holder stopped longer than the driver's silence limit, until the
        # request ended: its view then shows the request in flight under a silent driver.
        stopped_at = time.monotonic()

        def ready() -> bool:
            completed = any(getattr(event.body, "request_id", None) == request[0] for event in client.store.events(type="RequestCompleted"))
            return completed and time.monotonic() - stopped_at > DRIVER_SILENCE_MS / 1000 + 1.0

        stall.start(other, ready)

    result, accepted = await _run_with_stall(client, swarm, stall, request, MAX_TOKENS, stall_the_other_head_holder)
    assert stall.node is not None, "the driver logged no token batch before the end, so the stall did not land mid-stream"
    stalled = stall.node
    assert result.failed is None, result.failed
    assert result.token_ids == list(reference_tokens(swarm.model_dir, PROMPT, MAX_TOKENS))
    # Running again, the node catches up with its peers before it checks for silent drivers, so
    # it takes nothing over. Without the catch-up it takes the finished request over from its
    # stale view.
    await _caught_up(stalled)
    assert [author for author, _ in accepted] == [result.driver]
    assert [author for author, _ in _logged(stalled, RequestAccepted, request[0])] == [result.driver]
    takeovers = [line for line in stalled.log_path.read_text().splitlines() if f"taking request {request[0][:12]} over" in line]
    assert takeovers == []


async def _run_with_stall(
    client: SwarmClient, swarm: LocalSwarm, stall: _Stall, request: list[str], max_tokens: int, action: Callable[[str], None]
) -> tuple[RequestResult, list[tuple[str, RequestAccepted]]]:
    """Submit PROMPT, run `action(driver)` at its first token batch, and return the result and acceptances.

    Waits until the stalled node runs again, and stops the client.
    """
    watch = _at_first_batch(swarm, request, action)
    try:
        request.append(await client.submit(client.resolve_model(str(swarm.model_dir)), PROMPT, max_tokens))
        result = await client.run(request[0], 180.0)
        await stall.resumed()
        return result, accepted_by(client.store, request[0])
    finally:
        watch.cancel()
        stall.end()
        await client.stop()


def _at_first_batch(swarm: LocalSwarm, request: list[str], action: Callable[[str], None]) -> asyncio.Task[None]:
    """Run `action(driver)` once a head holder's own log has a token batch it streamed for request[0].

    A driver logs each batch as it sends it, so the action lands mid-stream whatever gossip does.
    The text reaches the submitter only from step 0 on, and gossip can hold batches back, so a
    trigger on the submitter's side can land after the end.
    """

    async def watch() -> None:
        heads = [node for node in swarm.nodes if "head" in node.fragments and node.process is not None and node.process.poll() is None]
        stores = [(node.peer_id, LogStore(node.data_dir / "events.db")) for node in heads]
        try:
            deadline = time.monotonic() + 120.0
            while time.monotonic() < deadline:
                for peer_id, store in stores:
                    if request and any(
                        event.author == peer_id and isinstance(event.body, TokenGenerated) and event.body.request_id == request[0]
                        for event in store.events(type="TokenGenerated")
                    ):
                        action(peer_id)
                        return
                await asyncio.sleep(0.02)
        finally:
            for _, store in stores:
                store.close()

    return asyncio.ensure_future(watch())


async def _caught_up(node: SwarmNode) -> None:
    """Wait until `node` logged that it caught up after its last stall, and one heartbeat more."""
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        log = node.log_path.read_text()
        stall = log.rfind(STALL_LINE)
        if stall >= 0 and CAUGHT_UP_LINE in log[stall:]:
            await asyncio.sleep(HEARTBEAT_S + 0.5)
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"node {node.index} logged no stall and catch-up within 30 s: {node.log_path.read_text()[-3000:]}")


class _Stall:
    """SIGSTOPs one node process and SIGCONTs it once a condition holds; never leaves it stopped."""

    def __init__(self, swarm: LocalSwarm) -> None:
        self.swarm = swarm
        self.node: SwarmNode | None = None
        self._resume: asyncio.Task[None] | None = None

    def start(self, peer_id: str, ready: Callable[[], bool]) -> None:
        """Stop the node of `peer_id` now; resume it once `ready()` holds, or after 60 s."""
        self.node = next(node for node in self.swarm.nodes if node.peer_id == peer_id)
        pause(self.swarm, [self.node.index], paused=True)
        self._resume = asyncio.ensure_future(self._resume_when(ready))

    async def resumed(self) -> None:
        if self._resume is not None:
            await self._resume

    def end(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
        self._continue()

    async def _resume_when(self, ready: Callable[[], bool]) -> None:
        try:
            deadline = time.monotonic() + 60.0
            while not ready() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            self._continue()

    def _continue(self) -> None:
        if self.node is not None and self.node.process is not None and self.node.process.poll() is None:
            pause(self.swarm, [self.node.index], paused=False)


def _logged(node: SwarmNode, kind: type, request_id: str) -> list[tuple[str, Any]]:
    """Return (author, body) of the request's events of type `kind` in the log of `node`."""
    store = LogStore(node.data_dir / "events.db")
    try:
        return [
            (event.author, event.body)
            for event in store.events(type=kind.__name__)
            if isinstance(event.body, kind) and getattr(event.body, "request_id", None) == request_id
        ]
    finally:
        store.close()


async def test_driver_killed_mid_stream_is_taken_over(swarm: LocalSwarm, tmp_path: Path) -> None:
    client = await open_client(swarm, tmp_path)
    request: list[str] = []
    killed: list[str] = []

    def kill_the_driver(driver: str) -> None:
        swarm.kill(next(node.index for node in swarm.nodes if node.peer_id == driver))
        killed.append(driver)

    watch = _at_first_batch(swarm, request, kill_the_driver)
    try:
        request.append(await client.submit(client.resolve_model(str(swarm.model_dir)), PROMPT, LONG_TOKENS))
        result = await client.run(request[0], 180.0)
        accepted = accepted_by(client.store, request[0])
        batches = [
            (event.author, event.body)
            for event in client.store.events(type="TokenGenerated")
            if isinstance(event.body, TokenGenerated) and event.body.request_id == request[0]
        ]
    finally:
        watch.cancel()
        await client.stop()

    assert killed, "the driver logged no token batch before the end, so the kill did not land mid-stream"
    assert result.failed is None, result.failed
    assert result.completed is not None and result.completed.degraded is False
    streamed = [(author[-6:], body.step_start, body.step_stop) for author, body in batches]
    assert result.token_ids == list(reference_tokens(swarm.model_dir, PROMPT, LONG_TOKENS)), (accepted, streamed)

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


def _kill_all(swarm: LocalSwarm, indexes: list[int]) -> None:
    """SIGKILL the node processes all at once, then wait for each to exit."""
    processes = [swarm.nodes[index].process for index in indexes]
    for process in processes:
        if process is not None and process.poll() is None:
            process.kill()
    for process in processes:
        if process is not None:
            process.wait(timeout=30)


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
    request: list[str] = []

    def kill_the_expert_holders(driver: str) -> None:
        _kill_all(swarm, holders)
        killed.extend(holders)
        joined.append(asyncio.ensure_future(join(swarm, swarm.nodes[holders[0]].fragments)))

    watch = _at_first_batch(swarm, request, kill_the_expert_holders)
    try:
        request.append(await client.submit(client.resolve_model(str(swarm.model_dir)), PROMPT, LONG_TOKENS, deadline_ms=150_000))
        result = await client.run(request[0], 180.0)
        accepted = accepted_by(client.store, request[0])
        await asyncio.gather(*joined)
    finally:
        watch.cancel()
        await client.stop()
    assert killed, "the driver logged no token batch before the end, so the kill did not land mid-stream"
    assert result.failed is None, result.failed
    assert result.completed is not None and result.completed.degraded is False
    assert result.token_ids == list(reference_tokens(swarm.model_dir, PROMPT, LONG_TOKENS))
    assert len(accepted) == 1, "accepted once: no switch to the fallback model"
    assert accepted[0][1].route


async def test_lost_expert_holder_after_the_first_token_fails_at_the_deadline(swarm: LocalSwarm, tmp_path: Path) -> None:
    client = await open_client(swarm, tmp_path)
    holders = _expert_holders(swarm)
    killed: list[int] = []
    request: list[str] = []

    def kill_the_expert_holders(driver: str) -> None:
        _kill_all(swarm, holders)
        killed.extend(holders)

    watch = _at_first_batch(swarm, request, kill_the_expert_holders)
    try:
        request.append(await client.submit(client.resolve_model(str(swarm.model_dir)), PROMPT, LONG_TOKENS, deadline_ms=12_000))
        result = await client.run(request[0], 120.0)
    finally:
        watch.cancel()
        await client.stop()
    assert killed
    assert result.completed is None
    assert result.failed is not None and result.failed.reason_code == "deadline_exceeded", result.failed
    reference = list(reference_tokens(swarm.model_dir, PROMPT, LONG_TOKENS))
    assert 0 < len(result.token_ids) < len(reference)
    assert result.token_ids == reference[: len(result.token_ids)], "only the swarm model's tokens were streamed"
