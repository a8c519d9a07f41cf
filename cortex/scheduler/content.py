"""Request content: building a sealed submission, opening it on the driver, and batching tokens.

The submitter draws a nonce, which fixes the request id, computes the driver from that id
(`planning.driver_order`), and seals the prompt and stop strings to itself and the driver
(`prepare_submission`). A prompt whose sealed text exceeds MAX_INLINE_PROMPT_CHARS is not
put in the event: `RequestSubmitted.prompt_digest` names it and the submitter sends the
sealed text to the driver over the data plane. A driver that takes a request over must be
one of the recipients: nothing seals the prompt again to another peer.

The driver seals each token batch to the submitter and the prompt's readers (`TokenBatcher`),
and the submitter joins the batches of one or several drivers in step order
(`StreamAssembler`).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from cortex.privacy import SealedContentInvalid, open_json, open_sealed, seal, seal_json
from cortex.scheduler.request_events import (
    MAX_STOP_STRINGS,
    MAX_TOKENS_PER_EVENT,
    TEMPERATURE_SCALE,
    TOP_P_SCALE,
    RequestSubmitted,
    TokenGenerated,
    request_id_for,
)
from events.identity import Identity

# The event payload limit is 65,536 bytes: this leaves room for stop strings and the envelope.
MAX_INLINE_PROMPT_CHARS = 48_000
MAX_STOP_BYTES = 4_096
TOKEN_BATCH_INTERVAL_MS = 50  # a batch is published once its first token is this old
TOKEN_BATCH_MAX_TOKENS = 32


class ContentError(ValueError):
    """Request content that is missing, too large, or does not match its digest."""


@dataclass(frozen=True)
class PreparedSubmission:
    """A submission ready to publish, its request id, and the sealed prompt for the data plane if any."""

    body: RequestSubmitted
    request_id: str
    data_plane_prompt: str | None


def new_nonce() -> str:
    """Return 16 random bytes as 32 hex digits, for `RequestSubmitted.nonce`."""
    return secrets.token_hex(16)


def prompt_digest(sealed_prompt: str) -> str:
    """Return the BLAKE2b-256 hex digest of sealed prompt text, as `RequestSubmitted.prompt_digest`."""
    return hashlib.blake2b(sealed_prompt.encode("ascii"), digest_size=32).hexdigest()


def prepare_submission(
    submitter: str,
    recipients: Sequence[str],
    model_id: str,
    prompt: str,
    *,
    max_tokens: int,
    nonce: str,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    deadline_ms: int = 0,
    redundancy: int = 1,
) -> PreparedSubmission:
    """Seal a prompt to `submitter` and `recipients` (the driver) and build its RequestSubmitted.

    `nonce` fixes the request id, so compute the driver from `request_id_for(submitter,
    nonce)` before calling. Raises ContentError for too many or too long stop strings.
    """
    if len(stop) > MAX_STOP_STRINGS:
        raise ContentError(f"{len(stop)} stop strings given, the limit is {MAX_STOP_STRINGS}")
    stop_bytes = sum(len(text.encode()) for text in stop)
    if stop_bytes > MAX_STOP_BYTES:
        raise ContentError(f"stop strings take {stop_bytes} bytes, the limit is {MAX_STOP_BYTES}; use shorter ones")
    readers = [submitter, *recipients]
    prompt_bytes = prompt.encode()
    sealed_prompt = seal(prompt_bytes, readers)
    inline = len(sealed_prompt) <= MAX_INLINE_PROMPT_CHARS
    body = RequestSubmitted(
        nonce=nonce,
        model_id=model_id,
        max_tokens=max_tokens,
        prompt_bytes=len(prompt_bytes),
        sealed_prompt=sealed_prompt if inline else "",
        prompt_digest="" if inline else prompt_digest(sealed_prompt),
        sealed_stop=seal_json(list(stop), readers) if stop else "",
        temperature_milli=round(temperature * TEMPERATURE_SCALE),
        top_p_micro=round(top_p * TOP_P_SCALE),
        seed=seed,
        deadline_ms=deadline_ms,
        redundancy=redundancy,
    )
    return PreparedSubmission(body, request_id_for(submitter, nonce), None if inline else sealed_prompt)


def open_prompt(body: RequestSubmitted, identity: Identity, data_plane_prompt: str | None = None) -> str:
    """Return the prompt text of a submission, opened with `identity`.

    For a prompt referenced by digest, pass the sealed text received over the data plane;
    it must match the digest. Raises ContentError, or `cortex.privacy.NotARecipient` when
    the prompt was not sealed to `identity`.
    """
    sealed = body.sealed_prompt
    if not sealed:
        if data_plane_prompt is None:
            raise ContentError(
                f"the prompt is referenced by digest {body.prompt_digest}; fetch its sealed text from the submitter"
            )
        if prompt_digest(data_plane_prompt) != body.prompt_digest:
            raise ContentError(f"the sealed prompt received does not match the digest {body.prompt_digest}")
        sealed = data_plane_prompt
    plaintext = open_sealed(sealed, identity)
    if len(plaintext) != body.prompt_bytes:
        raise ContentError(f"the opened prompt has {len(plaintext)} bytes, but the submission has prompt_bytes={body.prompt_bytes}")
    return plaintext.decode()


def open_stop(body: RequestSubmitted, identity: Identity) -> list[str]:
    """Return the stop strings of a submission, opened with `identity`."""
    if not body.sealed_stop:
        return []
    stop = open_json(body.sealed_stop, identity)
    if not isinstance(stop, list) or not all(isinstance(text, str) for text in stop):
        raise SealedContentInvalid("sealed stop strings are not a JSON list of strings")
    return stop


def open_tokens(body: TokenGenerated, identity: Identity) -> tuple[list[int], str]:
    """Return the token ids and text of a token batch, opened with `identity`."""
    batch = open_token_batch(body, identity)
    return batch.token_ids, batch.text


@dataclass(frozen=True)
class OpenedBatch:
    """The opened content of one `TokenGenerated`: its steps, token ids and text.

    `text_ends[i]` is where token i's text ends in `text`, so the batch can be cut at any
    step. None for batches of drivers that did not send it (before text ends existed).
    """

    step_start: int
    token_ids: list[int]
    text: str
    text_ends: list[int] | None

    @property
    def step_stop(self) -> int:
        return self.step_start + len(self.token_ids)

    def can_cut_at(self, step: int) -> bool:
        return step == self.step_start or (self.text_ends is not None and self.step_start < step < self.step_stop)

    def tail(self, step: int) -> tuple[list[int], str]:
        """Return the token ids and text from `step` on; `can_cut_at(step)` must hold."""
        offset = step - self.step_start
        if offset == 0:
            return self.token_ids, self.text
        assert self.text_ends is not None
        return self.token_ids[offset:], self.text[self.text_ends[offset - 1] :]


def open_token_batch(body: TokenGenerated, identity: Identity) -> OpenedBatch:
    """Return the opened content of a token batch; raise SealedContentInvalid if it is malformed."""
    content = open_json(body.sealed_tokens, identity)
    token_ids = content.get("token_ids") if isinstance(content, dict) else None
    text = content.get("text") if isinstance(content, dict) else None
    if not isinstance(token_ids, list) or not all(type(token) is int for token in token_ids) or not isinstance(text, str):
        raise SealedContentInvalid('sealed tokens are not {"token_ids": [int, ...], "text": str}')
    if len(token_ids) != body.step_stop - body.step_start:
        raise SealedContentInvalid(
            f"sealed tokens hold {len(token_ids)} ids for steps {body.step_start} to {body.step_stop}"
        )
    text_ends = content.get("text_ends")
    if text_ends is not None and not _valid_text_ends(text_ends, len(token_ids), len(text)):
        raise SealedContentInvalid(
            f"sealed tokens for steps {body.step_start} to {body.step_stop} have text_ends that are not "
            f"{len(token_ids)} non-decreasing offsets ending at the text's length {len(text)}"
        )
    return OpenedBatch(body.step_start, token_ids, text, text_ends)


def _valid_text_ends(text_ends: object, tokens: int, text_length: int) -> bool:
    if not isinstance(text_ends, list) or len(text_ends) != tokens or not all(type(end) is int for end in text_ends):
        return False
    return all(0 <= a <= b for a, b in zip([0, *text_ends], text_ends)) and (not text_ends or text_ends[-1] == text_length)


class StreamAssembler:
    """The stream of a request's token batches, from one driver or several, joined in step order.

    Two drivers can stream the same steps with batch boundaries of their own: a driver that
    took over without a batch of its predecessor replays from an earlier step, and a driver
    taken over while only stalled streams on. A batch that starts at the next step, or before
    it and reaches past it, continues the stream. The steps it repeats are dropped after a
    comparison with the stream, and `conflicts` lists the steps where they differ. A batch
    without `text_ends` continues the stream only from its first step, so one that starts
    before the next step is dropped.
    """

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.text = ""
        self._conflicts: set[int] = set()
        # Batches not joined yet, by (first step, -last step, arrival): each is pushed once and
        # popped once the stream reaches its first step, so a long gap costs O(log n) per batch.
        self._waiting: list[tuple[int, int, int, OpenedBatch]] = []
        self._arrivals = 0

    @property
    def conflicts(self) -> list[int]:
        """Return the steps where a batch repeated a step with another token than the stream's."""
        return sorted(self._conflicts)

    def add(self, batch: OpenedBatch) -> list[tuple[list[int], str]]:
        """Take one batch; return the pieces (token ids, text) it let the stream go on with, in order."""
        self._arrivals += 1
        heapq.heappush(self._waiting, (batch.step_start, -batch.step_stop, self._arrivals, batch))
        pieces: list[tuple[list[int], str]] = []
        while self._waiting and self._waiting[0][0] <= len(self.token_ids):
            step = len(self.token_ids)
            usable: list[OpenedBatch] = []
            while self._waiting and self._waiting[0][0] <= step:
                waiting = heapq.heappop(self._waiting)[3]
                if waiting.step_stop > step and waiting.can_cut_at(step):
                    usable.append(waiting)
                else:
                    self._compare(waiting)
            if not usable:
                continue
            # Prefer a batch that starts at the next step (it repeats nothing), then the longest.
            chosen = max(usable, key=lambda waiting: (waiting.step_start, waiting.step_stop))
            self._compare(chosen)
            token_ids, text = chosen.tail(step)
            self.token_ids.extend(token_ids)
            self.text += text
            pieces.append((token_ids, text))
            for waiting in usable:
                if waiting is not chosen:
                    self._arrivals += 1
                    heapq.heappush(self._waiting, (waiting.step_start, -waiting.step_stop, self._arrivals, waiting))
        return pieces

    def _compare(self, batch: OpenedBatch) -> None:
        """Note the steps where `batch` repeats a step of the stream with another token."""
        joined = min(batch.step_stop, len(self.token_ids))
        for position in range(batch.step_start, joined):
            if self.token_ids[position] != batch.token_ids[position - batch.step_start]:
                self._conflicts.add(position)


