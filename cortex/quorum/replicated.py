"""Replicated expert calls for one MoE layer: r replicas per expert, comparison, retries, events.

Shape legend: N = token rows sent to one expert, D = hidden size.

`ReplicatedLayer.run` sends each expert's rows [N, D] to `replicas` distinct replicas (the
best trusted live ones in the directory's ranking), every replica's experts in one call, all
calls at once. A failed or timed-out call is replaced by a call to the next replica. Once an
expert has its outputs, they are grouped (`decide_expert`); without a strict majority, one
more replica is called, up to `MAX_EXTRA_REPLICAS` beyond r. Then the voter queues one
`QuorumVoted`, one `QuorumDecided` and a `PeerPenalized` per dissenting producer, which its
`Publisher` publishes in order in the background. It returns the chosen output of each
expert, or raises `QuorumFailed` with the reason when an expert has no quorum.

Stragglers: a round's calls still pending after the router's hedge delay get one more
replica per slow expert, and the round ends once every expert has its r outputs; calls still
pending then are cancelled and their elapsed time recorded as the peers' round trips.

A spot check (r = 2 drawn by `spot_checked`) that finds only one live replica is skipped:
the single output is used and nothing is published.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from cortex.driver.errors import CallFailed, DriverError, abandon_call
from cortex.quorum.compare import least_precise, relative_distance, tensor_digest, tolerance_for
from cortex.quorum.events import DISAGREED, PeerPenalized
from cortex.quorum.policy import MAX_EXTRA_REPLICAS, QuorumPolicy
from cortex.quorum.voting import ExpertOutcome, LayerCall, Probe, decide_expert, layer_events
from events.codec import Event

logger = logging.getLogger(__name__)

Emit = Callable[..., Awaitable[Event]]


class QuorumFailed(DriverError):
    """The replicas of an expert returned outputs that no strict majority agrees on."""


class Caller(Protocol):
    """The router methods a replicated layer uses: ranked replicas, calls, and failure notes."""

    def replicas(self, layer: int, expert: int) -> list[str]: ...

    async def call(self, peer: str, request_id: str, step: int, segments: list[tuple[int, int, torch.Tensor]]) -> list[torch.Tensor]: ...

    def note_failure(self, peer: str) -> None: ...

    def hedge_delay_s(self, peer: str, rows: int) -> float: ...

    def excluded_replicas(self, layer: int, expert: int) -> list[str]: ...

    def record_slow(self, peer: str, elapsed_s: float) -> None: ...


class Publisher:
    """An ordered publisher of quorum events off the token's path: one consumer task drains a queue.

    NOTE: events still queued when the node stops are lost. They only record votes, and the
    outputs they describe were already used.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None
        self.failures = 0

    def submit(self, job: Callable[[], Awaitable[None]]) -> None:
        self._queue.put_nowait(job)
        if self._consumer is None or self._consumer.done():
            self._consumer = asyncio.ensure_future(self._drain())

    async def idle(self) -> None:
        """Wait until every submitted job ran."""
        await self._queue.join()

    async def _drain(self) -> None:
        while not self._queue.empty():
            job = self._queue.get_nowait()
            try:
                await job()
            except Exception:  # noqa: BLE001 - a failed publish must not stop the ones after it
                self.failures += 1
                logger.exception("publishing quorum events failed")
            finally:
                self._queue.task_done()


@dataclass
class QuorumSettings:
    """A router's quorum inputs: how to publish, who this node is, its policy and the requests' redundancy."""

    emit: Emit
    model_id: str
    own_peer: str
    policy: QuorumPolicy
    redundancy_of: Callable[[str], int]
    lying: bool = False  # the wrong_voter fault mode: publish inverted votes (tests only)
    publisher: Publisher = field(default_factory=Publisher)


@dataclass
class QuorumStats:
    """Counts of replicated layers: decisions, agreements, dissents seen, extra replicas, skipped spot checks."""

    decisions: int = 0
    no_quorum: int = 0
    dissents: int = 0
    extra_replicas: int = 0
    spot_checks: int = 0
    spot_checks_skipped: int = 0
    hedges: int = 0  # extra replicas called because a call was still pending after the hedge delay
    probes: int = 0  # calls to excluded holders, compared but never used
    block_decisions: int = 0  # replicated block steps decided (cortex.quorum.blocks)
    block_dissents: int = 0  # dissenting holders counted over those decisions
    block_unchecked: int = 0  # block steps run on the one trusted holder left


