"""PeerChannel: one DEALER connection to one peer, with many calls in flight at once.

Each call has an id unique within the data plane. The channel sends the call's message and
parks a future under that id. One receive task reads every reply on the socket and resolves
the future whose id the reply header names. Calls therefore overlap: the channel never waits
for one reply before sending the next call. A reply whose call already timed out or was
cancelled is dropped and counted as late.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

import zmq
import zmq.asyncio

from cortex.comm.errors import DataPlaneClosed, FrameReason, FrameRejected
from cortex.comm.frames import Header, Part, decode_header
from cortex.comm.sockets import configure_client
from events import Identity, curve_public_key_from_peer_id

logger = logging.getLogger(__name__)

ReplyFrames = tuple[Header, list[zmq.Frame]]


class PeerChannel:
    """A CurveZMQ DEALER connected to `endpoint`, which must hold the secret key of `peer_id`."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        identity: Identity,
        peer_id: str,
        endpoint: str,
        counters: collections.Counter[str],
        on_bad_header: Callable[[str, FrameRejected], None],
    ) -> None:
        self.peer_id = peer_id
        self.endpoint = endpoint
        self._counters = counters
        self._on_bad_header = on_bad_header
        self._pending: dict[int, asyncio.Future[ReplyFrames]] = {}
        self._socket = context.socket(zmq.DEALER)
        configure_client(self._socket, identity, curve_public_key_from_peer_id(peer_id))
        self._socket.connect(endpoint)
        self._receiver = asyncio.get_running_loop().create_task(self._receive(), name=f"comm-receive-{peer_id[-8:]}")
        self.closed = False

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def request(self, call_id: int, parts: list[Part]) -> ReplyFrames:
        """Send a call, empty `parts`, and wait for the reply; the caller bounds the wait with a timeout.

        Emptying `parts` drops the references to zero-copy frames, so their send trackers can
        finish while the call waits.
        """
        if self.closed:
            raise DataPlaneClosed(f"the channel to {self.peer_id} at {self.endpoint} is closed")
        future: asyncio.Future[ReplyFrames] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            await self._socket.send_multipart(parts, copy=False)
            parts.clear()
            return await future
        finally:
            self._pending.pop(call_id, None)

    async def _receive(self) -> None:
        while True:
            frames = await self._socket.recv_multipart(copy=False)
            try:
                header = decode_header(frames[0].buffer)
            except FrameRejected as rejection:
                self._on_bad_header(self.peer_id, rejection)
                continue
            if header.op == "call":
                self._on_bad_header(self.peer_id, FrameRejected(FrameReason.MALFORMED, "the server sent a call frame instead of a reply"))
                continue
            future = self._pending.pop(header.call_id, None)
            if future is None or future.done():
                self._counters["late_replies"] += 1
                logger.debug("dropped a reply to call %d from %s: the call already ended", header.call_id, self.peer_id)
                continue
            future.set_result((header, frames[1:]))

    async def close(self, error: Exception | None = None) -> None:
        """Stop the receive task, fail waiting calls with `error` and close the socket (linger 0)."""
        if self.closed:
            return
        self.closed = True
        self._receiver.cancel()
        await asyncio.gather(self._receiver, return_exceptions=True)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error or DataPlaneClosed(f"the channel to {self.peer_id} was closed during the call"))
        self._pending.clear()
        self._socket.close(linger=0)

