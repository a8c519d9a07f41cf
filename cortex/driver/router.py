"""TokenRouter: runs one MoE layer's routed experts on remote replicas.

Shape legend: T = tokens of the call, K = experts per token, D = hidden size,
N = token rows sent to one expert.

For each paused MoE layer (`MoeCall`), the router:

1. groups the T x K (token, expert) slots by expert, using the routing decision the
   block computed with the model's own rule;
2. picks the replicas with a greedy cover (`cover_replicas`): each expert may go to one of
   its `COVER_CANDIDATES` best live replicas in the `ReplicaDirectory` ranking (the
   scheduler's replica cost), skipping peers that failed during this call, and the layer's
   experts go to as few replicas as possible, ties broken by calls in flight, then rank;
3. sends each chosen replica all its experts' rows in one multi-expert data-plane call,
   the calls to different replicas at once;
4. gathers the replies with the directory's timeout; a failed or timed-out batch is
   marked and its experts go to the next replica, until every expert has an output or an
   expert has no replica left (`NoLiveHolder`);
5. scatters the outputs back into [T, K, D] in the order of `expert_ids`.

Requests running at the same time send their calls independently; the replica merges the
calls for one expert that arrive together into one forward pass (`ExpertBatcher`).
`RouterStats` records which peer served which expert.

With quorum settings (`QuorumSettings`), a request of redundancy r > 1, or a call drawn for
a spot check, goes through `cortex.quorum.replicated.ReplicatedLayer` instead: r replicas
per expert, outputs compared, votes and decisions published. Peers that the trust view
excludes never appear in the directory's ranking.

Stragglers (`cortex.quorum.policy.StragglerPolicy`, on the path with one replica per expert):
each call has a deadline derived from the peer's expected latency, and a call still
unanswered after the hedge delay is sent again to the next replicas of its experts. The
first complete reply wins and the slow call is cancelled. Its elapsed time is recorded as the
peer's round trip, so later rankings avoid it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from cortex.driver.errors import CallFailed, NoLiveHolder, abandon_call
from cortex.quorum.policy import StragglerPolicy, spot_checked
from cortex.quorum.replicated import QuorumSettings, QuorumStats, ReplicatedLayer
from cortex.quorum.voting import LayerCall
from cortex.runtime.fragments import MoeCall
from cortex.scheduler.observations import DEFAULT_LATENCY_MS

logger = logging.getLogger(__name__)

MAX_ATTEMPTS_PER_EXPERT = 4
# An expert goes to one of its best COVER_CANDIDATES live replicas: the cover may trade a
# slightly worse ranked replica for one call less, never a replica ranked further down.
COVER_CANDIDATES = 2


class ReplicaDirectory(Protocol):
    call_timeout_s: float

    def replicas(self, layer: int, expert: int) -> list[str]:
        """Return the live peers holding expert[layer][expert], best first."""
        ...

    async def call_experts(
        self, peer: str, request_id: str, step: int, segments: list[tuple[int, int, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Run each (layer, expert, rows [N, D]) segment on `peer`; return the outputs [N, D] in order."""
        ...

    def note_failure(self, peer: str) -> None:
        """Record that a call to `peer` failed, so later rankings put it last."""
        ...


@dataclass
class RouterStats:
    """Counts of what the router did: expert rows per peer, batches, retries."""

    rows_by_peer: collections.Counter[str] = field(default_factory=collections.Counter)
    experts_by_peer: dict[str, set[str]] = field(default_factory=lambda: collections.defaultdict(set))
    batches: int = 0
    messages: int = 0
    retries: int = 0
    dispatches: int = 0  # MoE layers dispatched, prefill included
    single_token_dispatches: int = 0
    single_token_dispatch_s: float = 0.0  # wall time of dispatches of one token (decode steps)
    hedges: int = 0  # calls sent again to other replicas after the hedge delay
    hedges_won: int = 0  # hedged calls whose second reply came first
    deadlines_missed: int = 0
    quorum: QuorumStats = field(default_factory=QuorumStats)


