"""Replicated block steps: one block of the route run on r holders, the outputs compared.

Shape legend: T = new tokens of the session, D = hidden size.

With redundancy r > 1 and more than one trusted live holder of a block, the driver runs each
step of the block on r distinct holders at once (`ReplicatedStage`). Each holder keeps its own
KV cache of the session. The outputs [T, D] are compared like one expert's outputs
(`decide_expert`, the tolerance of the least precise dtype), and the strict majority's output
is used. The driver publishes one `QuorumVoted` and one `QuorumDecided` with `block` set, and a
`PeerPenalized` per dissenting holder, through the router's ordered `Publisher`.

Holders join a session by replay: a new holder first gets every earlier input of the session
at its original position, which rebuilds the same KV cache, and then the current step.

- A holder whose call fails leaves the session, and another trusted holder joins in its place.
- A dissenting holder stays until the trust view excludes it, so its dissents are counted and
  it is excluded within a few steps. Then it leaves, and another holder joins if one exists.
- Without a strict majority, one more holder joins and runs the step, up to
  `MAX_EXTRA_REPLICAS` beyond r. If still none forms, the request fails with `QuorumFailed`.
  With no holder left at all, the stage raises `NoLiveHolder`, like a plain stage.
- NOTE: holders that leave or join publish no `RouteReplanned`, so the request's record keeps
  naming the plan's holder of the block.
- With one trusted live holder left (the others failed or were excluded), its steps go on
  unchecked, like a block with a single holder, and `unchecked_steps` counts them.

The path with one holder per block is the plain `Stage`: nothing here runs for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from cortex.driver.errors import CallFailed, NoLiveHolder
from cortex.driver.executors import BlockExecutor
from cortex.driver.loop import Stage
from cortex.quorum.compare import least_precise, tolerance_for
from cortex.quorum.events import DISAGREED, PeerPenalized
from cortex.quorum.policy import MAX_EXTRA_REPLICAS
from cortex.quorum.replicated import QuorumFailed, QuorumSettings, QuorumStats
from cortex.quorum.voting import ExpertOutcome, LayerCall, decide_expert, layer_events

logger = logging.getLogger(__name__)

BLOCK_OUTPUT = 0  # the `experts` entry of every output of a block step in votes and decisions


@dataclass
class BlockQuorum:
    """The inputs of a replicated stage: the trusted live holders of its block, executors, and quorum settings."""

    holders: Callable[[], list[str]]  # trusted live holders of the block, best first
    executor_for: Callable[[str], BlockExecutor]  # holder peer id -> executor of the block on it
    settings: QuorumSettings
    replicas: int
    stats: QuorumStats = field(default_factory=QuorumStats)  # the router's counts, shared by its stages


class ReplicatedStage(Stage):
    """A block of the route run on up to `replicas` holders per step; see the module docstring."""

    def __init__(self, spec: str, first_holder: str, quorum: BlockQuorum) -> None:
        self.quorum = quorum
        self.first_holder = first_holder
        self.members: dict[str, BlockExecutor] = {}
        self.left: set[str] = set()  # holders that left this session: failed, excluded, or no longer live
        super().__init__(quorum.executor_for(first_holder))
        self.spec = spec
        self.start = int(spec.split("[", 1)[1].split(":", 1)[0])
        self.decisions = 0
        self.unchecked_steps = 0  # steps run on a single holder because no other trusted one was left

    async def run(self, session_id: str, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Run `hidden` [T, D] at `position` on the session's holders and return the majority's output [T, D]."""
        outputs: dict[str, torch.Tensor] = {}
        target = self.quorum.replicas
        rounds = 0
        while True:
            rounds += 1
            await self._fill(session_id, target)
            await self._run_members(session_id, hidden, position, outputs)
            if len(outputs) < target and self._candidates():
                continue  # a member failed during the step, so another holder joins and runs it
            if len(outputs) == 1 and len(self.members) == 1:
                return self._unchecked(session_id, hidden, position, outputs)
            if not outputs:
                raise NoLiveHolder(self._too_few_message(position, outputs))
            outcome = self._decide(outputs)
            if outcome.chosen is None and target < self.quorum.replicas + MAX_EXTRA_REPLICAS and self._candidates():
                target += 1
                logger.warning("block %s outputs of %s form no quorum at step %d; adding a holder", self.spec, sorted(outputs), position)
                continue
            self._submit(session_id, position, outcome, rounds)
            if outcome.chosen is None:
                raise QuorumFailed(self._no_quorum_message(position, outcome))
            self.history.append((position, hidden))
            return outcome.outputs[outcome.chosen]

    def _unchecked(self, session_id: str, hidden: torch.Tensor, position: int, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Use the output of the one trusted live holder left, like a block with a single holder."""
        (peer, output), = outputs.items()
        if not self.unchecked_steps:
            logger.warning("block %s has one trusted live holder left (%s) for session %s; its steps go unchecked", self.spec, peer, session_id)
        self.unchecked_steps += 1
        self.quorum.stats.block_unchecked += 1
        self.history.append((position, hidden))
        return output

    async def close(self, session_id: str) -> None:
        for executor in self.members.values():
            try:
                await executor.close(session_id)
            except CallFailed as error:
                logger.debug("closing session %s on %s failed: %s", session_id, self.spec, error)

    def _candidates(self) -> list[str]:
        holders = self.quorum.holders()
        if self.first_holder in holders:
            holders = [self.first_holder, *(peer for peer in holders if peer != self.first_holder)]
        return [peer for peer in holders if peer not in self.members and peer not in self.left]

    async def _fill(self, session_id: str, target: int) -> None:
        """Drop members the trust view no longer lists, then add holders up to `target`, replaying the session to each."""
        trusted = set(self.quorum.holders())
        for peer in [peer for peer in self.members if peer not in trusted]:
            logger.warning("holder %s of %s is no longer trusted or live; it leaves session %s", peer, self.spec, session_id)
            self._leave(peer)
        while len(self.members) < target:
            candidates = self._candidates()
            if not candidates:
                return
            peer = candidates[0]
            executor = self.quorum.executor_for(peer)
            if await self._replay(session_id, peer, executor):
                self.members[peer] = executor
                self.executor = next(iter(self.members.values()))

    async def _replay(self, session_id: str, peer: str, executor: BlockExecutor) -> bool:
        """Replay the session's earlier inputs to a joining holder; return False (and mark it) if it fails."""
        if not self.history:
            return True
        started = time.monotonic()
        try:
            for position, chunk in self.history:
                await executor.run(session_id, chunk, position)
        except CallFailed as error:
            logger.warning("replaying session %s of %s to %s failed: %s", session_id, self.spec, peer, error.reason)
            self.left.add(peer)
            return False
        self.replays.append(
            {
                "block": self.spec,
                "from": "",
                "to": peer,
                "replayed_tokens": sum(chunk.shape[0] for _, chunk in self.history),
                "ms": round((time.monotonic() - started) * 1000, 3),
            }
        )
        return True

    async def _run_members(self, session_id: str, hidden: torch.Tensor, position: int, outputs: dict[str, torch.Tensor]) -> None:
        pending = [peer for peer in self.members if peer not in outputs]
        results = await asyncio.gather(
            *(self.members[peer].run(session_id, hidden, position) for peer in pending), return_exceptions=True
        )
        for peer, result in zip(pending, results, strict=True):
            if isinstance(result, CallFailed):
                logger.warning("block %s on %s failed for session %s: %s; another holder joins", self.spec, peer, session_id, result.reason)
                self.failed.add(peer)
                self._leave(peer)
            elif isinstance(result, BaseException):
                raise result
            else:
                outputs[peer] = result

    def _leave(self, peer: str) -> None:
        self.members.pop(peer, None)
        self.left.add(peer)
        if self.members:
            self.executor = next(iter(self.members.values()))

    def _decide(self, outputs: dict[str, torch.Tensor]) -> ExpertOutcome:
        producers = sorted(outputs)
        values = [outputs[peer] for peer in producers]
        return decide_expert(BLOCK_OUTPUT, producers, values, tolerance_for([value.dtype for value in values]))

    def _submit(self, session_id: str, position: int, outcome: ExpertOutcome, rounds: int) -> None:
        self.decisions += 1
        self.quorum.stats.block_decisions += 1
        self.quorum.stats.block_dissents += len(outcome.losers) if outcome.chosen is not None else 0
        dtypes = [output.dtype for output in outcome.outputs]
        tolerance = tolerance_for(dtypes)
        dtype = str(least_precise(dtypes)).removeprefix("torch.")
        settings = self.quorum.settings
        call = LayerCall(session_id, settings.model_id, position, self.start)
        vote, decision = layer_events(call, [outcome], dtype, tolerance, rounds, settings.own_peer, settings.lying)
        vote, decision = replace(vote, block=self.spec), replace(decision, block=self.spec)

        async def publish() -> None:
            vote_event = await settings.emit(vote, (session_id,))
            decision_event = await settings.emit(decision, (session_id, vote_event.id))
            for peer in decision.dissenting:
                if peer == settings.own_peer:
                    continue
                logger.warning("block holder %s dissented on %s step %d of request %s; penalized", peer, self.spec, position, session_id[:12])
                detail = f"{self.spec} step {position}: output outside the winning group"
                await settings.emit(PeerPenalized(peer, DISAGREED, (vote_event.id, decision_event.id), detail), (session_id,))

        settings.publisher.submit(publish)

    def _too_few_message(self, position: int, outputs: dict[str, torch.Tensor]) -> str:
        return (
            f"{self.spec} at step {position} returned {len(outputs)} output(s) from trusted live holders "
            f"(left the session: {', '.join(sorted(self.left)) or 'none'}); start more holders of the block"
        )

    def _no_quorum_message(self, position: int, outcome: ExpertOutcome) -> str:
        groups = [[outcome.producers[index][:12] for index in group] for group in outcome.grouping.groups]
        return (
            f"no quorum for {self.spec} at step {position}: {len(outcome.producers)} holders split into groups "
            f"{groups}, and no group is a strict majority"
        )


def replicated_stage(stage: Stage, first_holder: str, quorum: BlockQuorum) -> Stage:
    """Return `stage` itself with redundancy 1 or a single trusted holder, else a `ReplicatedStage` of its block."""
    if quorum.replicas <= 1:
        return stage
    holders = quorum.holders()
    if len(set(holders) | {first_holder}) < 2:
        return stage
    return ReplicatedStage(stage.spec, first_holder, quorum)


def block_replicator(
    holders: Callable[[str], list[str]],
    executor_for: Callable[[str, str], BlockExecutor],
    settings: QuorumSettings,
    stats: QuorumStats | None = None,
) -> Callable[[int, Stage, str], Stage]:
    """Return the driver's hook that turns a route's stage into a replicated one for a request's redundancy.

    `holders(spec)` lists the trusted live holders of a block, best first, and
    `executor_for(spec, peer)` makes the executor of the block on a holder. The hook takes the
    request's redundancy, the stage and the stage's holder; the node's `quorum.redundancy`
    is the minimum applied. The stages add their counts to `stats` (the router's, so the node's
    status file shows them).
    """
    shared = stats if stats is not None else QuorumStats()

    def replicate(redundancy: int, stage: Stage, holder: str) -> Stage:
        replicas = max(redundancy, settings.policy.redundancy)
        if replicas <= 1:
            return stage
        spec = stage.spec
        quorum = BlockQuorum(lambda: holders(spec), lambda peer: executor_for(spec, peer), settings, replicas, shared)
        return replicated_stage(stage, holder, quorum)

    return replicate
