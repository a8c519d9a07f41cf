"""libp2p gossipsub transport: the peer-to-peer backend, run in its own trio thread.

Settings, each chosen for a behaviour measured with libp2p 0.8.1:

* Security: Noise only on TCP. `new_host` otherwise also offers TLS, SECIO
  and `/plaintext/2.0.0`, and accepts a dialer that offers only plaintext.
  QUIC (`/udp/N/quic-v1`) has TLS 1.3 built in and is the `quic` option.
* Gossipsub `/meshsub/1.1.0` only: 1.2 sends an IDONTWANT for every message
  and ran 2 to 3 times slower.
* Heartbeat 1 s (library default 120 s), so meshes form and repair quickly.
* Spam protection stays on but with a deliberate limit per forwarding peer
  and topic (`spam_frames_per_s`): at the library default of 10 messages/s
  it silently drops even the node's own publishes.
* Eclipse protection off: it grafts extra peers whenever the mesh has fewer
  than 3 distinct IPs, which is always true for peers on one host.
* mDNS off unless `mdns=True`.
* Frames over 1 MiB are dropped silently by the library and its per-peer
  outbound queues drop silently when 32 messages are waiting, so `publish`
  checks the size and waits until every peer queue has room.
* Shutdown: `host.close()` and `pubsub.seen_messages.stop()` are both needed,
  or listeners and the seen-cache sweeper thread are left behind.

Requests (the sync protocol) use a libp2p stream protocol, `/cortex/sync/1.0.0`:
one varint-prefixed request, one varint-prefixed reply, then the stream closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import OutBoundQueueSize
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from cortex.bus.errors import TransportError
from cortex.bus.transport import Delivery, FaultInjector, Transport
from cortex.bus.trio_bridge import TrioThread

logger = logging.getLogger(__name__)

SYNC_PROTOCOL = TProtocol("/cortex/sync/1.0.0")
LIBP2P_MAX_MESSAGE_BYTES = 1024 * 1024
# Room left for the pubsub envelope (from, seqno, topic, key, signature, sender record).
ENVELOPE_ALLOWANCE_BYTES = 16 * 1024
MAX_REPLY_BYTES = 8 * 1024 * 1024
# Publishing waits while any peer's outbound queue contains this many RPCs (the library drops at 32).
QUEUE_HIGH_WATER = OutBoundQueueSize - 8
OUTSTANDING_PUBLISHES = 16
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
QUEUE_WAIT_S = 10.0
SERVE_TIMEOUT_S = 10.0
REDIAL_INTERVAL_S = 1.0
REDIAL_GRACE_S = 3.0
HOUSEKEEPING_INTERVAL_S = 30.0


@dataclass
class Libp2pConfig:
    """Listen addresses, bootstrap peers and gossipsub tuning of a libp2p transport."""

    key_pair: KeyPair
    """The node's Ed25519 key pair (`Identity.to_libp2p_key_pair()`); it gives the peer id."""
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    """Multiaddrs with /p2p/<peer id> that the node dials at start and redials when disconnected."""
    quic: bool = False
    mdns: bool = False
    heartbeat_s: int = 1
    degree: int = 6
    degree_low: int = 4
    degree_high: int = 12
    spam_frames_per_s: float = 1000.0
    """Frames accepted per second from one forwarding peer on one topic. The bus sends at most
    about 1 / BusConfig.flush_delay_s frames/s of its own and also forwards its peers' frames."""

    @classmethod
    def for_quic(cls, key_pair: KeyPair, **kwargs: Any) -> Libp2pConfig:
        kwargs.setdefault("listen", ["/ip4/127.0.0.1/udp/0/quic-v1"])
        return cls(key_pair=key_pair, quic=True, **kwargs)


