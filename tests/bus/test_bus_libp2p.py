"""libp2p transport: Noise only, clean shutdown, and what the host refuses."""

from __future__ import annotations

import asyncio
import sys
import socket
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from cortex.bus.libp2p_transport import Libp2pTransport
from events.identity import Identity
from bus_helpers import libp2p_config, thread_names

pytestmark = pytest.mark.timeout(120)

SPEAKER = Path(__file__).with_name("restart_speaker.py")
SPEAKER_FRAMES = 30


def tcp_port(address: str) -> int:
    return int(multiaddr.Multiaddr(address).value_for_protocol("tcp"))


def plaintext_dial(address: str) -> str:
    """Dial `address` from a host that offers only /plaintext/2.0.0; return the outcome."""

    async def dial() -> str:
        identity = Identity.generate()
        key_pair = identity.to_libp2p_key_pair()
        host = new_host(key_pair=key_pair, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)})
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                with trio.fail_after(10):
                    await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(address)))
            except Exception as error:  # noqa: BLE001 - the outcome is the test's subject
                outcome = f"refused: {type(error).__name__}"
            else:
                outcome = "connected"
        await host.close()
        return outcome

    return trio.run(dial)


@pytest.mark.parametrize("quic", [False, True], ids=["tcp", "quic"])
async def test_stop_leaves_no_thread_or_listener(quic: bool) -> None:
    before = thread_names()
    transport = Libp2pTransport(libp2p_config(Identity.generate(), quic))
    await transport.start()
    await transport.subscribe("events")
    address = transport.listen_addresses[0]
    assert thread_names() - before, "the trio thread should run while started"
    await transport.stop()

    assert thread_names() - before == set()
    if not quic:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", tcp_port(address)), timeout=2).close()
    else:
        port = int(multiaddr.Multiaddr(address).value_for_protocol("udp"))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", port))  # the UDP port is free again


async def test_plaintext_dialer_refused_others_unaffected() -> None:
    listener = Libp2pTransport(libp2p_config(Identity.generate(), quic=False))
    await listener.start()
    try:
        subscription = await listener.subscribe("events")
        outcome = await asyncio.to_thread(plaintext_dial, listener.listen_addresses[0])
        assert outcome.startswith("refused"), outcome
        assert listener.peers() == []

        honest = Libp2pTransport(libp2p_config(Identity.generate(), False, [listener.listen_addresses[0]]))
        await honest.start()
        try:
            await honest.subscribe("events")
            async with asyncio.timeout(15):
                while honest.peer_id not in listener.peers():
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)
            await honest.publish("events", b"still working")
            delivery = await asyncio.wait_for(subscription.get(), 15)
            assert delivery.data == b"still working"
        finally:
            await honest.stop()
    finally:
        await listener.stop()


async def test_host_offers_noise_only() -> None:
    transport = Libp2pTransport(libp2p_config(Identity.generate(), quic=False))
    await transport.start()
    try:
        host = transport._host
        assert host is not None
        network: Any = host.get_network()
        offered = list(network.upgrader.security_multistream.transports.keys())
        assert offered == ["/noise"]
        assert getattr(host, "mDNS", None) is None
    finally:
        await transport.stop()



async def test_restart_with_same_key_is_heard(tmp_path: Path) -> None:
    """A node process restarted at once with its key is heard again: its message ids are new."""
    listener = Libp2pTransport(libp2p_config(Identity.generate(), quic=False))
    await listener.start()
    subscription = await listener.subscribe("events")
    key_path = tmp_path / "speaker.key"
    received: dict[int, set[bytes]] = {0: set(), 1: set()}
    try:
        for run in (0, 1):
            # Each run publishes 30 frames within a second, so the second run starts with the
            # first run's message-id counter still ahead of the clock in seconds.
            child = await asyncio.create_subprocess_exec(
                sys.executable, str(SPEAKER), str(key_path), listener.listen_addresses[0], str(run), str(SPEAKER_FRAMES)
            )
            async with asyncio.timeout(60):
                while len(received[run]) < SPEAKER_FRAMES:
                    delivery = await subscription.get()
                    if delivery.data.startswith(f"run {run} ".encode()):
                        received[run].add(delivery.data)
                assert await child.wait() == 0
    finally:
        await listener.stop()
    assert len(received[0]) == SPEAKER_FRAMES
    assert len(received[1]) == SPEAKER_FRAMES
