"""Degraded mode in one process: the config default, the fallback driver, and reading a streamed text back."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cortex.commands.generate import DEMO_MODEL_DIR
from cortex.driver.fallback import FallbackModel
from cortex.driver.requests import DriverContext, RequestDriver
from cortex.driver.takeover import UnreadableStream, streamed_tokens, takeover_due
from cortex.node.driving import takeover_of
from cortex.node.config import parse_config
from cortex.bus.memory import MemoryNetwork, MemoryTransport
from cortex.node.client import SwarmClient
from cortex.privacy import open_json, seal, seal_json
from cortex.scheduler import RequestAccepted, RequestCompleted, RequestFailed, RequestSubmitted, TokenGenerated
from cortex.scheduler.content import TokenBatcher
from cortex.registry import RegistryReducer
from cortex.scheduler.request_events import plan_digest, request_id_for
from cortex.scheduler.view import fold
from events import Event, Identity, LogStore, PeerHeartbeat, PeerJoined, ShardLoaded, sign_event

SUBMITTER = Identity.generate()
NODE = Identity.generate()
PROMPT = "Return the number of items in the"


def test_fallback_model_defaults_to_the_demo_model_and_null_or_none_turns_it_off() -> None:
    assert parse_config({}, Path("/tmp")).fallback_model == DEMO_MODEL_DIR
    assert parse_config({"fallback_model": None}, Path("/tmp")).fallback_model is None
    assert parse_config({"fallback_model": "none"}, Path("/tmp")).fallback_model is None
    assert parse_config({"fallback_model": "light"}, Path("/tmp")).fallback_model == Path("/tmp/light")


def _submitted(max_tokens: int) -> Event:
    body = RequestSubmitted(
        secrets.token_hex(16), "ab" * 32, max_tokens, len(PROMPT.encode()), sealed_prompt=seal(PROMPT.encode(), [SUBMITTER.peer_id, NODE.peer_id])
    )
    return sign_event(SUBMITTER, body, seq=1, lamport=1, time_ms=1_000)


def _context(fallback: FallbackModel | None, emitted: list[Any], settled: Callable[[], Awaitable[None]] | None = None) -> DriverContext:
    async def emit(body: Any, refs: tuple[str, ...]) -> Event:
        emitted.append(body)
        return sign_event(NODE, body, seq=len(emitted), lamport=len(emitted), time_ms=2_000)

    context = DriverContext(
        identity=NODE, emit=emit, model_id="ab" * 32, head=None, tokenizer=None, eos_token_ids=[], geometry=None,
        compute=_inline, planning=lambda own: None,  # type: ignore[arg-type,return-value]
        record=lambda request_id: None, executor_for=lambda spec, holder: None,  # type: ignore[arg-type,return-value]
        records_of=lambda request_id: [], fallback=fallback,
    )
    if settled is not None:
        context.settled = settled
    return context


async def _inline(function: Any, *args: Any) -> Any:
    import torch

    with torch.inference_mode():
        return function(*args)


async def test_fallback_driver_accepts_after_catch_up() -> None:
    # A driver woken after a stall waits until its node caught up before it accepts. A
    # successor's acceptance arriving meanwhile cancels it, so it never accepts a second time.
    emitted: list[Any] = []
    gate = asyncio.Event()
    waiting = asyncio.Event()

    async def settled() -> None:
        waiting.set()
        await gate.wait()

    context = _context(FallbackModel(DEMO_MODEL_DIR, "cpu", "float32", _inline), emitted, settled)
    cancelled = asyncio.ensure_future(RequestDriver(context, _submitted(4)).run())
    await asyncio.wait_for(waiting.wait(), 10.0)
    assert emitted == []
    cancelled.cancel()
    await asyncio.wait({cancelled})
    assert emitted == []

    # Once caught up, it accepts before it loads the fallback model.
    waiting.clear()
    gate.set()
    going = asyncio.ensure_future(RequestDriver(context, _submitted(4)).run())
    await asyncio.wait_for(waiting.wait(), 10.0)
    for _ in range(100):
        if emitted:
            break
        await asyncio.sleep(0.01)
    going.cancel()
    await asyncio.wait({going})
    assert [type(body) for body in emitted[:1]] == [RequestAccepted]


@pytest.mark.slow
async def test_a_node_without_the_head_answers_with_its_fallback_model_marked_degraded() -> None:
    from cortex.runtime.engine import LocalModel
    from cortex.runtime.generation import _eos_ids, generate_tokens
    from transformers import AutoTokenizer

    emitted: list[Any] = []
    submitted = _submitted(12)
    await RequestDriver(_context(FallbackModel(DEMO_MODEL_DIR, "cpu", "float32", _inline), emitted), submitted).run()

    accepted = [body for body in emitted if isinstance(body, RequestAccepted)]
    assert len(accepted) == 1
    assert accepted[0].route == {}
    tokens = [token for body in emitted if isinstance(body, TokenGenerated) for token in open_json(body.sealed_tokens, SUBMITTER)["token_ids"]]
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL_DIR), local_files_only=True)
    model = LocalModel.load(DEMO_MODEL_DIR, device="cpu", terminal=False)
    expected = list(generate_tokens(model, tokenizer(PROMPT)["input_ids"], 12, eos_token_ids=_eos_ids(tokenizer, model.config)))
    assert tokens == expected
    completed = emitted[-1]
    assert isinstance(completed, RequestCompleted)
    assert completed.degraded and completed.degraded_reason.startswith("no_head_holder:")
    assert completed.completion_tokens == len(expected)
    assert completed.request_id == request_id_for(SUBMITTER.peer_id, submitted.body.nonce)


async def test_without_a_fallback_model_the_request_fails_with_the_reason() -> None:
    emitted: list[Any] = []
    await RequestDriver(_context(None, emitted), _submitted(4)).run()
    assert len(emitted) == 1 and isinstance(emitted[0], RequestFailed)
    assert emitted[0].reason_code == "no_head_holder"
    assert "fallback_model is off" in emitted[0].message


def _batches(readers: tuple[str, ...]) -> list[TokenGenerated]:
    batcher = TokenBatcher("cd" * 32, readers, max_tokens=2)
    found = [batcher.add(token, f" t{token}", 0) for token in range(5)]
    return [batch for batch in [*found, batcher.flush()] if batch is not None]


def test_streamed_tokens_reads_the_batches_back_in_step_order() -> None:
    batches = _batches((SUBMITTER.peer_id, NODE.peer_id))
    assert streamed_tokens(reversed(batches), NODE) == ([0, 1, 2, 3, 4], " t0 t1 t2 t3 t4")
    assert streamed_tokens([], NODE) == ([], "")


def test_streamed_tokens_refuses_a_gap_or_a_batch_sealed_to_others() -> None:
    batches = _batches((SUBMITTER.peer_id, NODE.peer_id))
    with pytest.raises(UnreadableStream, match="steps from 2 on are missing"):
        streamed_tokens([batches[0], batches[2]], NODE)
    with pytest.raises(UnreadableStream, match="cannot be opened"):
        streamed_tokens(_batches((SUBMITTER.peer_id,)), NODE)


def test_unserved_fragments_message_sorts_and_counts() -> None:
    from cortex.driver.requests import unserved_fragments_message

    missing = ["expert[10][0]", "block[8:16]", "expert[2][3]", "expert[2][11]", "head", "block[0:8]"]
    message = unserved_fragments_message(missing)
    assert message == "6 fragment(s) have no live holder: block[0:8], block[8:16], expert[2][3], expert[2][11] and 2 more"
    assert unserved_fragments_message(["head"]) == "1 fragment(s) have no live holder: head"


def test_streamed_tokens_joins_overlapping_drivers() -> None:
    readers = (SUBMITTER.peer_id, NODE.peer_id)
    first = _batches(readers)[:2]  # steps 0 to 3, by the first driver
    # The next driver missed the second batch: it replays from step 2 with boundaries of its own.
    batcher = TokenBatcher("cd" * 32, readers, max_tokens=3, next_step=2)
    second = [batch for batch in [*(batcher.add(token, f" t{token}", 0) for token in range(2, 7)), batcher.flush()] if batch]
    assert [(batch.step_start, batch.step_stop) for batch in second] == [(2, 5), (5, 7)]

    assert streamed_tokens([*second, *first], NODE) == ([0, 1, 2, 3, 4, 5, 6], " t0 t1 t2 t3 t4 t5 t6")


HEAD_HOLDER = Identity.generate()


def _joined(identity: Identity, heartbeat_ms: int) -> list[Event]:
    joined = PeerJoined(("/ip4/127.0.0.1/tcp/4001",), "tcp://127.0.0.1:5555", identity.curve_public_key.decode(), {"cpus": 2}, "1.0", "0.1.0")
    return [
        sign_event(identity, joined, seq=1, lamport=1, time_ms=1_000),
        sign_event(identity, ShardLoaded("ab" * 32, "head", 10), seq=2, lamport=2, time_ms=1_000),
        sign_event(identity, PeerHeartbeat(2), seq=3, lamport=3, time_ms=heartbeat_ms),
    ]


def test_takeover_unreadable_prompt_ends_request(tmp_path: Path) -> None:
    # The submitter knew only NODE when it submitted, so the prompt is sealed to NODE alone.
    # NODE accepts and goes silent, and HEAD_HOLDER, live, cannot open the prompt.
    submitted = _submitted(4)
    request_id = request_id_for(SUBMITTER.peer_id, submitted.body.nonce)
    accepted = sign_event(NODE, RequestAccepted(request_id, {}, {}, 0, plan_digest({}, {}, 0)), seq=4, lamport=4, time_ms=1_500, refs=(submitted.id,))
    events = [*_joined(NODE, 1_000), *_joined(HEAD_HOLDER, 17_000), submitted, accepted]
    registry = RegistryReducer().empty()
    for event in events:
        registry = RegistryReducer().apply(registry, event)
    record = fold(events).requests[request_id]
    store = LogStore(tmp_path / "events.db")
    for event in events:
        store.append(event)

    # Silent (5 s) but still live (15 s), NODE may only be stalled: nothing is due yet.
    assert takeover_due(registry, record, HEAD_HOLDER.peer_id, 7_000) is None
    assert takeover_due(registry, record, HEAD_HOLDER.peer_id, 17_000) == NODE.peer_id
    found = takeover_of(registry, store, record, HEAD_HOLDER, 17_000)

    assert found is not None
    assert found[0].id == submitted.id
    assert found[1] == (
        f"the driver {NODE.peer_id} stopped and no live peer can open the prompt "
        f"(the submitter sealed it to {NODE.peer_id}); submit the request again"
    )


def test_takeover_waits_for_a_reader_live_elsewhere() -> None:
    # The prompt is sealed to NODE, the driver, and READER. NODE died, and READER's heartbeats
    # are 6 s late here: READER is silent but live, so HEAD_HOLDER, which cannot read, waits.
    reader = Identity.generate()
    body = RequestSubmitted(
        secrets.token_hex(16), "ab" * 32, 4, len(PROMPT.encode()),
        sealed_prompt=seal(PROMPT.encode(), [SUBMITTER.peer_id, NODE.peer_id, reader.peer_id]),
    )  # fmt: skip
    submitted = sign_event(SUBMITTER, body, seq=1, lamport=1, time_ms=1_000)
    request_id = request_id_for(SUBMITTER.peer_id, body.nonce)
    accepted = sign_event(NODE, RequestAccepted(request_id, {}, {}, 0, plan_digest({}, {}, 0)), seq=4, lamport=4, time_ms=1_500, refs=(submitted.id,))
    events = [*_joined(NODE, 1_000), *_joined(reader, 2_000), *_joined(HEAD_HOLDER, 17_000), submitted, accepted]
    registry = RegistryReducer().empty()
    for event in events:
        registry = RegistryReducer().apply(registry, event)
    record = fold(events).requests[request_id]

    assert takeover_due(registry, record, HEAD_HOLDER.peer_id, 8_000) is None
    assert takeover_due(registry, record, HEAD_HOLDER.peer_id, 17_500) == NODE.peer_id


def _token_event(author: Identity, seq: int, start: int, tokens: list[int], reader: str) -> Event:
    texts = [f" t{token}" for token in tokens]
    ends = [sum(len(text) for text in texts[: index + 1]) for index in range(len(texts))]
    sealed = seal_json({"token_ids": tokens, "text": "".join(texts), "text_ends": ends}, [reader])
    return sign_event(author, TokenGenerated("cd" * 32, start, start + len(tokens), sealed), seq=seq, lamport=seq, time_ms=2_000 + seq)


async def test_client_run_counts_steps_below_completion(tmp_path: Path) -> None:
    # A stalled first driver streamed steps 0 to 3 and 6 to 7 of a longer output. The new
    # driver replays from step 2 and completes with 6 tokens. Steps 6 and 7 must not count
    # toward the 6, or the client would stop before the new driver's steps 4 and 5 arrive.
    client = SwarmClient(tmp_path, lambda identity, data_dir: MemoryTransport(MemoryNetwork(), identity.peer_id))
    me = client.identity.peer_id
    other = Identity.generate()
    request_id = "cd" * 32
    queue: asyncio.Queue[Event] = asyncio.Queue()
    client._queues[request_id] = queue
    completed = RequestCompleted(request_id, 0, 6, "length", {"total": 10}, "ab" * 32, 0)
    for event in [
        _token_event(NODE, 1, 0, [0, 1, 2, 3], me),
        _token_event(NODE, 2, 6, [6, 7], me),
        _token_event(other, 1, 2, [2, 3], me),
        sign_event(other, completed, seq=3, lamport=3, time_ms=3_000),
    ]:
        queue.put_nowait(event)
    later = _token_event(other, 2, 4, [4, 5], me)
    asyncio.get_running_loop().call_later(0.3, queue.put_nowait, later)

    result = await client.run(request_id, 5.0)

    assert result.completed == completed
    assert result.token_ids[:6] == [0, 1, 2, 3, 4, 5]
    assert result.text.startswith(" t0 t1 t2 t3 t4 t5")
