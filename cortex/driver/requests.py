"""The driver side of a request: accept, plan, run the loop, stream tokens, complete.

A node holding the head of a model watches `RequestSubmitted` events for it. The driver
is the live head holder ranked first by a rendezvous hash of (request id, peer id); only
that node publishes `RequestAccepted`. The submitter seals the prompt to every live head
holder, since the request id (the event id) does not exist before the event is signed.

Tokens are sealed to the submitter and the driver and published as `TokenGenerated`
batches, at most one per `TOKEN_BATCH_S` (and one at the end). `RequestCompleted` carries
usage, phase timings in ms and the digest of the request's `ExpertBatchServed` records;
`RequestFailed` carries a reason code.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cortex.driver.errors import DriverError, NoLiveHolder
from cortex.driver.executors import BlockExecutor, Compute
from cortex.driver.loop import DriverLoop, GenerationOutcome, Stage
from cortex.privacy import PrivacyError, open_sealed, seal_json
from cortex.runtime.fragments import Head
from cortex.runtime.generation import SamplingSettings
from cortex.scheduler.request_events import (
    BLOCK_RANGE_UNCOVERED,
    HOLDER_FAILED,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    RequestAccepted,
    RequestCompleted,
    RequestFailed,
    RequestSubmitted,
    RouteReplanned,
    TokenGenerated,
    plan_digest,
    records_digest,
)
from events import Event, Identity

logger = logging.getLogger(__name__)

TOKEN_BATCH_S = 0.03
Emit = Callable[[Any, tuple[str, ...]], Awaitable[Event]]


def rank_drivers(request_id: str, head_holders: Sequence[str]) -> list[str]:
    """Return head holders in rendezvous order for `request_id`; the first one drives."""
    return sorted(head_holders, key=lambda peer: hashlib.blake2b(f"{request_id}\n{peer}".encode(), digest_size=16).digest())


def plan_blocks(block_holders: dict[str, list[str]], num_layers: int) -> list[str]:
    """Return block fragments that chain from layer 0 to `num_layers`, preferring longer blocks.

    `block_holders` maps each block fragment to its live holders; raises NoLiveHolder when
    some layer has none.
    """
    spans = sorted(
        ((int(spec[6:].split(":")[0]), int(spec.split(":")[1].rstrip("]")), spec) for spec, holders in block_holders.items() if holders),
        key=lambda item: (item[0], -item[1]),
    )
    chain: list[str] = []
    layer = 0
    while layer < num_layers:
        starting = [item for item in spans if item[0] == layer]
        if not starting:
            raise NoLiveHolder(f"layer {layer} has no live block holder; start a node that serves block[{layer}:...]")
        chain.append(starting[0][2])
        layer = starting[0][1]
    return chain


@dataclass
class DriverContext:
    """What a driver needs from its node: identity, publishing, the head, planning and executors."""

    identity: Identity
    emit: Emit
    model_id: str
    head: Head
    tokenizer: Any
    eos_token_ids: list[int]
    num_layers: int
    compute: Compute
    block_holders: Callable[[], dict[str, list[str]]]
    executor_for: Callable[[str, str], BlockExecutor]
    records: list[str]


class RequestDriver:
    """Drives one accepted request from plan to `RequestCompleted` or `RequestFailed`."""

    def __init__(self, context: DriverContext, submitted: Event) -> None:
        self.context = context
        self.event = submitted
        self.request: RequestSubmitted = submitted.body
        self.request_id = submitted.id
        self.recipients = [submitted.author, context.identity.peer_id]
        self.route: dict[str, str] = {}
        self.reservations: dict[str, int] = {}
        self.prompt_tokens = 0
        self._pending_tokens: list[int] = []
        self._generated: list[int] = []
        self._emitted_text = ""
        self._steps_published = 0
        self._last_flush = 0.0

    async def run(self) -> None:
        started = time.monotonic()
        try:
            prompt_ids = self._prompt_ids()
            self.prompt_tokens = len(prompt_ids)
            stages = await self._accept(prompt_ids)
            admission_ms = int((time.monotonic() - started) * 1000)
            loop = DriverLoop(self.context.head, stages, self.context.compute)
            records_before = len(self.context.records)
            outcome = await loop.generate(
                self.request_id, prompt_ids, self.request.max_tokens, self._settings(), self.context.eos_token_ids, self._on_token
            )
            await self._flush_tokens(final=True)
            await self._complete(outcome, admission_ms, self.context.records[records_before:])
        except NoLiveHolder as error:
            await self._fail(HOLDER_FAILED if self.route else BLOCK_RANGE_UNCOVERED, str(error))
        except (PrivacyError, ValueError) as error:
            await self._fail(INVALID_REQUEST, str(error))
        except DriverError as error:
            await self._fail(INTERNAL_ERROR, str(error))

    def _prompt_ids(self) -> list[int]:
        text = open_sealed(self.request.sealed_prompt, self.context.identity).decode("utf-8")
        ids = list(self.context.tokenizer(text)["input_ids"])
        if not ids:
            raise ValueError("the prompt tokenizes to no tokens; send at least one character")
        return ids

    def _settings(self) -> SamplingSettings:
        return SamplingSettings(temperature=self.request.temperature, top_p=self.request.top_p, seed=self.request.seed)

    async def _accept(self, prompt_ids: list[int]) -> list[Stage]:
        holders = self.context.block_holders()
        chain = plan_blocks(holders, self.context.num_layers)
        self.route = {spec: holders[spec][0] for spec in chain}
        # NOTE: reservations are recorded, not enforced: no block holder checks its KV budget yet.
        self.reservations = {spec: 0 for spec in chain}
        digest = plan_digest(self.route, self.reservations, len(prompt_ids))
        await self.context.emit(
            RequestAccepted(self.request_id, dict(self.route), dict(self.reservations), len(prompt_ids), digest), (self.request_id,)
        )
        logger.info("accepted request %s: route %s", self.request_id[:12], self.route)
        return [self._stage(spec) for spec in chain]

    def _stage(self, spec: str) -> Stage:
        def replace(failed: set[str]) -> BlockExecutor | None:
            candidates = [peer for peer in self.context.block_holders().get(spec, []) if peer not in failed]
            if not candidates:
                return None
            failed_holder = self.route[spec]
            self.route[spec] = candidates[0]
            digest = plan_digest(self.route, self.reservations, self.prompt_tokens)
            replanned = RouteReplanned(
                self.request_id, failed_holder, "holder_failed", dict(self.route), dict(self.reservations),
                self.prompt_tokens, digest, len(self._generated),
            )
            task = asyncio.get_running_loop().create_task(self.context.emit(replanned, (self.request_id,)))
            task.add_done_callback(lambda done: done.exception() if not done.cancelled() else None)
            return self.context.executor_for(spec, candidates[0])

        return Stage(self.context.executor_for(spec, self.route[spec]), replace)

    def _on_token(self, token: int) -> None:
        self._pending_tokens.append(token)
        self._generated.append(token)
        if time.monotonic() - self._last_flush >= TOKEN_BATCH_S:
            task = asyncio.get_running_loop().create_task(self._flush_tokens(final=False))
            task.add_done_callback(lambda done: done.exception() if not done.cancelled() else None)

    async def _flush_tokens(self, final: bool) -> None:
        if not self._pending_tokens:
            return
        tokens, self._pending_tokens = self._pending_tokens, []
        self._last_flush = time.monotonic()
        visible = [token for token in self._generated if token not in self.context.eos_token_ids]
        text = self.context.tokenizer.decode(visible, skip_special_tokens=True)
        # Hold back an incomplete UTF-8 sequence until the next token completes it.
        safe = len(text) if final else len(text.rstrip("\ufffd"))
        piece, self._emitted_text = text[len(self._emitted_text) : safe], text[:safe]
        start = self._steps_published
        self._steps_published += len(tokens)
        sealed = seal_json({"token_ids": tokens, "text": piece}, self.recipients)
        await self.context.emit(TokenGenerated(self.request_id, start, start + len(tokens), sealed), (self.request_id,))

    async def _complete(self, outcome: GenerationOutcome, admission_ms: int, records: list[str]) -> None:
        digest, count = records_digest(records)
        timings = {"admission": admission_ms, **{phase: int(ms) for phase, ms in outcome.timings_ms.items()}}
        finish = "eos" if outcome.stop_reason == "eos" else "length"
        completed = RequestCompleted(
            self.request_id, self.prompt_tokens, len(outcome.token_ids), finish, timings, digest, count
        )
        await self.context.emit(completed, (self.request_id,))
        logger.info("completed request %s: %d tokens, %s", self.request_id[:12], len(outcome.token_ids), timings)

    async def _fail(self, code: str, message: str) -> None:
        logger.error("request %s failed (%s): %s", self.request_id[:12], code, message)
        await self.context.emit(RequestFailed(self.request_id, code, message[:500]), (self.request_id,))
