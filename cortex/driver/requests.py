"""The driver side of a request: admit, plan, run the loop, stream tokens, complete.

A node holding the head of a model watches `RequestSubmitted` events for it. The driver is
the first live head holder in the scheduler's rendezvous order for the request id
(`driver_order`). Only the driver opens the prompt and publishes `RequestAccepted`. Admission and
route planning are the scheduler's (`admit`): a request whose KV cache would not fit its
holders' budgets, or whose layers have no live holder, gets `RequestFailed` with the reason.

Tokens are streamed as `TokenGenerated` batches (`TokenBatcher`). When a block holder
fails, the stage asks the scheduler for a new route (`replan_route`), publishes
`RouteReplanned` and replays the session there. `RequestCompleted` carries usage, phase
timings in ms and the digest of the request-scoped records in this node's log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cortex.driver.errors import DriverError, NoLiveHolder
from cortex.driver.executors import BlockExecutor, Compute
from cortex.driver.loop import DriverLoop, GenerationOutcome, Stage
from cortex.privacy import PrivacyError
from cortex.runtime.fragments import Head
from cortex.runtime.generation import SamplingSettings
from cortex.scheduler import PlanError, RequestCompleted, RequestFailed, RequestSubmitted, records_digest
from cortex.scheduler.admission import ModelGeometry, request_failed_for
from cortex.scheduler.content import ContentError, TokenBatcher, open_prompt, open_stop
from cortex.scheduler.planning import PlanningContext, RoutePlan
from cortex.scheduler.request_events import HOLDER_FAILED, INTERNAL_ERROR, INVALID_REQUEST, request_id_for
from cortex.scheduler.routes import admit, replan_route
from events import Event, Identity, wall_clock_ms

logger = logging.getLogger(__name__)

Emit = Callable[[Any, tuple[str, ...]], Awaitable[Event]]


@dataclass
class DriverContext:
    """The node services a driver uses: identity, publishing, the head, planning and executors."""

    identity: Identity
    emit: Emit
    model_id: str
    head: Head
    tokenizer: Any
    eos_token_ids: list[int]
    geometry: ModelGeometry
    compute: Compute
    planning: Callable[[str], PlanningContext]
    record: Callable[[str], Any]
    executor_for: Callable[[str, str], BlockExecutor]
    records_of: Callable[[str], list[str]]


class RequestDriver:
    """Drives one request from admission to `RequestCompleted` or `RequestFailed`."""

    def __init__(self, context: DriverContext, submitted: Event) -> None:
        self.context = context
        self.submitted = submitted
        self.request: RequestSubmitted = submitted.body
        self.request_id = request_id_for(submitted.author, self.request.nonce)
        self.refs = (submitted.id,)
        self.plan: RoutePlan | None = None
        self.batcher = TokenBatcher(self.request_id, (submitted.author, context.identity.peer_id))
        self.generated: list[int] = []
        self.emitted_text = ""
        self.stop: list[str] = []
        self.hold = 0

    async def run(self) -> None:
        started = time.monotonic()
        try:
            prompt_ids = self._prompt_ids()
            self.stop = open_stop(self.request, self.context.identity)
            self.hold = max((len(stop) for stop in self.stop), default=1) - 1
            stages = await self._admit(prompt_ids)
            if stages is None:
                return
            admission_ms = int((time.monotonic() - started) * 1000)
            loop = DriverLoop(self.context.head, stages, self.context.compute)
            outcome = await loop.generate(
                self.request_id, prompt_ids, self.request.max_tokens, self._settings(), self.context.eos_token_ids, self._on_token
            )
            await self._complete(outcome, len(prompt_ids), admission_ms)
        except NoLiveHolder as error:
            await self._fail(HOLDER_FAILED, str(error))
        except (ContentError, PrivacyError) as error:
            await self._fail(INVALID_REQUEST, str(error))
        except DriverError as error:
            await self._fail(INTERNAL_ERROR, str(error))
        except Exception as error:  # noqa: BLE001 - one request's bug must not stop the node's task group
            logger.exception("request %s failed with an unexpected error", self.request_id[:12])
            await self._fail(INTERNAL_ERROR, f"unexpected error in the driver: {error!r}")

    def _prompt_ids(self) -> list[int]:
        text = open_prompt(self.request, self.context.identity)
        ids = list(self.context.tokenizer(text)["input_ids"])
        if not ids:
            raise ContentError("the prompt tokenizes to no tokens; send at least one character")
        return ids

    def _settings(self) -> SamplingSettings:
        return SamplingSettings(temperature=self.request.temperature, top_p=self.request.top_p, seed=self.request.seed)

    async def _admit(self, prompt_ids: list[int]) -> list[Stage] | None:
        planning = self.context.planning("")
        try:
            self.plan = admit(
                planning, self.context.model_id, self.context.geometry, prompt_tokens=len(prompt_ids), max_tokens=self.request.max_tokens
            )
        except PlanError as error:
            logger.warning("request %s rejected at admission (%s): %s", self.request_id[:12], error.code, error)
            await self.context.emit(request_failed_for(self.request_id, error), self.refs)
            return None
        await self.context.emit(self.plan.accepted(self.request_id), self.refs)
        logger.info("accepted request %s: route %s", self.request_id[:12], self.plan.route)
        return [self._stage(spec) for spec in self.plan.fragments]

    def _stage(self, spec: str) -> Stage:
        async def replace(failed: set[str]) -> BlockExecutor | None:
            assert self.plan is not None
            record = self.context.record(self.request_id)
            try:
                plan = replan_route(self.context.planning(self.request_id), record, self.context.geometry, failed=failed)
            except PlanError as error:
                logger.warning("request %s: no replacement for %s: %s", self.request_id[:12], spec, error)
                return None
            failed_holder = self.plan.route[spec]
            self.plan = plan
            replanned = plan.replanned(self.request_id, failed_holder, "holder_failed", resume_step=len(self.generated))
            await self.context.emit(replanned, self.refs)
            if spec not in plan.route:
                # NOTE: a re-plan that re-covers these layers with other block boundaries is not run yet.
                return None
            return self.context.executor_for(spec, plan.route[spec])

        assert self.plan is not None
        return Stage(self.context.executor_for(spec, self.plan.route[spec]), replace)

    async def _on_token(self, token: int, last: bool) -> bool:
        """Stream one token's text; return True when a stop string ended the text."""
        self.generated.append(token)
        visible = [t for t in self.generated if t not in self.context.eos_token_ids]
        text = self.context.tokenizer.decode(visible, skip_special_tokens=True)
        cut = min((text.find(stop) for stop in self.stop if stop and stop in text), default=-1)
        stopped = cut >= 0
        if stopped:
            text = text[:cut]
        # Hold back text that could still become a stop string, and an incomplete UTF-8 sequence.
        safe = len(text) if last or stopped else max(len(text.rstrip("\ufffd")) - self.hold, len(self.emitted_text))
        piece, self.emitted_text = text[len(self.emitted_text) : safe], text[:safe]
        batch = self.batcher.add(token, piece, wall_clock_ms())
        if (last or stopped) and batch is None:
            batch = self.batcher.flush()
        if batch is not None:
            await self.context.emit(batch, self.refs)
        return stopped

    async def _complete(self, outcome: GenerationOutcome, prompt_tokens: int, admission_ms: int) -> None:
        digest, count = records_digest(self.context.records_of(self.request_id))
        timings = {"admission": admission_ms, **{phase: int(ms) for phase, ms in outcome.timings_ms.items()}}
        finish = {"eos": "eos", "stop": "stop"}.get(outcome.stop_reason, "length")
        completed = RequestCompleted(self.request_id, prompt_tokens, len(outcome.token_ids), finish, timings, digest, count)
        await self.context.emit(completed, self.refs)
        logger.info("completed request %s: %d tokens, %s", self.request_id[:12], len(outcome.token_ids), timings)

    async def _fail(self, code: str, message: str) -> None:
        logger.error("request %s failed (%s): %s", self.request_id[:12], code, message)
        batch = self.batcher.flush()
        if batch is not None:
            await self.context.emit(batch, self.refs)
        await self.context.emit(RequestFailed(self.request_id, code, message[:500]), self.refs)