class ReplicatedLayer:
    """One layer's replicated expert calls; see the module docstring."""

    def __init__(self, caller: Caller, settings: QuorumSettings, stats: QuorumStats, call: LayerCall, replicas: int) -> None:
        self.caller = caller
        self.settings = settings
        self.stats = stats
        self.call = call
        self.replicas = replicas
        self.spot_check = call.spot_check_ppm > 0
        self.results: dict[int, dict[str, torch.Tensor]] = {}
        self.asked: dict[int, list[str]] = {}
        self.failed: set[str] = set()
        self.rounds = 0

    async def run(self, rows: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Return the chosen output [N, D] of every expert in `rows` (expert -> rows [N, D])."""
        self.results = {expert: {} for expert in rows}
        self.asked = {expert: [] for expert in rows}
        target = dict.fromkeys(rows, self.replicas)
        decided: dict[int, ExpertOutcome] = {}
        single: dict[int, torch.Tensor] = {}
        probe = self._start_probe(rows)

        while len(decided) + len(single) < len(rows):
            self.rounds += 1
            await self._send_round(rows, target, decided.keys() | single.keys())
            for expert in sorted(rows):
                if expert in decided or expert in single:
                    continue
                if len(self.results[expert]) < target[expert] and self._candidates(expert):
                    continue  # the next round calls the replicas still missing
                outcome = self._evaluate(expert, target, single)
                if outcome is not None:
                    decided[expert] = outcome

        if decided:
            outcomes = [decided[expert] for expert in sorted(decided)]
            self._count(outcomes)
            self.settings.publisher.submit(lambda: self._publish(outcomes, probe))
        elif probe is not None:
            probe[2].cancel()

        chosen = dict(single)
        for expert, outcome in decided.items():
            if outcome.chosen is None:
                raise QuorumFailed(self._no_quorum_message(outcome))
            chosen[expert] = outcome.outputs[outcome.chosen]
        return chosen

    def _evaluate(self, expert: int, target: dict[int, int], single: dict[int, torch.Tensor]) -> ExpertOutcome | None:
        """Decide one expert with the outputs it has, or raise its target and return None."""
        results = self.results[expert]
        if len(results) < 2:
            if self.spot_check and results:
                self.stats.spot_checks_skipped += 1
                single[expert] = next(iter(results.values()))
                return None
            raise QuorumFailed(
                f"expert[{self.call.layer}][{expert}] returned {len(results)} output(s) from trusted live replicas "
                f"(asked {len(self.asked[expert])}, failed: {', '.join(sorted(self.failed)) or 'none'}); "
                f"redundancy {self.replicas} needs at least 2. Start more replicas or lower the redundancy"
            )
        producers = sorted(results)
        outputs = [results[producer] for producer in producers]
        tolerance = tolerance_for(self._dtypes())
        outcome = decide_expert(expert, producers, outputs, tolerance)
        if outcome.chosen is None and target[expert] < self.replicas + MAX_EXTRA_REPLICAS and self._candidates(expert):
            target[expert] += 1
            self.stats.extra_replicas += 1
            logger.warning(
                "expert[%d][%d] outputs of %s form no quorum; asking one more replica", self.call.layer, expert, producers
            )
            return None
        return outcome

    def _candidates(self, expert: int) -> list[str]:
        return [
            peer for peer in self.caller.replicas(self.call.layer, expert) if peer not in self.asked[expert] and peer not in self.failed
        ]

    def _dtypes(self) -> list[torch.dtype]:
        return [output.dtype for results in self.results.values() for output in results.values()] or [torch.float32]

    async def _send_round(self, rows: Mapping[int, torch.Tensor], target: dict[int, int], done: Any) -> None:
        """Call the replicas each pending expert still lacks; past the hedge delay, call more for the slow ones."""
        plan = self._plan(rows, target, done, limit=None)
        if not plan:
            return
        started = time.monotonic()
        tasks = {self._start_call(peer, experts, rows): (peer, experts) for peer, experts in plan.items()}
        pending = set(tasks)
        try:
            delay = max(self.caller.hedge_delay_s(peer, sum(int(rows[e].shape[0]) for e in experts)) for peer, experts in plan.items())
            finished, pending = await asyncio.wait(pending, timeout=delay)
            self._collect(finished, tasks)
            if pending:
                self._hedge(rows, target, done, tasks, pending, delay)
            while pending and any(len(self.results[expert]) < target[expert] for expert in rows if expert not in done):
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                self._collect(finished, tasks)
            for task in pending:
                self.caller.record_slow(tasks[task][0], time.monotonic() - started)
        finally:
            for task in pending:
                abandon_call(task)

    def _hedge(
        self,
        rows: Mapping[int, torch.Tensor],
        target: dict[int, int],
        done: Any,
        tasks: dict[asyncio.Task[list[torch.Tensor]], tuple[str, list[int]]],
        pending: set[asyncio.Task[list[torch.Tensor]]],
        delay: float,
    ) -> None:
        """Start one more replica's call for each expert of the calls still pending."""
        short = {expert for task in pending for expert in tasks[task][1]}
        hedges = self._plan(rows, target, done, limit=short)
        if hedges:
            logger.info("replicated calls of layer %d still pending after %.2f s; hedging on %s", self.call.layer, delay, sorted(hedges))
            self.stats.hedges += len(hedges)
        for peer, experts in hedges.items():
            task = self._start_call(peer, experts, rows)
            tasks[task] = (peer, experts)
            pending.add(task)

    def _plan(self, rows: Mapping[int, torch.Tensor], target: dict[int, int], done: Any, limit: set[int] | None) -> dict[str, list[int]]:
        """Pick the next candidates of the experts short of their target (only those in `limit` if given)."""
        plan: dict[str, list[int]] = collections.defaultdict(list)
        for expert in sorted(rows):
            if expert in done or (limit is not None and expert not in limit):
                continue
            missing = target[expert] - len(self.results[expert])
            if limit is not None:
                missing = 1 if missing > 0 else 0  # one hedge call per slow expert
            for peer in self._candidates(expert)[: max(missing, 0)]:
                plan[peer].append(expert)
                self.asked[expert].append(peer)
        return plan

    def _start_call(self, peer: str, experts: list[int], rows: Mapping[int, torch.Tensor]) -> asyncio.Task[list[torch.Tensor]]:
        segments = [(self.call.layer, expert, rows[expert]) for expert in experts]
        return asyncio.ensure_future(self.caller.call(peer, self.call.request_id, self.call.step, segments))

    def _collect(self, finished: set[asyncio.Task[list[torch.Tensor]]], tasks: Mapping[asyncio.Task[list[torch.Tensor]], tuple[str, list[int]]]) -> None:
        for task in finished:
            peer, experts = tasks[task]
            error = task.exception()
            if isinstance(error, CallFailed):
                logger.warning("replicated call of layer %d on %s failed (%s); asking another replica", self.call.layer, peer, error.reason)
                self.failed.add(peer)
                self.caller.note_failure(peer)
                continue
            if error is not None:
                raise error
            for expert, output in zip(experts, task.result(), strict=True):
                self.results[expert][peer] = output

    def _start_probe(self, rows: Mapping[int, torch.Tensor]) -> tuple[int, str, asyncio.Task[list[torch.Tensor]]] | None:
        """Call one excluded holder of one expert, if the policy draws a probe for this layer call."""
        if self.spot_check or not self.settings.policy.probes(self.call.request_id, self.call.step, self.call.layer):
            return None
        for expert in sorted(rows):
            excluded = self.caller.excluded_replicas(self.call.layer, expert)
            if excluded:
                peer = excluded[self.call.step % len(excluded)]
                self.stats.probes += 1
                logger.info("probing excluded peer %s with expert[%d][%d]", peer, self.call.layer, expert)
                return expert, peer, self._start_call(peer, [expert], rows)
        return None

    async def _probed(
        self, outcomes: list[ExpertOutcome], probe: tuple[int, str, asyncio.Task[list[torch.Tensor]]] | None
    ) -> list[ExpertOutcome]:
        """Return the outcomes with the probe's comparison added to its expert's outcome."""
        if probe is None:
            return outcomes
        expert, peer, task = probe
        try:
            (output,) = await task
        except CallFailed as error:
            logger.info("probe of excluded peer %s failed: %s", peer, error.reason)
            return outcomes
        probed = []
        for outcome in outcomes:
            if outcome.expert == expert and outcome.chosen is not None:
                reference = outcome.outputs[outcome.grouping.references[0]]
                # Symmetrized like the grouping's distances, so equal bytes get equal distances.
                distance = max(relative_distance(output, reference), relative_distance(reference, output))
                tolerance = tolerance_for([*self._dtypes(), output.dtype])
                outcome = dataclasses.replace(outcome, probes=(Probe(peer, tensor_digest(output), distance, distance <= tolerance),))
            probed.append(outcome)
        return probed

    async def _publish(
        self, outcomes: list[ExpertOutcome], probe: tuple[int, str, asyncio.Task[list[torch.Tensor]]] | None = None
    ) -> None:
        outcomes = await self._probed(outcomes, probe)
        dtypes = self._dtypes()
        tolerance = tolerance_for(dtypes)
        dtype = str(least_precise(dtypes)).removeprefix("torch.")
        voter = self.settings.own_peer
        vote, decision = layer_events(self.call, outcomes, dtype, tolerance, self.rounds, voter, self.settings.lying)
        refs = (self.call.request_id,)
        vote_event = await self.settings.emit(vote, refs)
        decision_event = await self.settings.emit(decision, (*refs, vote_event.id))
        for peer in decision.dissenting:
            if peer == voter:
                continue
            logger.warning(
                "peer %s dissented on layer %d step %d of request %s; penalized",
                peer, self.call.layer, self.call.step, self.call.request_id[:12],
            )
            detail = f"layer {self.call.layer} step {self.call.step}: output outside the winning group"
            await self.settings.emit(PeerPenalized(peer, DISAGREED, (vote_event.id, decision_event.id), detail), refs)

    def _count(self, outcomes: list[ExpertOutcome]) -> None:
        self.stats.decisions += 1
        self.stats.no_quorum += any(outcome.chosen is None for outcome in outcomes)
        self.stats.spot_checks += self.spot_check
        self.stats.dissents += len({peer for outcome in outcomes if outcome.chosen is not None for peer in outcome.losers})

    def _no_quorum_message(self, outcome: ExpertOutcome) -> str:
        groups = [[outcome.producers[index][:12] for index in group] for group in outcome.grouping.groups]
        return (
            f"no quorum for expert[{self.call.layer}][{outcome.expert}] at step {self.call.step}: "
            f"{len(outcome.producers)} replicas split into groups {groups}, and no group is a strict majority"
        )
