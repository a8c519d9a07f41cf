"""Multi-process bus tests on loopback, the same scenario for libp2p TCP, libp2p QUIC and NATS.

Four node processes, 10% of inbound gossip frames dropped on every node:

1. nodes 0-2 publish 2,000 events each;
2. node 3 starts late, catches up, and publishes 2,000 events;
3. node 1 is killed with SIGKILL, node 0 publishes 200 more, node 1 restarts and
   catches up from its own log plus its peers;
4. node 2 publishes an event forged in node 0's name, which every node rejects;
5. every node ends with the same event-id set and the same Registry view digest;
6. every node stops cleanly: exit status 0 and only the main thread left.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import multiaddr
import pytest
from cortex.bus.cluster import Cluster, NodeProcess
from test_bus_libp2p import plaintext_dial

from cortex.bus.nats_server import LocalNatsServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]

EVENTS_PER_NODE = 2000
EXTRA_EVENTS = 200
DROP_RATE = 0.1


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    server = LocalNatsServer(tmp_path / "nats")
    asyncio.run(server.start())
    try:
        yield server.url
    finally:
        asyncio.run(server.stop())


def wait_for_rejection(node: NodeProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while node.command("status")["rejected"].get("bad_signature", 0) < 1:
        assert time.monotonic() < deadline, f"{node.name} never rejected the forged event"
        time.sleep(0.2)


@pytest.mark.parametrize("backend", ["libp2p-tcp", "libp2p-quic", "nats"])
def test_cluster_converges_and_recovers(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("nats_url") if backend == "nats" else None
    cluster = Cluster(backend, tmp_path / "cluster", size=4, drop=DROP_RATE, nats_url=url)
    first, killed, forger, late = cluster.nodes
    try:
        cluster.start_all([first, killed, forger])
        cluster.publish_all([first, killed, forger], EVENTS_PER_NODE)

        late.start()
        cluster.publish_all([late], EVENTS_PER_NODE)
        total = 4 * EVENTS_PER_NODE
        cluster.wait_converged(cluster.nodes, total, timeout=120)

        killed.kill()
        cluster.publish_all([first], EXTRA_EVENTS)
        killed.start()
        total += EXTRA_EVENTS

        # Three frames, so that the 10% drop rate cannot hide the forgery from a node.
        for _ in range(3):
            forger.command(f"forge {first.ready['peer_id']}")
        if backend == "libp2p-tcp":
            outcome = plaintext_dial(cluster.addresses[0])
            assert outcome.startswith("refused"), outcome

        statuses = cluster.wait_converged(cluster.nodes, total, timeout=120)
        assert len({status["ids_digest"] for status in statuses}) == 1
        assert len({status["registry_digest"] for status in statuses}) == 1
        for node, status in zip(cluster.nodes, statuses):
            expected_head = EVENTS_PER_NODE + (EXTRA_EVENTS if node is first else 0)
            assert status["heads"][node.ready["peer_id"]] == expected_head
        for node in (first, late):
            wait_for_rejection(node)
        repaired = sum(status["stats"].get("repaired_events", 0) for status in statuses)
        assert repaired > 0, "10% of frames were dropped, so repair must have fetched events"

        for node in cluster.nodes:
            reply = node.stop()
            assert reply["threads"] == ["MainThread"], reply
            assert node.process is not None and node.process.returncode == 0
        if backend == "libp2p-tcp":
            for address in cluster.addresses:
                port = int(multiaddr.Multiaddr(address).value_for_protocol("tcp"))
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        cluster.close()
