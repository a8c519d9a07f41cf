"""The driver side of a request: admit, plan, run the loop, stream tokens, complete.

A node holding the head of a model watches `RequestSubmitted` events for it. The driver is
the first live head holder in the scheduler's rendezvous order for the request id
(`driver_order`). Only the driver opens the prompt and publishes `RequestAccepted`. Admission and
route planning are the scheduler's (`admit`): a request whose KV cache would not fit its
holders' budgets gets `RequestFailed` with the reason.

Tokens are streamed as `TokenGenerated` batches (`TokenBatcher`), sealed to the submitter
and the prompt's other readers (the next drivers, `cortex.driver.takeover`). When a block
holder fails, the stage asks the scheduler for a new route (`replan_route`), publishes
`RouteReplanned` and replays the session there. `RequestCompleted` carries usage, phase
timings in ms and the digest of the request-scoped records in this node's log.

Degraded mode (docs/degraded.md). Before the first streamed token, a request that the swarm
cannot serve (no head holder, a fragment without a live holder, a plan that cannot be made,
every holder of a fragment failing, or the deadline passing) is answered by this node's
fallback model (`cortex.driver.fallback`): `RequestAccepted` with an empty route, the
fallback's tokens, and `RequestCompleted` with `degraded` and the reason. After the first
token the answer never switches models: the driver waits for holders to come back until the
deadline (`WAIT_FOR_HOLDERS_S` without one), replays the prompt and the tokens so far, and
goes on, or fails with the reason. A swarm attempt given up at the deadline is cancelled;
its late replies find no waiting call and are dropped, and its sessions are closed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cortex.driver.errors import DriverError, NoLiveHolder, abandon_call
from cortex.driver.executors import BlockExecutor, Compute
from cortex.driver.fallback import FallbackError, FallbackModel
from cortex.driver.loop import DriverLoop, GenerationOutcome, Stage
from cortex.privacy import PrivacyError
from cortex.quorum.replicated import QuorumFailed
from cortex.runtime.fragments import Head
from cortex.runtime.generation import SamplingSettings
from cortex.scheduler import PlanError, RequestAccepted, RequestCompleted, RequestFailed, RequestSubmitted, records_digest
from cortex.scheduler.admission import ModelGeometry, request_failed_for
from cortex.scheduler.content import ContentError, TokenBatcher, open_prompt, open_stop
from cortex.scheduler.planning import PlanningContext, RoutePlan
from cortex.scheduler.request_events import (
    BLOCK_RANGE_UNCOVERED,
    DEADLINE_EXCEEDED,
    HOLDER_FAILED,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    NO_HEAD_HOLDER,
    NO_QUORUM,
    plan_digest,
    request_id_for,
)
from cortex.scheduler.routes import admit, replan_route
from events import Event, Identity, wall_clock_ms

logger = logging.getLogger(__name__)

Emit = Callable[[Any, tuple[str, ...]], Awaitable[Event]]

FRAGMENT_UNSERVED = "fragment_unserved"  # degraded reason: a fragment of the model has no live holder
FALLBACK_UNAVAILABLE = "fallback_unavailable"  # failure reason: degraded mode was needed but is off or broken
# Plan errors that mean "the swarm cannot serve this now", so the request degrades instead of failing.
DEGRADING_PLAN_CODES = frozenset({NO_HEAD_HOLDER, BLOCK_RANGE_UNCOVERED, "invalid_route"})
WAIT_FOR_HOLDERS_S = 30.0  # after the first token, how long to wait for holders when there is no deadline
RETRY_PAUSE_S = 1.0
LISTED_FRAGMENTS = 4  # unserved fragments named in a fragment_unserved reason; the rest are counted


async def _no_wait() -> None:
    return None


@dataclass
class DriverContext:
    """The node services a driver uses: identity, publishing, the head, planning, executors, fallback.

    `head`, `tokenizer` and `geometry` are None on a node that does not hold the model's
    head; it drives a request only to generate the reply with its fallback model.
    """

    identity: Identity
    emit: Emit
    model_id: str
    head: Head | None
    tokenizer: Any
    eos_token_ids: list[int]
    geometry: ModelGeometry | None
    compute: Compute
    planning: Callable[[str], PlanningContext]
    record: Callable[[str], Any]
    executor_for: Callable[[str, str], BlockExecutor]
    records_of: Callable[[str], list[str]]
    fallback: FallbackModel | None = None
    missing_fragments: Callable[[], list[str]] = field(default=lambda: [])
    readers: Callable[[RequestSubmitted], list[str]] = field(default=lambda request: [])
    # (redundancy, stage, its holder) -> the stage, or one that runs each step on several holders (cortex.quorum.blocks)
    replicate: Callable[[int, Stage, str], Stage] = field(default=lambda redundancy, stage, holder: stage)
    # Awaited before each acceptance: returns once the node caught up with its peers after a stall (`Node._settled`).
    settled: Callable[[], Awaitable[None]] = field(default=_no_wait)


@dataclass
class Takeover:
    """A request taken over from a silent driver, with the tokens and text it already streamed."""

    previous_driver: str
    token_ids: list[int]
    text: str


class Degrade(Exception):
    """The swarm cannot serve the request before its first token, so the fallback model generates the reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Stopped(Exception):
    """The request ends with RequestFailed(`code`, `message`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RequestDriver:
    """Drives one request from admission to `RequestCompleted` or `RequestFailed`."""

    def __init__(self, context: DriverContext, submitted: Event, takeover: Takeover | None = None) -> None:
        self.context = context
        self.submitted = submitted
        self.request: RequestSubmitted = submitted.body
        self.request_id = request_id_for(submitted.author, self.request.nonce)
        self.refs = (submitted.id,)
        self.plan: RoutePlan | None = None
        readers = (submitted.author, context.identity.peer_id, *context.readers(self.request))
        self.batcher = TokenBatcher(self.request_id, tuple(dict.fromkeys(readers)))
        self.takeover = takeover
        self.generated: list[int] = list(takeover.token_ids) if takeover else []
        self.emitted_text = takeover.text if takeover else ""
        self.batcher.next_step = len(self.generated)
        self.tokenizer = context.tokenizer
        self.eos_token_ids = context.eos_token_ids
        self.stop: list[str] = []
        self.hold = 0
        self.first_token = asyncio.Event()
        self.wait_until: float | None = None  # monotonic end of the wait for holders, once one started

    async def run(self) -> None:
        started = time.monotonic()
        try:
            self.stop = open_stop(self.request, self.context.identity)
            self.hold = max((len(stop) for stop in self.stop), default=1) - 1
            try:
                await self._run_swarm(started)
            except Degrade as degrade:
                await self._run_fallback(degrade, started)
        except Stopped as stopped:
            await self._fail(stopped.code, stopped.message)
        except NoLiveHolder as error:
            await self._fail(HOLDER_FAILED, str(error))
        except FallbackError as error:
            await self._fail(FALLBACK_UNAVAILABLE, str(error))
        except (ContentError, PrivacyError) as error:
            await self._fail(INVALID_REQUEST, str(error))
        except QuorumFailed as error:
            await self._fail(NO_QUORUM, str(error))
        except DriverError as error:
            await self._fail(INTERNAL_ERROR, str(error))
        except Exception as error:  # noqa: BLE001 - one request's bug must not stop the node's task group
            logger.exception("request %s failed with an unexpected error", self.request_id[:12])
            await self._fail(INTERNAL_ERROR, f"unexpected error in the driver: {error!r}")

    # --- the swarm ----------------------------------------------------------------

    async def _run_swarm(self, started: float) -> None:
        if self.context.head is None:
            raise Degrade(NO_HEAD_HOLDER, f"no live peer has loaded the head of model {self.context.model_id[:16]}")
        prompt_ids = self._prompt_ids(self.context.tokenizer)
        if self._deadline_left_s() == 0.0 and not self.generated:
            raise Degrade(DEADLINE_EXCEEDED, f"the deadline of {self.request.deadline_ms} ms passed before the request was planned")
        missing = self.context.missing_fragments()
        if missing and not self.generated:
            raise Degrade(FRAGMENT_UNSERVED, unserved_fragments_message(missing))
        stages = await self._admit(prompt_ids)
        if stages is None:
            return
        admission_ms = int((time.monotonic() - started) * 1000)
        outcome = await self._generate(prompt_ids, stages)
        await self._complete(outcome, len(prompt_ids), admission_ms)

    def _prompt_ids(self, tokenizer: Any) -> list[int]:
        text = open_prompt(self.request, self.context.identity)
        ids = list(tokenizer(text)["input_ids"])
        if not ids:
            raise ContentError("the prompt tokenizes to no tokens; send at least one character")
        return ids

    def _settings(self) -> SamplingSettings:
        return SamplingSettings(temperature=self.request.temperature, top_p=self.request.top_p, seed=self.request.seed)

    def _deadline_left_s(self) -> float | None:
        """Seconds until the request's deadline (0 once it passed), or None without a deadline."""
        if self.request.deadline_ms == 0:
            return None
        left_ms = self.submitted.time_ms + self.request.deadline_ms - wall_clock_ms()
        return max(left_ms, 0) / 1000

    async def _admit(self, prompt_ids: list[int]) -> list[Stage] | None:
        assert self.context.geometry is not None
        while True:
            try:
                self.plan = admit(
                    self.context.planning(""), self.context.model_id, self.context.geometry,
                    prompt_tokens=len(prompt_ids), max_tokens=self.request.max_tokens,
                )
                break
            except PlanError as error:
                if error.code not in DEGRADING_PLAN_CODES:
                    logger.warning("request %s rejected at admission (%s): %s", self.request_id[:12], error.code, error)
                    await self.context.emit(request_failed_for(self.request_id, error), self.refs)
                    return None
                if not self.generated:
                    raise Degrade(error.code, str(error)) from error
                await self._wait_for_swarm(str(error))
        previous = self.takeover.previous_driver if self.takeover else ""
        await self._accept(self.plan.accepted(self.request_id, takeover_of=previous))
        logger.info("accepted request %s: route %s%s", self.request_id[:12], self.plan.route, f" (took over from {previous})" if previous else "")
        return [self._stage(spec) for spec in self.plan.fragments]

    async def _accept(self, accepted: RequestAccepted) -> None:
        """Publish this driver's acceptance once its node caught up after any stall (`DriverContext.settled`).

        If a successor took the request over while this node was stopped, its acceptance
        cancels this driver during the wait, so a woken driver does not accept again (to
        degrade, say) after it was replaced.
        """
        await self.context.settled()
        await self.context.emit(accepted, self.refs)

    def _stage(self, spec: str) -> Stage:
        async def replace(failed: set[str]) -> BlockExecutor | None:
            assert self.plan is not None and self.context.geometry is not None
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
        holder = self.plan.route[spec]
        return self.context.replicate(self.request.redundancy, Stage(self.context.executor_for(spec, holder), replace), holder)

    async def _generate(self, prompt_ids: list[int], stages: list[Stage]) -> GenerationOutcome:
        """Run the swarm loop; after the first token, wait out missing holders and resume from the tokens so far."""
        assert self.context.head is not None
        while True:
            forced = list(self.generated)  # tokens already streamed: replayed with the prompt, never sent again
            loop = DriverLoop(self.context.head, stages, self.context.compute)
            task = asyncio.ensure_future(
                loop.generate(
                    self.request_id, prompt_ids + forced, self.request.max_tokens - len(forced),
                    self._settings(), self.eos_token_ids, self._on_token,
                )
            )
            try:
                await self._first_token_or_deadline(task)
                return await task
            except NoLiveHolder as error:
                if not self.generated:
                    raise Degrade(HOLDER_FAILED, str(error)) from error
                logger.warning("request %s lost a holder after %d tokens: %s", self.request_id[:12], len(self.generated), error)
                await self._wait_for_swarm(str(error))
                stages = await self._resume_stages()
            finally:
                # A driver cancelled while it waits for the first token (a takeover) stops the loop too.
                abandon_call(task)

    async def _first_token_or_deadline(self, task: asyncio.Future[GenerationOutcome]) -> None:
        """Return once the first token streamed or the attempt ended; at the deadline, cancel it and degrade."""
        left = self._deadline_left_s()
        if self.generated or left is None:
            return
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self.first_token.wait())
        try:
            await asyncio.wait({task, waiter}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self.generated or task.done():
            return
        task.cancel()
        await asyncio.wait({task})  # unlike awaiting the task, lets a cancellation of this driver through
        abandon_call(task)
        logger.warning("request %s: no first token within its deadline of %d ms", self.request_id[:12], self.request.deadline_ms)
        raise Degrade(DEADLINE_EXCEEDED, f"no first token from the swarm within the deadline of {self.request.deadline_ms} ms")

    async def _wait_for_swarm(self, reason: str) -> None:
        """Wait until every fragment has a live holder again, until the deadline or WAIT_FOR_HOLDERS_S."""
        if self.wait_until is None:
            left = self._deadline_left_s()
            self.wait_until = time.monotonic() + (left if left is not None else WAIT_FOR_HOLDERS_S)
        code = DEADLINE_EXCEEDED if self.request.deadline_ms else HOLDER_FAILED
        await asyncio.sleep(RETRY_PAUSE_S)
        while self.context.missing_fragments():
            if time.monotonic() >= self.wait_until:
                break
            await asyncio.sleep(0.2)
        if time.monotonic() >= self.wait_until:
            raise Stopped(code, f"{reason}; no holder came back before the {'deadline' if self.request.deadline_ms else 'wait'} ended, after {len(self.generated)} tokens")

    async def _resume_stages(self) -> list[Stage]:
        """Plan the route again for a resumed session (the same holders where they are still live)."""
        assert self.context.geometry is not None and self.plan is not None
        previous = self.plan
        try:
            self.plan = admit(
                self.context.planning(self.request_id), self.context.model_id, self.context.geometry,
                prompt_tokens=previous.prompt_tokens, max_tokens=self.request.max_tokens,
            )
        except PlanError as error:
            raise NoLiveHolder(f"the route cannot be planned again: {error}") from error
        replaced_holders = [holder for holder in previous.route.values() if holder not in self.plan.route.values()]
        if self.plan.route != previous.route and replaced_holders:
            await self.context.emit(self.plan.replanned(self.request_id, replaced_holders[0], "holder_failed", len(self.generated)), self.refs)
        return [self._stage(spec) for spec in self.plan.fragments]

    # --- degraded mode ---------------------------------------------------------------

    async def _run_fallback(self, degrade: Degrade, started: float) -> None:
        fallback = self.context.fallback
        if fallback is None:
            raise Stopped(degrade.code, f"{degrade.message}; this node has no fallback model (fallback_model is off)")
        logger.warning("request %s degrades to the fallback model %s: %s", self.request_id[:12], fallback.name, degrade)
        # Accept before the first load of the fallback, which can take seconds, so no other head
        # holder takes the request over meanwhile. The prompt's token count comes with RequestCompleted.
        previous = self.takeover.previous_driver if self.takeover else ""
        await self._accept(RequestAccepted(self.request_id, {}, {}, 0, plan_digest({}, {}, 0), previous))
        loaded = await fallback.load()
        prompt_ids = self._prompt_ids(loaded.tokenizer)
        max_tokens = self.request.max_tokens
        if loaded.max_positions is not None:
            max_tokens = min(max_tokens, loaded.max_positions - len(prompt_ids))
        if max_tokens < 1:
            raise Stopped(degrade.code, f"{degrade.message}; the prompt's {len(prompt_ids)} tokens do not fit the fallback model's context of {loaded.max_positions}")
        self.tokenizer, self.eos_token_ids = loaded.tokenizer, loaded.eos_token_ids
        admission_ms = int((time.monotonic() - started) * 1000)
        loop = fallback.loop(loaded)
        outcome = await loop.generate(self.request_id, prompt_ids, max_tokens, self._settings(), self.eos_token_ids, self._on_token)
        await self._complete(outcome, len(prompt_ids), admission_ms, degraded_reason=str(degrade)[:500])

    # --- streaming and the end -----------------------------------------------------------

    async def _on_token(self, token: int, last: bool) -> bool:
        """Stream one token's text; return True when a stop string ended the text."""
        self.generated.append(token)
        self.first_token.set()
        visible = [t for t in self.generated if t not in self.eos_token_ids]
        text = self.tokenizer.decode(visible, skip_special_tokens=True)
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

    async def _complete(self, outcome: GenerationOutcome, prompt_tokens: int, admission_ms: int, degraded_reason: str = "") -> None:
        digest, count = records_digest(self.context.records_of(self.request_id))
        timings = {"admission": admission_ms, **{phase: int(ms) for phase, ms in outcome.timings_ms.items()}}
        finish = {"eos": "eos", "stop": "stop"}.get(outcome.stop_reason, "length")
        completed = RequestCompleted(
            self.request_id, prompt_tokens, len(self.generated), finish, timings, digest, count,
            degraded=bool(degraded_reason), degraded_reason=degraded_reason,
        )
        await self.context.emit(completed, self.refs)
        logger.info(
            "completed request %s: %d tokens, %s%s", self.request_id[:12], len(self.generated), timings,
            f", degraded ({degraded_reason})" if degraded_reason else "",
        )

    async def _fail(self, code: str, message: str) -> None:
        logger.error("request %s failed (%s): %s", self.request_id[:12], code, message)
        batch = self.batcher.flush()
        if batch is not None:
            await self.context.emit(batch, self.refs)
        await self.context.emit(RequestFailed(self.request_id, code, message[:500]), self.refs)


def unserved_fragments_message(missing: list[str]) -> str:
    """Name the first unserved fragments in model order, such as `expert[2][3]` before `expert[10][0]`."""
    ordered = sorted(missing, key=lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)])
    listed = ", ".join(ordered[:LISTED_FRAGMENTS])
    more = f" and {len(ordered) - LISTED_FRAGMENTS} more" if len(ordered) > LISTED_FRAGMENTS else ""
    return f"{len(ordered)} fragment(s) have no live holder: {listed}{more}"
