"""Fixtures shared by the bus tests: transports of every backend on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from bus_helpers import libp2p_config

from cortex.bus.libp2p_transport import Libp2pTransport
from cortex.bus.nats_server import LocalNatsServer
from cortex.bus.nats_transport import NatsConfig, NatsTransport
from cortex.bus.transport import Transport
from events.identity import Identity


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[LocalNatsServer]:
    server = LocalNatsServer(tmp_path / "nats-shared")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(params=["memory", "libp2p-tcp", "libp2p-quic", "nats"])
async def transport_pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Transport, Transport]]:
    """Two started transports of one backend that reach each other."""
    kind: str = request.param
    first_identity, second_identity = Identity.generate(), Identity.generate()
    first: Transport
    second: Transport
    if kind == "memory":
        from cortex.bus.memory import MemoryNetwork, MemoryTransport

        network = MemoryNetwork()
        first = MemoryTransport(network, first_identity.peer_id)
        second = MemoryTransport(network, second_identity.peer_id)
        await first.start()
        await second.start()
    elif kind.startswith("libp2p"):
        quic = kind.endswith("quic")
        first = Libp2pTransport(libp2p_config(first_identity, quic))
        await first.start()
        second = Libp2pTransport(libp2p_config(second_identity, quic, [first.listen_addresses[0]]))
        await second.start()
    else:
        first = NatsTransport(first_identity.peer_id, NatsConfig(data_dir=tmp_path / "first"))
        await first.start()
        second = NatsTransport(second_identity.peer_id, NatsConfig(url=first.url))
        await second.start()
    try:
        yield first, second
    finally:
        await second.stop()
        await first.stop()
