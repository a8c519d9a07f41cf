"""In-memory transport: every node of a swarm in one process, for unit tests only.

A `MemoryNetwork` is the shared medium. Gossip frames are delivered to the
other members on the next loop iteration (never to the publisher itself),
and requests call the target's handler directly.
"""

from __future__ import annotations

import asyncio

from cortex.bus.errors import TransportError
from cortex.bus.transport import Delivery, FaultInjector, Transport

MEMORY_MAX_FRAME_BYTES = 1024 * 1024


class MemoryNetwork:
    """The set of in-memory transports that can reach each other."""

    def __init__(self) -> None:
        self.members: dict[str, MemoryTransport] = {}


class MemoryTransport(Transport):
    """A transport whose peers are the other members of one `MemoryNetwork`."""

    name = "memory"

    def __init__(self, network: MemoryNetwork, peer_id: str, faults: FaultInjector | None = None) -> None:
        super().__init__(peer_id, faults)
        self.network = network

    @property
    def max_frame_bytes(self) -> int:
        return MEMORY_MAX_FRAME_BYTES

    def peers(self) -> list[str]:
        return [peer for peer, member in self.network.members.items() if peer != self.peer_id and member.running]

    async def _start(self) -> None:
        if self.peer_id in self.network.members:
            raise TransportError(f"peer id {self.peer_id} is already a member of this memory network")
        self.network.members[self.peer_id] = self

    async def _stop(self) -> None:
        self.network.members.pop(self.peer_id, None)

    async def _publish(self, topic: str, data: bytes) -> None:
        delivery = Delivery(topic=topic, data=data, sender=self.peer_id)
        for peer, member in list(self.network.members.items()):
            if peer != self.peer_id and member._loop is not None:
                member._loop.call_soon(member._deliver, delivery)
        await asyncio.sleep(0)

    async def _subscribe(self, topic: str) -> None:
        return None

    async def _request(self, peer: str, data: bytes, timeout: float) -> bytes:
        member = self.network.members.get(peer)
        if member is None or not member.running:
            raise TransportError(f"peer {peer} is not a running member of this memory network")
        return await member._serve_request(self.peer_id, data)
