"""Where fragments live: replica ranking from the Registry view, and calls to their holders.

`SwarmDirectory` is the node's `ReplicaDirectory` for the TokenRouter and the factory of
remote block executors for the driver. Ranking of the live holders of a fragment:

1. peers with no call failure in the last `FAILURE_MEMORY_S` seconds before those with one;
2. this node itself (no network hop);
3. a rendezvous hash of (fragment, peer), so different experts spread over replicas the
   same way on every node while ties stay deterministic.

Failure times are this node's own observations, a local cache outside the views.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from cortex.driver.errors import CallFailed
from cortex.driver.records import ExpertBatchServed, tensor_digest
from cortex.node.channel import Channel
from cortex.node.service import ModelService
from cortex.registry import RegistryView
from events import Acceptor, EventRejected, wall_clock_ms

logger = logging.getLogger(__name__)

FAILURE_MEMORY_S = 30.0


def rendezvous_score(key: str, peer: str) -> bytes:
    return hashlib.blake2b(f"{key}\n{peer}".encode(), digest_size=16).digest()


class SwarmDirectory:
    """Live holders of one model's fragments, ranked, and calls to them over the channel."""

    def __init__(
        self,
        service: ModelService,
        registry: Callable[[], RegistryView],
        channel: Channel,
        acceptor: Acceptor,
        own_peer: str,
        call_timeout_s: float,
    ) -> None:
        self.service = service
        self.registry = registry
        self.channel = channel
        self.acceptor = acceptor
        self.own_peer = own_peer
        self.call_timeout_s = call_timeout_s
        self.failures: dict[str, float] = {}
        self.records: list[str] = []  # ids of ExpertBatchServed records accepted into the log

    def holders(self, fragment: str) -> list[str]:
        """Return the live holders of `fragment`, best first."""
        live = self.registry().holders(self.service.model_id, fragment, wall_clock_ms())
        horizon = time.monotonic() - FAILURE_MEMORY_S
        return sorted(
            live,
            key=lambda peer: (
                self.failures.get(peer, 0.0) > horizon,
                peer != self.own_peer,
                rendezvous_score(fragment, peer),
            ),
        )

    def replicas(self, layer: int, expert: int) -> list[str]:
        return self.holders(f"expert[{layer}][{expert}]")

    def note_failure(self, peer: str) -> None:
        self.failures[peer] = time.monotonic()

    def endpoint(self, peer: str) -> str:
        record = self.registry().peers.get(peer)
        if record is None or record.announcement is None:
            raise CallFailed(peer, "lookup", "peer has not announced a data endpoint")
        return record.announcement.data_endpoint

    async def call_experts(
        self, peer: str, segments: list[list[int]], rows: torch.Tensor, meta: dict[str, Any]
    ) -> torch.Tensor:
        if peer == self.own_peer:
            return self.service.run_experts(segments, rows)
        reply, tensors = await self.channel.call(
            peer,
            self.endpoint(peer),
            "experts",
            {"model": self.service.model_id, "segments": segments, **meta},
            [rows],
            self.call_timeout_s,
        )
        if len(tensors) != 1 or tuple(tensors[0].shape) != tuple(rows.shape):
            raise CallFailed(peer, "experts", f"reply holds {[list(t.shape) for t in tensors]}, expected [{list(rows.shape)}]")
        self._check_record(peer, reply, tensors[0])
        return tensors[0]

    def _check_record(self, peer: str, reply: dict[str, Any], outputs: torch.Tensor) -> None:
        """Accept the peer's signed record of the batch into the log after checking it matches."""
        try:
            wire = bytes.fromhex(str(reply.get("record", "")))
            event = self.acceptor.accept(wire)
        except (ValueError, EventRejected) as error:
            raise CallFailed(peer, "experts", f"the reply's record was rejected: {error}") from None
        if event is None:
            return
        body = event.body
        if event.author != peer or not isinstance(body, ExpertBatchServed) or body.output_digest != tensor_digest(outputs):
            raise CallFailed(peer, "experts", "the reply's record does not match its author or output bytes")
        self.records.append(event.id)

    async def call_block(
        self, peer: str, method: str, meta: dict[str, object], tensors: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Call `method` (`block` or `close`) on the block holder `peer`; raise CallFailed on failure."""
        try:
            _reply, outputs = await self.channel.call(peer, self.endpoint(peer), method, meta, tensors, self.call_timeout_s)
        except CallFailed:
            self.note_failure(peer)
            raise
        return outputs