class Libp2pTransport(Transport):
    """Gossipsub over TCP+Noise (or QUIC) in a trio thread, bridged to asyncio."""

    name = "libp2p"

    def __init__(self, config: Libp2pConfig, faults: FaultInjector | None = None) -> None:
        self.config = config
        self._key_pair = config.key_pair
        super().__init__(ID.from_pubkey(self._key_pair.public_key).to_base58(), faults)
        self._trio = TrioThread(f"libp2p-{self.peer_id[-8:]}")
        self._host: IHost | None = None
        self._pubsub: Pubsub | None = None
        self._gossipsub: GossipSub | None = None
        self._nursery: trio.Nursery | None = None
        self._publish_slots = asyncio.Semaphore(OUTSTANDING_PUBLISHES)
        self.listen_addresses: list[str] = []
        self._connected: set[str] = set()
        self.queue_waits = 0

    @property
    def max_frame_bytes(self) -> int:
        return LIBP2P_MAX_MESSAGE_BYTES - ENVELOPE_ALLOWANCE_BYTES

    def peers(self) -> list[str]:
        return sorted(self._connected)

    # --- asyncio side -------------------------------------------------------

    async def _start(self) -> None:
        await self._trio.start(self._trio_main, START_TIMEOUT_S)
        logger.info("libp2p transport %s listening on %s", self.peer_id, self.listen_addresses)

    async def _stop(self) -> None:
        await self._trio.stop(STOP_TIMEOUT_S)
        logger.info("libp2p transport %s stopped", self.peer_id)

    async def _publish(self, topic: str, data: bytes) -> None:
        # Returns once gossipsub has queued the frame for every peer. A caller that publishes
        # in sequence (the bus's flush loop) so sends fewer, larger frames when libp2p is
        # slow, instead of piling up small ones.
        async with self._publish_slots:
            await self._trio.call(self._trio_publish, topic, data)

    async def _subscribe(self, topic: str) -> None:
        await self._trio.call(self._trio_subscribe, topic)

    async def _request(self, peer: str, data: bytes, timeout: float) -> bytes:
        return await self._trio.call(self._trio_request, peer, data, timeout)

    async def connect(self, address: str) -> None:
        """Dial a peer at a multiaddr that ends in /p2p/<peer id>."""
        self._check_running("connect")
        await self._trio.call(self._trio_connect, address)

    # --- trio side ----------------------------------------------------------

    def _build_host(self) -> IHost:
        listen = [multiaddr.Multiaddr(address) for address in self.config.listen]
        if self.config.quic:
            return new_host(key_pair=self._key_pair, enable_quic=True, listen_addrs=listen, enable_mDNS=self.config.mdns)
        noise = NoiseTransport(self._key_pair, noise_privkey=create_x25519_key_pair().private_key)
        return new_host(
            key_pair=self._key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            listen_addrs=listen,
            enable_mDNS=self.config.mdns,
        )

    def _build_gossipsub(self) -> GossipSub:
        return GossipSub(
            protocols=[PROTOCOL_ID_V11],
            degree=self.config.degree,
            degree_low=self.config.degree_low,
            degree_high=self.config.degree_high,
            heartbeat_initial_delay=0.1,
            heartbeat_interval=self.config.heartbeat_s,
            spam_protection_enabled=True,
            max_messages_per_topic_per_second=self.config.spam_frames_per_s,
            eclipse_protection_enabled=False,
        )

    async def _trio_main(self, nursery: trio.Nursery, ready: Callable[[], None], stopping: trio.Event) -> None:
        host = self._build_host()
        gossipsub = self._build_gossipsub()
        pubsub = Pubsub(host, gossipsub, strict_signing=True, max_inbound_rpc_size=LIBP2P_MAX_MESSAGE_BYTES)
        # Message ids are the author's peer id plus a counter that libp2p 0.8.1 starts at the
        # Unix time in seconds and raises by one per publish. A node that published faster than
        # one frame a second and restarts with its key would reuse ids that peers still hold
        # as seen, and they would drop its new frames. Starting at the time in nanoseconds keeps
        # the counter ahead of every id of an earlier run.
        pubsub.counter = time.time_ns()
        host.set_stream_handler(SYNC_PROTOCOL, self._trio_serve_request)
        listen = [multiaddr.Multiaddr(address) for address in self.config.listen]
        self._host, self._pubsub, self._gossipsub, self._nursery = host, pubsub, gossipsub, nursery
        try:
            async with host.run(listen_addrs=listen):
                async with background_trio_service(pubsub), background_trio_service(gossipsub):
                    await pubsub.wait_until_ready()
                    self.listen_addresses = [str(address) for address in host.get_addrs()]
                    for address in self.config.bootstrap:
                        if self._dials_first(address):
                            await self._trio_dial_quietly(address)
                    # Background loops and subscription readers live in their own nursery, so
                    # they end before pubsub and the host shut down (no dial into a closing host).
                    async with trio.open_nursery() as loops:
                        self._nursery = loops
                        loops.start_soon(self._trio_redial_loop)
                        loops.start_soon(self._trio_housekeeping_loop)
                        ready()
                        await stopping.wait()
                        loops.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                pubsub.seen_messages.stop()
                await host.close()

    async def _trio_publish(self, topic: str, data: bytes) -> None:
        assert self._pubsub is not None
        await self._trio_wait_for_queue_room()
        await self._pubsub.publish(topic, data)

    async def _trio_wait_for_queue_room(self) -> None:
        # NOTE: the library has no event for "queue drained", so this polls every 2 ms while full.
        # Only the queues of connected peers count: a peer that died keeps its queue until
        # libp2p notices, and its full queue would hold every publish, heartbeats included.
        assert self._pubsub is not None and self._host is not None
        with trio.move_on_after(QUEUE_WAIT_S):
            while self._full_queues():
                self.queue_waits += 1
                await trio.sleep(0.002)
            return
        logger.warning("libp2p outbound queues stayed full for %s s; publishing anyway", QUEUE_WAIT_S)

    def _full_queues(self) -> bool:
        """Return whether a connected peer's outbound queue is at QUEUE_HIGH_WATER."""
        assert self._pubsub is not None and self._host is not None
        full = [peer for peer, queue in self._pubsub.peer_queues.items() if len(queue) >= QUEUE_HIGH_WATER]
        if not full:
            return False
        connected = set(self._host.get_connected_peers())
        return any(peer in connected for peer in full)

    async def _trio_subscribe(self, topic: str) -> None:
        assert self._pubsub is not None and self._nursery is not None
        subscription = await self._pubsub.subscribe(topic)
        self._nursery.start_soon(self._trio_read_subscription, topic, subscription)

    async def _trio_read_subscription(self, topic: str, subscription: Any) -> None:
        # Reads at once and hands over without blocking, so the 32-message queue stays short.
        assert self._loop is not None
        loop = self._loop
        while True:
            message = await subscription.get()
            sender = ID(message.from_id).to_base58()
            loop.call_soon_threadsafe(self._deliver, Delivery(topic=topic, data=message.data, sender=sender))

    async def _trio_request(self, peer: str, data: bytes, timeout: float) -> bytes:
        assert self._host is not None
        with trio.fail_after(timeout):
            stream = await self._host.new_stream(ID.from_base58(peer), [SYNC_PROTOCOL])
            try:
                await stream.write(encode_varint_prefixed(data))
                return await read_varint_prefixed_bytes_limited(stream, MAX_REPLY_BYTES)
            finally:
                await stream.close()

    async def _trio_serve_request(self, stream: INetStream) -> None:
        assert self._loop is not None
        peer = stream.muxed_conn.peer_id.to_base58()
        try:
            request = await read_varint_prefixed_bytes_limited(stream, MAX_REPLY_BYTES)
            future = asyncio.run_coroutine_threadsafe(self._serve_request(peer, request), self._loop)
            done = trio.Event()
            token = trio.lowlevel.current_trio_token()
            future.add_done_callback(lambda _: token.run_sync_soon(done.set))
            with trio.fail_after(SERVE_TIMEOUT_S):
                await done.wait()
            await stream.write(encode_varint_prefixed(future.result()))
        except Exception as error:  # noqa: BLE001 - one failed request must not stop the host
            logger.warning("sync request from %s failed: %r", peer, error)
        finally:
            await stream.close()

    async def _trio_connect(self, address: str) -> None:
        assert self._host is not None
        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        await self._host.connect(info)

    async def _trio_dial_quietly(self, address: str) -> None:
        try:
            with trio.fail_after(5):
                await self._trio_connect(address)
        except Exception as error:  # noqa: BLE001 - the redial loop tries again
            logger.debug("dial %s failed: %r", address, error)

    def _dials_first(self, address: str) -> bool:
        # When two peers list each other, both dialing at once leaves two connections, and
        # gossipsub then delivered many frames only through IHAVE/IWANT a heartbeat later.
        # So the smaller peer id dials at once and the other waits REDIAL_GRACE_S.
        return self.peer_id < address.rsplit("/p2p/", 1)[-1]

    async def _trio_redial_loop(self) -> None:
        assert self._host is not None and self._loop is not None
        disconnected_since: dict[str, float] = {}
        while True:
            connected = {peer.to_base58() for peer in self._host.get_connected_peers()}
            self._loop.call_soon_threadsafe(self._set_connected, connected)
            now = trio.current_time()
            for address in self.config.bootstrap:
                peer = address.rsplit("/p2p/", 1)[-1]
                if peer in connected:
                    disconnected_since.pop(peer, None)
                    continue
                since = disconnected_since.setdefault(peer, now)
                if self._dials_first(address) or now - since >= REDIAL_GRACE_S:
                    await self._trio_dial_quietly(address)
            await trio.sleep(REDIAL_INTERVAL_S)

    def _set_connected(self, connected: set[str]) -> None:
        self._connected = connected

    async def _trio_housekeeping_loop(self) -> None:
        # NOTE: gossipsub 0.8.1 keeps every message in `equivocation_detection` forever; the bus
        # detects equivocation on its own events, so the map is cleared to bound memory.
        assert self._gossipsub is not None
        while True:
            await trio.sleep(HOUSEKEEPING_INTERVAL_S)
            self._gossipsub.equivocation_detection.clear()


def free_port_address(quic: bool) -> str:
    """Return a loopback listen multiaddr on a free port (TCP or UDP for QUIC)."""
    import socket

    kind = socket.SOCK_DGRAM if quic else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"/ip4/127.0.0.1/udp/{port}/quic-v1" if quic else f"/ip4/127.0.0.1/tcp/{port}"


__all__ = ["Libp2pConfig", "Libp2pTransport", "free_port_address"]