@dataclass
class TokenBatcher:
    """Collects a request's generated tokens into TokenGenerated bodies sealed to `recipients`.

    `add` returns a batch once it has TOKEN_BATCH_MAX_TOKENS tokens or its first token is
    TOKEN_BATCH_INTERVAL_MS old. `add` runs only when a token arrives, so call `flush` when
    generation pauses or ends to publish what is left. Callers pass `now_ms`.
    """

    request_id: str
    recipients: tuple[str, ...]
    interval_ms: int = TOKEN_BATCH_INTERVAL_MS
    max_tokens: int = TOKEN_BATCH_MAX_TOKENS
    next_step: int = 0
    _token_ids: list[int] = field(default_factory=list)
    _texts: list[str] = field(default_factory=list)
    _first_ms: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= MAX_TOKENS_PER_EVENT:
            raise ValueError(f"max_tokens per batch must be in 1..{MAX_TOKENS_PER_EVENT}, got {self.max_tokens}")

    def add(self, token_id: int, text: str, now_ms: int) -> TokenGenerated | None:
        """Add one generated token and its text; return a batch if one is due."""
        if not self._token_ids:
            self._first_ms = now_ms
        self._token_ids.append(token_id)
        self._texts.append(text)
        if len(self._token_ids) >= self.max_tokens or now_ms - self._first_ms >= self.interval_ms:
            return self.flush()
        return None

    def flush(self) -> TokenGenerated | None:
        """Return the pending tokens as one batch, or None if there are none."""
        if not self._token_ids:
            return None
        ends = list(itertools.accumulate(len(text) for text in self._texts))
        content = {"token_ids": self._token_ids, "text": "".join(self._texts), "text_ends": ends}
        start = self.next_step
        self.next_step += len(self._token_ids)
        self._token_ids, self._texts = [], []
        return TokenGenerated(self.request_id, start, self.next_step, seal_json(content, self.recipients))