class TokenRouter:
    """An `ExpertDispatcher` that runs experts on replicas named by a `ReplicaDirectory`."""

    def __init__(
        self, directory: ReplicaDirectory, quorum: QuorumSettings | None = None, stragglers: StragglerPolicy | None = None
    ) -> None:
        self.directory = directory
        self.quorum = quorum
        self.stragglers = stragglers or StragglerPolicy()
        self.stats = RouterStats()
        self._in_flight: collections.Counter[str] = collections.Counter()

    async def dispatch(self, session_id: str, call: MoeCall, step: int) -> torch.Tensor:
        started = time.perf_counter()
        outputs = await self._dispatch(session_id, call, step)
        self.stats.dispatches += 1
        if call.hidden.shape[0] == 1:
            self.stats.single_token_dispatches += 1
            self.stats.single_token_dispatch_s += time.perf_counter() - started
        return outputs

    async def _dispatch(self, session_id: str, call: MoeCall, step: int) -> torch.Tensor:
        expert_ids = call.routing.expert_ids  # [T, K]
        tokens, top_k = expert_ids.shape
        flat = expert_ids.reshape(-1)  # [T*K]
        order = torch.argsort(flat, stable=True)  # slots grouped by expert
        present, counts = torch.unique_consecutive(flat[order], return_counts=True)
        grouped = call.hidden[order // top_k]  # [T*K, D], the token of each slot
        starts = torch.cumsum(counts, 0) - counts
        pending = {
            int(expert): (int(start), int(count))
            for expert, start, count in zip(present.tolist(), starts.tolist(), counts.tolist(), strict=True)
        }
        outputs = torch.empty_like(grouped)
        replicas, spot_check_ppm = self._replication(session_id, step, call.layer)
        if replicas > 1:
            assert self.quorum is not None
            layer_call = LayerCall(session_id, self.quorum.model_id, step, call.layer, spot_check_ppm, self.quorum.policy.seed)
            layer = ReplicatedLayer(self, self.quorum, self.stats.quorum, layer_call, replicas)
            rows = {expert: grouped[start : start + count] for expert, (start, count) in pending.items()}
            for expert, output in (await layer.run(rows)).items():
                start, count = pending[expert]
                outputs[start : start + count] = output
            pending = {}
        failed: set[str] = set()
        attempts: collections.Counter[int] = collections.Counter()
        while pending:
            plan = self._assign(call.layer, pending, failed, attempts)
            results = await asyncio.gather(
                *(self._send(peer, call.layer, experts, pending, grouped, session_id, step) for peer, experts in plan.items()),
                return_exceptions=True,
            )
            for (peer, experts), result in zip(plan.items(), results, strict=True):
                if isinstance(result, CallFailed):
                    logger.warning("expert batch of layer %d on %s failed (%s); retrying on another replica", call.layer, peer, result.reason)
                    failed.add(peer)
                    self.directory.note_failure(peer)
                    self.stats.retries += 1
                    continue
                if isinstance(result, BaseException):
                    raise result
                offset = 0
                for expert in experts:
                    start, count = pending.pop(expert)
                    outputs[start : start + count] = result[offset : offset + count]
                    offset += count
                    self.stats.rows_by_peer[peer] += count
                    self.stats.experts_by_peer[peer].add(f"expert[{call.layer}][{expert}]")
        unsorted = torch.empty_like(outputs)
        unsorted[order] = outputs
        return unsorted.view(tokens, top_k, -1)  # [T, K, D]

    def _assign(
        self, layer: int, pending: dict[int, tuple[int, int]], failed: set[str], attempts: collections.Counter[int]
    ) -> dict[str, list[int]]:
        """Pick the replicas of the pending experts: a greedy cover over each expert's best live replicas."""
        candidates: dict[int, list[str]] = {}
        for expert in sorted(pending):
            attempts[expert] += 1
            live = [peer for peer in self.directory.replicas(layer, expert) if peer not in failed]
            if not live or attempts[expert] > MAX_ATTEMPTS_PER_EXPERT:
                raise NoLiveHolder(
                    f"expert[{layer}][{expert}] has no live replica left after {attempts[expert] - 1} attempts "
                    f"(failed: {', '.join(sorted(failed)) or 'none'}); start a node that holds it"
                )
            candidates[expert] = live[:COVER_CANDIDATES]
        return cover_replicas(candidates, self._in_flight, local=getattr(self.directory, "own_peer", None))

    def _replication(self, session_id: str, step: int, layer: int) -> tuple[int, int]:
        """Return (replicas per expert, spot-check probability in ppm or 0) for one layer call."""
        if self.quorum is None:
            return 1, 0
        policy = self.quorum.policy
        replicas = max(policy.redundancy, self.quorum.redundancy_of(session_id))
        if replicas > 1:
            return replicas, 0
        if spot_checked(policy.seed, session_id, step, layer, policy.spot_check_ppm):
            return 2, policy.spot_check_ppm
        return 1, 0

    def replicas(self, layer: int, expert: int) -> list[str]:
        return self.directory.replicas(layer, expert)

    def note_failure(self, peer: str) -> None:
        self.directory.note_failure(peer)

    async def call(self, peer: str, request_id: str, step: int, segments: list[tuple[int, int, torch.Tensor]]) -> list[torch.Tensor]:
        """Run the segments on `peer` within its deadline (the call timeout when no other replica exists); raise CallFailed past it."""
        self.stats.batches += 1
        self.stats.messages += len(segments)
        rows = sum(int(segment.shape[0]) for _, _, segment in segments)
        deadline = self.stragglers.deadline_s(self._expected_latency_ms(peer), self.directory.call_timeout_s, rows)
        self._in_flight[peer] += 1
        task = asyncio.ensure_future(self.directory.call_experts(peer, request_id, step, segments))
        try:
            done, _ = await asyncio.wait({task}, timeout=deadline)
            if not done and not self._has_other_replica(peer, segments):
                # No other replica can take this call, so failing it would leave the experts
                # without output. Wait for the only holder up to the call timeout instead.
                done, _ = await asyncio.wait({task}, timeout=max(self.directory.call_timeout_s - deadline, 0.0))
                deadline = max(deadline, self.directory.call_timeout_s)
            if not done:
                self.stats.deadlines_missed += 1
                raise CallFailed(peer, "expert", f"no reply within its deadline of {deadline:.2f} s")
            return task.result()
        finally:
            abandon_call(task)
            self._in_flight[peer] -= 1

    def _has_other_replica(self, peer: str, segments: list[tuple[int, int, torch.Tensor]]) -> bool:
        """Return whether every expert of the segments has a live replica other than `peer`."""
        return all(any(replica != peer for replica in self.directory.replicas(layer, expert)) for layer, expert, _ in segments)

    def _expected_latency_ms(self, peer: str) -> float:
        observations = getattr(self.directory, "observations", None)
        return DEFAULT_LATENCY_MS if observations is None else float(observations.expected_latency_ms(peer))

    def excluded_replicas(self, layer: int, expert: int) -> list[str]:
        lookup = getattr(self.directory, "excluded_replicas", None)
        return [] if lookup is None else list(lookup(layer, expert))

    def hedge_delay_s(self, peer: str, rows: int) -> float:
        return self.stragglers.hedge_delay_s(self._expected_latency_ms(peer), rows)

    def record_slow(self, peer: str, elapsed_s: float) -> None:
        self._record_slow(peer, elapsed_s)

    def _record_slow(self, peer: str, elapsed_s: float) -> None:
        observations = getattr(self.directory, "observations", None)
        if observations is not None:
            observations.record_round_trip(peer, elapsed_s * 1000)

    async def _send(
        self,
        peer: str,
        layer: int,
        experts: list[int],
        pending: dict[int, tuple[int, int]],
        grouped: torch.Tensor,
        session_id: str,
        step: int,
    ) -> torch.Tensor:
        segments = [(layer, expert, grouped[pending[expert][0] : pending[expert][0] + pending[expert][1]]) for expert in experts]
        outputs = await self._hedged(peer, session_id, step, segments)
        return torch.cat(outputs)  # [N, D] for every expert of this batch, in order

    async def _hedged(
        self, peer: str, session_id: str, step: int, segments: list[tuple[int, int, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Call `peer`, and past the hedge delay also the next replicas; return the first complete reply."""
        started = time.monotonic()
        primary = asyncio.ensure_future(self.call(peer, session_id, step, segments))
        try:
            if peer == getattr(self.directory, "own_peer", None):
                return await primary  # this node's own experts: no network to wait for
            rows = sum(int(segment.shape[0]) for _, _, segment in segments)
            delay = self.stragglers.hedge_delay_s(self._expected_latency_ms(peer), rows)
            done, _ = await asyncio.wait({primary}, timeout=delay)
            if done:
                return primary.result()
            backup_plan = self._backup_plan(peer, segments)
            if backup_plan is None:
                return await primary
            self.stats.hedges += 1
            logger.info("expert call of layer %d on %s unanswered after %.2f s; hedging on %s", segments[0][0], peer, delay, sorted(backup_plan))
            backup = asyncio.ensure_future(self._run_backup(backup_plan, session_id, step, segments))
            try:
                done, _ = await asyncio.wait({primary, backup}, return_when=asyncio.FIRST_COMPLETED)
                first = primary if primary in done and primary.exception() is None else backup
                if first is backup and backup in done and backup.exception() is not None:
                    first = primary
                result = await first
            finally:
                abandon_call(backup)
        finally:
            abandon_call(primary)
        if first is backup:
            self.stats.hedges_won += 1
            self._record_slow(peer, time.monotonic() - started)
        return result

    def _backup_plan(self, peer: str, segments: list[tuple[int, int, torch.Tensor]]) -> dict[str, list[int]] | None:
        """Return a cover of the segments' experts over replicas other than `peer`, or None if some expert has none."""
        candidates: dict[int, list[str]] = {}
        for layer, expert, _ in segments:
            others = [replica for replica in self.directory.replicas(layer, expert) if replica != peer]
            if not others:
                return None
            candidates[expert] = others[:COVER_CANDIDATES]
        return cover_replicas(candidates, self._in_flight, local=getattr(self.directory, "own_peer", None))

    async def _run_backup(
        self, plan: dict[str, list[int]], session_id: str, step: int, segments: list[tuple[int, int, torch.Tensor]]
    ) -> list[torch.Tensor]:
        by_expert = {expert: (layer, expert, rows) for layer, expert, rows in segments}
        replies = await asyncio.gather(
            *(self.call(replica, session_id, step, [by_expert[e] for e in experts]) for replica, experts in plan.items())
        )
        outputs: dict[int, torch.Tensor] = {}
        for experts, reply in zip(plan.values(), replies, strict=True):
            outputs.update(zip(experts, reply, strict=True))
        return [outputs[expert] for _, expert, _ in segments]


def cover_replicas(
    candidates: Mapping[int, Sequence[str]], load: Mapping[str, int], local: str | None = None
) -> dict[str, list[int]]:
    """Assign every expert to one of its candidate replicas (best first), using few replicas.

    The `local` peer (this node, whose experts cost no call) takes every expert it is a
    candidate for. Then greedy set cover: repeatedly take the replica that holds the most
    experts not yet assigned; ties go to the replica with fewer calls in flight (`load`),
    then to the one ranked better on average over those experts, then to the smaller peer
    id, so the same inputs always give the same plan. Returns the experts of each chosen
    replica, ascending.
    """
    plan: dict[str, list[int]] = {}
    uncovered = set(candidates)
    if local is not None:
        own = [expert for expert in sorted(candidates) if local in candidates[expert]]
        if own:
            plan[local] = own
            uncovered.difference_update(own)
    while uncovered:
        covers: dict[str, list[int]] = collections.defaultdict(list)
        positions: collections.Counter[str] = collections.Counter()
        for expert in sorted(uncovered):
            for position, peer in enumerate(candidates[expert]):
                covers[peer].append(expert)
                positions[peer] += position
        best = min(covers, key=lambda peer: (-len(covers[peer]), load.get(peer, 0), positions[peer] / len(covers[peer]), peer))
        plan[best] = covers[best]
        uncovered.difference_update(covers[best])
    return plan
