"""The driver loop: embed, run the route of blocks, sample, stream; replay on block failover.

Shape legend: T = new tokens of the session, D = hidden size, V = vocabulary size.

The route is a list of `Stage`s, one per block, in layer order. A stage remembers every
input it was given for the session (position and hidden states [T, D]). When its block
holder fails (`CallFailed`), the stage requests a replacement holder of the same layers,
replays the remembered inputs to it chunk by chunk at their original positions, which
rebuilds the same KV cache with the same computation, and then runs the current input.
So generation continues with the output it would have had without the failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch

from cortex.driver.errors import CallFailed, NoLiveHolder
from cortex.driver.executors import BlockExecutor, Compute, run_inline
from cortex.runtime.fragments import Head
from cortex.runtime.generation import SamplingSettings, sample_token

logger = logging.getLogger(__name__)

Replacement = Callable[[set[str]], Awaitable[BlockExecutor | None]]
TokenCallback = Callable[[int, bool], Awaitable[bool]]  # (token, is_last) -> stop now


def holder_of(executor: BlockExecutor) -> str:
    """Return the peer id that runs `executor`, or "local" for an in-process block."""
    return str(getattr(executor, "peer", "local"))


class Stage:
    """One block of the route: its current executor, how to replace it, and the session's inputs."""

    def __init__(self, executor: BlockExecutor, replace: Replacement | None = None) -> None:
        self.spec = executor.spec
        self.executor = executor
        self.replace = replace
        self.history: list[tuple[int, torch.Tensor]] = []  # (position, hidden [T, D]) per call
        self.failed: set[str] = set()
        self.replays: list[dict[str, object]] = []

    async def run(self, session_id: str, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Run `hidden` [T, D] at `position`, failing over to another holder as often as one exists."""
        while True:
            try:
                output = await self.executor.run(session_id, hidden, position)  # [T, D]
            except CallFailed as error:
                logger.warning("block %s failed for session %s: %s; replaying on another holder", self.spec, session_id, error)
                await self._fail_over(session_id, error)
                continue
            self.history.append((position, hidden))
            return output

    async def _fail_over(self, session_id: str, error: CallFailed) -> None:
        self.failed.add(error.peer)
        while True:
            replacement = await self.replace(set(self.failed)) if self.replace is not None else None
            if replacement is None:
                raise NoLiveHolder(
                    f"block {self.spec} has no live holder left for session {session_id} "
                    f"(failed: {', '.join(sorted(self.failed))})"
                ) from error
            started = time.monotonic()
            try:
                for position, chunk in self.history:
                    await replacement.run(session_id, chunk, position)
            except CallFailed as replay_error:
                self.failed.add(replay_error.peer)
                continue
            self.replays.append(
                {
                    "block": self.spec,
                    "from": error.peer,
                    "to": holder_of(replacement),
                    "replayed_tokens": sum(chunk.shape[0] for _, chunk in self.history),
                    "ms": round((time.monotonic() - started) * 1000, 3),
                }
            )
            logger.info("session %s replayed on %s for block %s", session_id, holder_of(replacement), self.spec)
            self.executor = replacement
            return

    async def close(self, session_id: str) -> None:
        try:
            await self.executor.close(session_id)
        except CallFailed as error:
            logger.debug("closing session %s on %s failed: %s", session_id, self.spec, error)


@dataclass
class GenerationOutcome:
    """Generated token ids, why generation stopped, and phase timings in milliseconds."""

    token_ids: list[int] = field(default_factory=list)
    stop_reason: str = "max_tokens"
    timings_ms: dict[str, float] = field(default_factory=dict)
    replays: list[dict[str, object]] = field(default_factory=list)


class DriverLoop:
    """Runs one session through a head and a route of stages."""

    def __init__(self, head: Head, stages: Sequence[Stage], compute: Compute = run_inline) -> None:
        self.head = head
        self.stages = list(stages)
        self.compute = compute

    async def forward(self, session_id: str, token_ids: list[int], position: int) -> torch.Tensor:
        """Append `token_ids` at `position` and return the last token's logits [V]."""
        ids = torch.tensor(token_ids, device=self.head.embed_tokens.device)
        hidden = await self.compute(self.head.embed, ids)  # [T, D]
        for stage in self.stages:
            hidden = await stage.run(session_id, hidden, position)  # [T, D]
        logits: torch.Tensor = await self.compute(self.head.logits, hidden[-1:])  # [1, V]
        return logits[0]

    async def generate(
        self,
        session_id: str,
        prompt_ids: Sequence[int],
        max_tokens: int,
        settings: SamplingSettings = SamplingSettings(),
        eos_token_ids: Sequence[int] = (),
        on_token: TokenCallback | None = None,
    ) -> GenerationOutcome:
        """Generate up to `max_tokens` tokens after `prompt_ids`, stopping after an EOS token."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty; a prompt needs at least one token (e.g. the BOS token)")
        outcome = GenerationOutcome()
        generator = None
        if settings.temperature > 0:
            generator = torch.Generator(device=self.head.embed_tokens.device)
            generator.manual_seed(settings.seed if settings.seed is not None else torch.seed())
        eos = set(eos_token_ids)
        started = time.monotonic()
        try:
            logits = await self.forward(session_id, list(prompt_ids), 0)
            outcome.timings_ms["prefill"] = _ms_since(started)
            position = len(prompt_ids)
            decode_started = time.monotonic()
            for produced in range(max_tokens):
                token = sample_token(logits, settings, generator)
                outcome.token_ids.append(token)
                last = token in eos or produced + 1 == max_tokens
                stop = await on_token(token, last) if on_token is not None else False
                if token in eos:
                    outcome.stop_reason = "eos"
                elif stop:
                    outcome.stop_reason = "stop"
                if last or stop:
                    break
                logits = await self.forward(session_id, [token], position)
                position += 1
            outcome.timings_ms["decode"] = _ms_since(decode_started)
        finally:
            for stage in self.stages:
                await stage.close(session_id)
                outcome.replays.extend(stage.replays)
        outcome.timings_ms["total"] = _ms_since(started)
        return outcome


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)
