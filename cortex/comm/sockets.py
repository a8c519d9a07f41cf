"""ZeroMQ socket settings and the ZAP handler that authenticates CurveZMQ clients.

Every data-plane socket uses CurveZMQ with the node's key pair (the X25519 form of its
Ed25519 identity). A client (DEALER) names the server's public key, derived from the peer
id it calls, so the handshake fails unless the server has that peer's secret key. The
server (ROUTER) accepts any client key, because the swarm is open, but its ZAP handler
sets each connection's ZeroMQ `User-Id` to the client's public key in Z85. Every message
received on that connection carries this `User-Id`, and the data plane checks it against
the CurveZMQ key derived from the record events' author.
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio
from zmq.utils import z85

from cortex.comm.frames import MAX_FRAME_BYTES
from events import Identity

logger = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"cortex"
# Messages queued per connection before ZeroMQ blocks (DEALER) or drops (ROUTER). The
# high-water mark counts messages, not bytes, so it bounds memory only together with the
# message size limit.
HIGH_WATER_MARK = 256
RECONNECT_INTERVAL_MS = 100
RECONNECT_INTERVAL_MAX_MS = 2000


def configure_server(socket: zmq.Socket, identity: Identity) -> None:
    """Make `socket` a CurveZMQ server with this node's key, authenticated through ZAP."""
    socket.curve_server = True
    socket.curve_secretkey = identity.curve_secret_key
    socket.curve_publickey = identity.curve_public_key
    socket.zap_domain = ZAP_DOMAIN
    _configure_common(socket)


def configure_client(socket: zmq.Socket, identity: Identity, server_key: bytes) -> None:
    """Make `socket` a CurveZMQ client that only completes a handshake with `server_key` (Z85)."""
    socket.curve_serverkey = server_key
    socket.curve_secretkey = identity.curve_secret_key
    socket.curve_publickey = identity.curve_public_key
    # Queue calls only on a connection whose handshake completed, so a call to a peer that
    # is down or has another key waits (and times out) instead of being delivered later.
    socket.immediate = True
    socket.reconnect_ivl = RECONNECT_INTERVAL_MS
    socket.reconnect_ivl_max = RECONNECT_INTERVAL_MAX_MS
    _configure_common(socket)


def _configure_common(socket: zmq.Socket) -> None:
    socket.linger = 0
    socket.ipv6 = True
    socket.maxmsgsize = MAX_FRAME_BYTES
    socket.sndhwm = HIGH_WATER_MARK
    socket.rcvhwm = HIGH_WATER_MARK


class ZapHandler:
    """ZAP handler of one ZeroMQ context: it accepts CURVE clients and rejects other mechanisms.

    The reply's user id is the client's CurveZMQ public key in Z85, which ZeroMQ attaches
    to every message of that connection as the `User-Id` property.
    """

    def __init__(self, context: zmq.asyncio.Context) -> None:
        self._socket = context.socket(zmq.REP)
        self._socket.linger = 0
        self._socket.bind(ZAP_ENDPOINT)
        self.accepted = 0
        self.rejected = 0

    async def run(self) -> None:
        """Serve ZAP requests until cancelled."""
        while True:
            request = await self._socket.recv_multipart()
            await self._socket.send_multipart(self._reply_to(request))

    def _reply_to(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            self.rejected += 1
            return [b"1.0", b"", b"400", b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _routing_id, mechanism = request[:6]
        credentials = request[6:]
        if version != b"1.0" or mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self.rejected += 1
            logger.warning("rejected a data-plane connection from %r: mechanism %r is not CURVE", address, mechanism)
            return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]
        self.accepted += 1
        client_key: bytes = z85.encode(credentials[0])
        return [b"1.0", request_id, b"200", b"OK", client_key, b""]

    def close(self) -> None:
        self._socket.close(linger=0)


async def cancel_and_wait(tasks: list[asyncio.Task[None]], timeout: float) -> None:
    """Cancel tasks and wait for them to finish, at most `timeout` seconds."""
    for task in tasks:
        task.cancel()
    if tasks:
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            logger.error("task %s did not stop within %.1f s of cancellation", task.get_name(), timeout)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                logger.error("task %s failed: %r", task.get_name(), task.exception())
