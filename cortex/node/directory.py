"""Fragment holders: their ranking, and calls to them over the data plane.

`SwarmDirectory` is the node's `ReplicaDirectory` for the TokenRouter and the block caller
of its remote block executors. Holders of a fragment are ranked by:

1. no call failure in the last `FAILURE_MEMORY_S` seconds before a recent failure;
2. the scheduler's holder cost (`rank_replicas`: latency, load, trust), which ranks this
   node itself first (no network hop) and breaks ties by peer id.

Trust comes from the trust view (`cortex.quorum.TrustView`), as a weight trust / TRUST_MAX;
a peer the view excludes (trust below TRUST_THRESHOLD) is not ranked at all, so every node
that folded the same quorum events stops calling it. Failure times and round trips are this
node's own observations, a local cache outside the views (`PeerObservations`); the router
records the elapsed time of a call that lost to its hedge there too, so a straggler's
latency rises and its cost with it.

A call that waits longer than `PROBE_AFTER_S` probes the peer's TCP endpoint every
`PROBE_INTERVAL_S`: a refused connection means the process is gone (a crash sends no
`PeerLeft`), and the call fails at once instead of after its timeout, so the router or
the driver moves to another holder within about a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

import torch

from cortex.comm import CommError, DataPlane, ExpertBatchSent, StageInputSent
from cortex.driver.errors import CallFailed, abandon_call
from cortex.node.service import ModelService
from cortex.quorum import TRUST_MAX, TRUST_THRESHOLD, TrustView
from cortex.registry import RegistryView
from cortex.scheduler import SchedulerView
from cortex.scheduler.observations import PeerObservations
from cortex.scheduler.planning import PlanningContext, rank_replicas
from events import wall_clock_ms

logger = logging.getLogger(__name__)

FAILURE_MEMORY_S = 30.0
# Rankings are reused this long: liveness moves with 1 s heartbeats, and failures seen in the
# meantime are applied on top of a reused ranking.
RANKING_CACHE_S = 0.1
PROBE_AFTER_S = 0.5  # a call still waiting this long starts probing its peer's endpoint
PROBE_INTERVAL_S = 0.5
BLOCK_TIMEOUT_FACTOR = 4
UNKNOWN_REQUEST_GRACE_S = 5.0  # how long a peer may take to receive a request by gossip
UNKNOWN_REQUEST_RETRY_S = 0.05  # a block call waits for its expert calls, each with its own retries


class _UnknownRequest(Exception):
    """The peer rejected a call because the request has not reached it yet."""


class SwarmDirectory:
    """Live holders of one model's fragments, ranked, and data-plane calls to them."""

    def __init__(
        self,
        service: ModelService,
        registry: Callable[[], RegistryView],
        scheduler: Callable[[], SchedulerView],
        dataplane: DataPlane,
        own_peer: str,
        call_timeout_s: float,
        trust: Callable[[], TrustView] | None = None,
    ) -> None:
        self.service = service
        self.trust = trust
        self.registry = registry
        self.scheduler = scheduler
        self.dataplane = dataplane
        self.own_peer = own_peer
        self.call_timeout_s = call_timeout_s
        self.observations = PeerObservations(local_peer=own_peer)
        self.failures: dict[str, float] = {}
        self._ranked: dict[str, tuple[float, list[str]]] = {}
        self._context: tuple[float, PlanningContext] | None = None

    def holders(self, fragment: str) -> list[str]:
        """Return the live holders of `fragment`, best first."""
        now = time.monotonic()
        cached = self._ranked.get(fragment)
        if cached is not None and now - cached[0] < RANKING_CACHE_S:
            ranked = cached[1]
        else:
            if self._context is None or now - self._context[0] >= RANKING_CACHE_S:
                self._context = (now, self._planning_context())
            context = self._context[1]
            ranked = rank_replicas(context, context.registry.holders(self.service.model_id, fragment, context.now_ms))
            self._ranked[fragment] = (now, ranked)
        horizon = now - FAILURE_MEMORY_S
        return sorted(ranked, key=lambda peer: self.failures.get(peer, 0.0) > horizon)

    def _planning_context(self) -> PlanningContext:
        registry = self.registry()
        if self.trust is None:
            return PlanningContext(registry, self.scheduler(), wall_clock_ms(), self.observations)
        view = self.trust()
        weights = {peer: view.trust_of(peer) / TRUST_MAX for peer in registry.peers}
        # A weight above this floor means trust >= TRUST_THRESHOLD: the peer is not excluded.
        floor = (TRUST_THRESHOLD - 0.5) / TRUST_MAX
        return PlanningContext(registry, self.scheduler(), wall_clock_ms(), self.observations, trust=weights, min_trust=floor)

    def replicas(self, layer: int, expert: int) -> list[str]:
        return self.holders(f"expert[{layer}][{expert}]")

    def excluded_replicas(self, layer: int, expert: int) -> list[str]:
        """Return the live holders of expert[layer][expert] that the trust view excludes, by peer id."""
        if self.trust is None:
            return []
        view = self.trust()
        holders = self.registry().holders(self.service.model_id, f"expert[{layer}][{expert}]", wall_clock_ms())
        return sorted(peer for peer in holders if view.is_excluded(peer))

    def note_failure(self, peer: str) -> None:
        self.failures[peer] = time.monotonic()

    def endpoint(self, peer: str) -> str:
        record = self.registry().peers.get(peer)
        if record is None or record.announcement is None:
            raise CallFailed(peer, "lookup", "the peer has not announced a data endpoint")
        return record.announcement.data_endpoint

    async def call_experts(
        self, peer: str, request_id: str, step: int, segments: list[tuple[int, int, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Run each (layer, expert, rows [N, D]) on `peer` in one multi-expert data-plane call.

        Each segment travels as its own tensor, named `expert_tensor_name(layer, expert)`; one
        signed `ExpertBatchSent` record per layer describes them all; the reply has one output
        per segment, described by `ExpertBatchProduced` records.
        """
        if peer == self.own_peer:
            return [self.service.run_expert(layer, expert, rows) for layer, expert, rows in segments]
        tensors = {expert_tensor_name(layer, expert): rows for layer, expert, rows in segments}
        per_tensor = {expert_tensor_name(layer, expert): {"layer": layer, "expert": expert} for layer, expert, _ in segments}
        fields = {"model_id": self.service.model_id, "step": step}
        reply = await self._call(peer, "expert", request_id, ExpertBatchSent, fields, tensors, self.call_timeout_s, per_tensor)
        return [reply[expert_tensor_name(layer, expert)] for layer, expert, _ in segments]

    async def call_stage(self, peer: str, request_id: str, spec: str, position: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run `hidden` [T, D] at `position` through block `spec` on `peer`; return its output [T, D]."""
        start, stop = (int(part) for part in spec[len("block[") : -1].split(":"))
        fields = {"model_id": self.service.model_id, "step": position, "start": start, "stop": stop, "position": position}
        timeout = self.call_timeout_s * BLOCK_TIMEOUT_FACTOR
        outputs = await self._call(peer, "stage", request_id, StageInputSent, fields, {"hidden": hidden}, timeout)
        return outputs["hidden"]

    async def _call(
        self,
        peer: str,
        kind: str,
        request_id: str,
        record: type,
        fields: dict[str, object],
        tensors: dict[str, torch.Tensor],
        timeout: float,
        tensor_fields: Mapping[str, Mapping[str, object]] | None = None,
    ) -> dict[str, torch.Tensor]:
        # The request reaches the peer by gossip, which may arrive after the driver's first call:
        # a peer that does not know the request yet is asked again, and is not a failed replica.
        deadline = time.monotonic() + UNKNOWN_REQUEST_GRACE_S
        while True:
            try:
                return await self._call_once(peer, kind, request_id, record, fields, tensors, timeout, tensor_fields)
            except _UnknownRequest:
                if time.monotonic() > deadline:
                    self.note_failure(peer)
                    raise CallFailed(peer, kind, f"the peer did not learn of request {request_id[:12]} within {UNKNOWN_REQUEST_GRACE_S} s") from None
                await asyncio.sleep(UNKNOWN_REQUEST_RETRY_S)

    async def _call_once(
        self,
        peer: str,
        kind: str,
        request_id: str,
        record: type,
        fields: dict[str, object],
        tensors: dict[str, torch.Tensor],
        timeout: float,
        tensor_fields: Mapping[str, Mapping[str, object]] | None,
    ) -> dict[str, torch.Tensor]:
        started = time.monotonic()
        endpoint = self.endpoint(peer)
        self.observations.call_started(peer)
        call = asyncio.ensure_future(
            self.dataplane.call(
                peer, endpoint, kind, request_id=request_id, record=record, fields=fields,
                tensors=tensors, timeout_s=timeout, tensor_fields=tensor_fields,
            )
        )
        probe: asyncio.Future[None] | None = None
        try:
            # Most calls end well before PROBE_AFTER_S; only a call still waiting then starts a probe.
            await asyncio.wait((call,), timeout=PROBE_AFTER_S)
            if not call.done():
                probe = asyncio.ensure_future(_probe_until_refused(endpoint))
                await asyncio.wait((call, probe), return_when=asyncio.FIRST_COMPLETED)
            if not call.done():
                call.cancel()
                self.note_failure(peer)
                raise CallFailed(peer, kind, f"its endpoint {endpoint} refuses connections: the process is gone")
            reply = call.result()
        except CommError as error:
            if getattr(error, "reason", None) == "unknown_request":
                raise _UnknownRequest from None
            self.note_failure(peer)
            raise CallFailed(peer, kind, str(error)) from None
        finally:
            if probe is not None:
                probe.cancel()
            abandon_call(call)
            self.observations.call_finished(peer)
        self.observations.record_round_trip(peer, (time.monotonic() - started) * 1000)
        outputs = reply.tensors
        named = {received.name: received.fields for received in reply.outputs}
        for name, extra in (tensor_fields or {}).items():
            output_fields = named.get(name)
            if output_fields is None or any(output_fields.get(key) != value for key, value in extra.items()):
                self.note_failure(peer)
                raise CallFailed(peer, kind, f"the reply record of {name!r} does not name {extra}: {output_fields!r:.200}")
        for name, sent in tensors.items():
            output = outputs.get(name)
            if output is None or tuple(output.shape) != tuple(sent.shape):
                self.note_failure(peer)
                raise CallFailed(peer, kind, f"the reply contains {sorted(outputs)}, expected {name!r} of shape {list(sent.shape)}")
        return outputs


def expert_tensor_name(layer: int, expert: int) -> str:
    """Return the tensor name of expert[layer][expert]'s rows in a multi-expert call."""
    return f"expert[{layer}][{expert}]"


async def _probe_until_refused(endpoint: str) -> None:
    """Return once a TCP connection to `endpoint` (tcp://host:port) is refused; probe forever otherwise."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    host = host.strip("[]")
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), PROBE_INTERVAL_S)
        except ConnectionRefusedError:
            return
        except (OSError, TimeoutError, ValueError):
            pass
        else:
            writer.close()
        await asyncio.sleep(PROBE_INTERVAL_S)
