"""Every backend carries frames and requests behind the same interface."""

from __future__ import annotations

import asyncio
import os

import pytest

from cortex.bus.errors import FrameTooLarge, TransportClosed
from cortex.bus.libp2p_transport import Libp2pTransport
from cortex.bus.memory import MemoryNetwork, MemoryTransport
from cortex.bus.transport import FaultInjector, Transport

pytestmark = pytest.mark.timeout(120)


async def wait_connected(first: Transport, second: Transport) -> None:
    # gossipsub needs a heartbeat (1 s) after the connection before the mesh carries frames.
    if isinstance(first, Libp2pTransport):
        async with asyncio.timeout(15):
            while second.peer_id not in first.peers() or first.peer_id not in second.peers():
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)


async def test_frames_reach_subscriber(transport_pair: tuple[Transport, Transport]) -> None:
    first, second = transport_pair
    subscription = await first.subscribe("events")
    await second.subscribe("events")
    await wait_connected(first, second)
    frames = [os.urandom(1000) for _ in range(100)]
    for frame in frames:
        await second.publish("events", frame)
    received: list[bytes] = []
    async with asyncio.timeout(30):
        while len(received) < len(frames):
            delivery = await subscription.get()
            received.append(delivery.data)
            assert delivery.sender == second.peer_id
    assert sorted(received) == sorted(frames)


async def test_request_returns_reply(transport_pair: tuple[Transport, Transport]) -> None:
    first, second = transport_pair
    await wait_connected(first, second)

    async def serve(peer: str, data: bytes) -> bytes:
        return peer.encode() + b"|" + data[::-1]

    first.set_request_handler(serve)
    reply = await second.request(first.peer_id, b"abc" * 1000, timeout=10)
    assert reply == second.peer_id.encode() + b"|" + (b"abc" * 1000)[::-1]


async def test_oversized_frame_rejected(transport_pair: tuple[Transport, Transport]) -> None:
    first, _ = transport_pair
    with pytest.raises(FrameTooLarge):
        await first.publish("events", b"x" * (first.max_frame_bytes + 1))


async def test_fault_injector_drops_share() -> None:
    network = MemoryNetwork()
    faults = FaultInjector(drop_rate=0.5, seed=7)
    receiver = MemoryTransport(network, "receiver", faults=faults)
    sender = MemoryTransport(network, "sender")
    await receiver.start()
    await sender.start()
    subscription = await receiver.subscribe("events")
    for index in range(400):
        await sender.publish("events", index.to_bytes(4, "big"))
    await asyncio.sleep(0.05)
    received = subscription._queue.qsize()
    assert received + faults.dropped == 400
    assert 120 < faults.dropped < 280
    await sender.stop()
    await receiver.stop()


async def test_fault_injector_delays_frames() -> None:
    network = MemoryNetwork()
    receiver = MemoryTransport(network, "receiver", faults=FaultInjector(delay_rate=1.0, delay_s=0.2))
    sender = MemoryTransport(network, "sender")
    await receiver.start()
    await sender.start()
    subscription = await receiver.subscribe("events")
    await sender.publish("events", b"late")
    await asyncio.sleep(0.05)
    assert subscription._queue.qsize() == 0
    delivery = await asyncio.wait_for(subscription.get(), 5)
    assert delivery.data == b"late"
    await sender.stop()
    await receiver.stop()


def test_fault_injector_rejects_bad_rate() -> None:
    with pytest.raises(ValueError, match="drop_rate=1.5"):
        FaultInjector(drop_rate=1.5)


async def test_publish_after_stop_raises() -> None:
    transport = MemoryTransport(MemoryNetwork(), "alone")
    await transport.start()
    await transport.stop()
    with pytest.raises(TransportClosed):
        await transport.publish("events", b"x")
