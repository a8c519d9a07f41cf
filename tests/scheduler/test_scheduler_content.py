"""Request content: sealed submissions, prompts by digest, stop strings and token batches."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cortex.privacy import NotARecipient, SealedContentInvalid
from cortex.scheduler import RequestSubmitted, request_id_for
from cortex.scheduler.content import (
    MAX_INLINE_PROMPT_CHARS,
    ContentError,
    TokenBatcher,
    open_prompt,
    open_stop,
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
