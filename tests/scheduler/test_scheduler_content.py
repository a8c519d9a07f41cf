"""Request content: sealed submissions, prompts by digest, stop strings and token batches."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cortex.privacy import NotARecipient, SealedContentInvalid, seal_json
from cortex.scheduler import TokenGenerated
from cortex.scheduler import RequestSubmitted, request_id_for
from cortex.scheduler.content import (
    MAX_INLINE_PROMPT_CHARS,
    ContentError,
    OpenedBatch,
    StreamAssembler,
    TokenBatcher,
    open_prompt,
    open_stop,
    open_token_batch,
    open_tokens,
    prepare_submission,
    prompt_digest,
)
from events import Identity, decode_event, sign_event

SUBMITTER = Identity.generate()
DRIVER = Identity.generate()
OUTSIDER = Identity.generate()
NONCE = "3c" * 16


def prepare(prompt: str, stop: tuple[str, ...] = ()) -> RequestSubmitted:
    prepared = prepare_submission(SUBMITTER.peer_id, [DRIVER.peer_id], "model-1", prompt, max_tokens=8, nonce=NONCE, stop=stop)
    return prepared.body


def test_submission_inline_prompt() -> None:
    prepared = prepare_submission(
        SUBMITTER.peer_id,
        [DRIVER.peer_id],
        "model-1",
        "Once upon a time",
        max_tokens=8,
        nonce=NONCE,
        stop=["\n\n"],
        temperature=0.7,
        top_p=0.9,
        seed=5,
    )
    body = prepared.body

    assert prepared.request_id == request_id_for(SUBMITTER.peer_id, NONCE)
    assert prepared.data_plane_prompt is None
    assert body.temperature_milli == 700
    assert body.top_p_micro == 900_000
    assert body.prompt_bytes == 16
    assert open_prompt(body, DRIVER) == "Once upon a time"
    assert open_prompt(body, SUBMITTER) == "Once upon a time"
    assert open_stop(body, DRIVER) == ["\n\n"]
    with pytest.raises(NotARecipient):
        open_prompt(body, OUTSIDER)
    assert b"Once upon" not in sign_event(SUBMITTER, body, seq=1, lamport=1, time_ms=1).wire


def test_large_prompt_goes_by_digest() -> None:
    prompt = "word " * (MAX_INLINE_PROMPT_CHARS // 4)

    prepared = prepare_submission(SUBMITTER.peer_id, [DRIVER.peer_id], "model-1", prompt, max_tokens=8, nonce=NONCE)

    assert prepared.data_plane_prompt is not None
    assert prepared.body.sealed_prompt == ""
    assert prepared.body.prompt_digest == prompt_digest(prepared.data_plane_prompt)
    assert decode_event(sign_event(SUBMITTER, prepared.body, seq=1, lamport=1, time_ms=1).wire).body == prepared.body
    assert open_prompt(prepared.body, DRIVER, prepared.data_plane_prompt) == prompt
    with pytest.raises(ContentError, match="fetch its sealed text"):
        open_prompt(prepared.body, DRIVER)
    other = prepare_submission(SUBMITTER.peer_id, [DRIVER.peer_id], "model-1", prompt + "!", max_tokens=8, nonce=NONCE)
    with pytest.raises(ContentError, match="does not match the digest"):
        open_prompt(prepared.body, DRIVER, other.data_plane_prompt)


def test_stop_string_limits() -> None:
    with pytest.raises(ContentError, match="limit is 16"):
        prepare("hi", stop=("x",) * 17)
    with pytest.raises(ContentError, match="limit is 4096"):
        prepare("hi", stop=("x" * 4_097,))
    assert open_stop(prepare("hi"), DRIVER) == []


def test_batcher_by_count_and_time() -> None:
    batcher = TokenBatcher("ab" * 32, (SUBMITTER.peer_id, DRIVER.peer_id), interval_ms=50, max_tokens=3)

    assert batcher.add(1, "a", now_ms=0) is None
    assert batcher.add(2, "b", now_ms=10) is None
    first = batcher.add(3, "c", now_ms=20)
    assert batcher.add(4, "d", now_ms=30) is None
    second = batcher.add(5, "e", now_ms=80)
    assert batcher.add(6, "f", now_ms=90) is None
    last = batcher.flush()

    assert first is not None
    assert second is not None
    assert last is not None
    assert (first.step_start, first.step_stop) == (0, 3)
    assert (second.step_start, second.step_stop) == (3, 5)
    assert (last.step_start, last.step_stop) == (5, 6)
    assert open_tokens(first, SUBMITTER) == ([1, 2, 3], "abc")
    assert open_tokens(second, DRIVER) == ([4, 5], "de")
    assert open_tokens(last, DRIVER) == ([6], "f")
    assert batcher.flush() is None
    with pytest.raises(NotARecipient):
        open_tokens(first, OUTSIDER)


def test_batcher_rejects_oversized_batches() -> None:
    with pytest.raises(ValueError, match="1..1024"):
        TokenBatcher("ab" * 32, (DRIVER.peer_id,), max_tokens=2_000)


def test_open_tokens_checks_count() -> None:
    batch = TokenBatcher("ab" * 32, (DRIVER.peer_id,), max_tokens=2)
    batch.add(1, "a", now_ms=0)
    body = batch.add(2, "b", now_ms=0)
    assert body is not None

    with pytest.raises(SealedContentInvalid, match="hold 2 ids for steps 0 to 3"):
        open_tokens(replace(body, step_stop=3), DRIVER)


def _stream(texts: list[str], start: int = 0, max_tokens: int = 2) -> list[OpenedBatch]:
    """Batch tokens start, start + 1, ... with these texts; return the batches as the submitter opens them."""
    batcher = TokenBatcher("ab" * 32, (SUBMITTER.peer_id,), max_tokens=max_tokens, next_step=start)
    bodies = [batcher.add(start + index, text, now_ms=0) for index, text in enumerate(texts)]
    return [open_token_batch(body, SUBMITTER) for body in [*bodies, batcher.flush()] if body is not None]


def test_batches_carry_where_each_token_text_ends() -> None:
    (batch,) = _stream(["He", "llo", "", " world"], max_tokens=4)

    assert batch.text == "Hello world"
    assert batch.text_ends == [2, 5, 5, 11]
    assert batch.tail(2) == ([2, 3], " world")
    assert batch.tail(1) == ([1, 2, 3], "llo world")


def test_assembler_joins_batches_in_step_order() -> None:
    batches = _stream(["a", "b", "c", "d", "e"])
    stream = StreamAssembler()

    assert stream.add(batches[2]) == []
    assert stream.add(batches[1]) == []
    assert stream.add(batches[0]) == [([0, 1], "ab"), ([2, 3], "cd"), ([4], "e")]
    assert (stream.token_ids, stream.text, stream.conflicts) == ([0, 1, 2, 3, 4], "abcde", [])


def test_assembler_continues_from_replayed_steps() -> None:
    # The first driver streamed steps 0 to 3, and the next one replays from step 1 in batches of 3.
    first = _stream(["a", "b", "c", "d"])
    second = _stream(["b", "c", "d", "e", "f"], start=1, max_tokens=3)
    assert [(batch.step_start, batch.step_stop) for batch in second] == [(1, 4), (4, 6)]
    stream = StreamAssembler()
    for batch in first:
        stream.add(batch)

    assert stream.add(second[1]) == [([4, 5], "ef")]
    assert stream.add(second[0]) == []
    assert (stream.token_ids, stream.text, stream.conflicts) == ([0, 1, 2, 3, 4, 5], "abcdef", [])


def test_assembler_cuts_overlapping_batch() -> None:
    first = _stream(["a", "b", "c"], max_tokens=3)
    replay = _stream(["a", "b", "c", "d", "e"], max_tokens=5)
    stream = StreamAssembler()
    stream.add(first[0])

    assert stream.add(replay[0]) == [([3, 4], "de")]
    assert stream.text == "abcde"


def test_assembler_reports_steps_where_two_drivers_differ() -> None:
    first = _stream(["a", "b"])
    other = open_token_batch(TokenGenerated("ab" * 32, 0, 3, seal_json({"token_ids": [0, 9, 2], "text": "aXc", "text_ends": [1, 2, 3]}, [SUBMITTER.peer_id])), SUBMITTER)
    stream = StreamAssembler()
    stream.add(first[0])

    assert stream.add(other) == [([2], "c")]
    assert stream.conflicts == [1]
    assert stream.token_ids == [0, 1, 2]


def test_assembler_without_text_ends_waits() -> None:
    # A batch from a driver that sends no text ends cannot be cut inside.
    old = open_token_batch(TokenGenerated("ab" * 32, 0, 3, seal_json({"token_ids": [0, 1, 2], "text": "abc"}, [SUBMITTER.peer_id])), SUBMITTER)
    stream = StreamAssembler()
    stream.add(_stream(["a"])[0])

    assert old.text_ends is None
    assert stream.add(old) == []
    assert stream.add(_stream(["b", "c"], start=1)[0]) == [([1, 2], "bc")]


@pytest.mark.parametrize("text_ends", [[1, 2], [2, 1, 3], [1, 2, 4], [-1, 2, 3], "123", [1, 2, 3.0]])
def test_open_token_batch_rejects_bad_text_ends(text_ends: object) -> None:
    body = TokenGenerated("ab" * 32, 0, 3, seal_json({"token_ids": [0, 1, 2], "text": "abc", "text_ends": text_ends}, [SUBMITTER.peer_id]))

    with pytest.raises(SealedContentInvalid, match="text_ends"):
        open_token_batch(body, SUBMITTER)
