"""NATS transport: local server lifecycle, JetStream history and deduplication."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cortex.bus.nats_server import LocalNatsServer
from cortex.bus.nats_transport import NatsConfig, NatsTransport
from events.identity import Identity

pytestmark = pytest.mark.timeout(60)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_local_server_started_and_stopped(tmp_path: Path) -> None:
    transport = NatsTransport(Identity.generate().peer_id, NatsConfig(data_dir=tmp_path))
    await transport.start()
    assert transport.server is not None
    pid = transport.server.pid
    assert pid is not None and process_exists(pid)
    assert (tmp_path / "nats" / "jetstream").is_dir()
    await transport.stop()
    # The server was reaped, so its pid no longer exists.
    assert not process_exists(pid)


async def test_history_keeps_frames_and_dedups(nats_server: LocalNatsServer) -> None:
    publisher = NatsTransport(Identity.generate().peer_id, NatsConfig(url=nats_server.url))
    late = NatsTransport(Identity.generate().peer_id, NatsConfig(url=nats_server.url))
    await publisher.start()
    frames = [os.urandom(200) for _ in range(20)]
    for frame in frames:
        await publisher.publish("events", frame)
    await publisher.publish("events", frames[0])  # same Nats-Msg-Id: stored once
    await asyncio.sleep(0.2)
    await late.start()
    history = [frame async for frame in late.history("events")]
    assert history == frames
    info = await late.stream_info()
    assert info.state.messages == len(frames)
    await late.stop()
    await publisher.stop()


async def test_request_to_absent_peer_fails(nats_server: LocalNatsServer) -> None:
    from cortex.bus.errors import TransportError

    transport = NatsTransport(Identity.generate().peer_id, NatsConfig(url=nats_server.url))
    await transport.start()
    try:
        with pytest.raises(TransportError, match="no node serves sync requests"):
            await transport.request(Identity.generate().peer_id, b"x", timeout=2)
    finally:
        await transport.stop()


async def test_unreachable_server_fails_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing listens on port 1 of the loopback, so the first connection can never succeed.
    import cortex.bus.nats_transport as nats_transport
    from cortex.bus.errors import TransportError

    monkeypatch.setattr(nats_transport, "CONNECT_DEADLINE_S", 2.0)
    identity = Identity.load_or_create(tmp_path / "node.key")
    transport = NatsTransport(identity.peer_id, NatsConfig(url="nats://127.0.0.1:1"))
    with pytest.raises(TransportError) as error:
        async with asyncio.timeout(20):
            await transport.start()
    assert "nats://127.0.0.1:1" in str(error.value)
    assert "check that nats-server runs" in str(error.value)
