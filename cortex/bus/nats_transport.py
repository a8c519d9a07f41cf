"""NATS transport: gossip on NATS subjects, history in a JetStream stream.

Subjects, for a prefix P (default `cortex`):

* `P.gossip.<topic>`: gossip frames. The JetStream stream `<P upper>_GOSSIP`
  captures them on file storage, so the server keeps the history within the
  retention limits of `NatsConfig`. Each publish carries `Nats-Msg-Id` (the
  frame digest), so the stream stores a frame republished within the
  duplicate window once.
* `P.sync.<peer id>`: requests to one node, answered with NATS request/reply.

Every message carries the header `Cortex-Sender` with the publisher's peer
id. NATS does not authenticate it; the bus relies on event signatures, not on
this header, for anything that matters.

The server's max payload (1 MiB by default) bounds a frame; `max_frame_bytes`
leaves room for the headers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError

from cortex.bus.errors import TransportError
from cortex.bus.nats_server import LocalNatsServer
from cortex.bus.transport import Delivery, FaultInjector, Transport

logger = logging.getLogger(__name__)

SENDER_HEADER = "Cortex-Sender"
MSG_ID_HEADER = "Nats-Msg-Id"
HEADER_ALLOWANCE_BYTES = 4 * 1024
PEER_FORGET_AFTER_S = 30.0
# The first connection must succeed within this time. nats-py retries an unreachable server
# forever when reconnects are unlimited, which would hang a node start on a wrong URL.
CONNECT_DEADLINE_S = 15.0
# A connection error is logged at most once per this many seconds while nats-py retries.
ERROR_LOG_INTERVAL_S = 10.0


@dataclass
class NatsConfig:
    """NATS server location and the retention limits of the JetStream stream."""

    url: str | None = None
    """Server URL; None starts a local nats-server with its store under `data_dir`."""
    data_dir: Path | None = None
    prefix: str = "cortex"
    history_max_age_s: float = 7 * 24 * 3600.0
    history_max_bytes: int = 1024 * 1024 * 1024
    duplicate_window_s: float = 120.0

    @property
    def stream_name(self) -> str:
        return f"{self.prefix.upper()}_GOSSIP"


class NatsTransport(Transport):
    """Gossip over core NATS publish/subscribe, sync over NATS request/reply."""

    name = "nats"

    def __init__(self, peer_id: str, config: NatsConfig, faults: FaultInjector | None = None) -> None:
        super().__init__(peer_id, faults)
        self.config = config
        self.server: LocalNatsServer | None = None
        self._client: Client | None = None
        self._js: JetStreamContext | None = None
        self._seen_peers: dict[str, float] = {}
        self._max_payload = 1024 * 1024
        self._last_error: BaseException | None = None
        self._last_error_logged = 0.0

    @property
    def max_frame_bytes(self) -> int:
        return self._max_payload - HEADER_ALLOWANCE_BYTES

    def peers(self) -> list[str]:
        horizon = time.monotonic() - PEER_FORGET_AFTER_S
        return sorted(peer for peer, seen in self._seen_peers.items() if seen >= horizon)

    @property
    def url(self) -> str:
        if self.config.url is not None:
            return self.config.url
        if self.server is None:
            raise TransportError("NATS transport has no URL and no local server; call start() first")
        return self.server.url

    async def _start(self) -> None:
        if self.config.url is None:
            if self.config.data_dir is None:
                raise TransportError("NatsConfig needs a url, or a data_dir for the local nats-server store")
            self.server = LocalNatsServer(Path(self.config.data_dir) / "nats")
            await self.server.start()
        try:
            self._client = await asyncio.wait_for(
                nats.connect(
                    self.url, name=self.peer_id, no_echo=True, max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5, connect_timeout=5, error_cb=self._on_error,
                ),
                timeout=CONNECT_DEADLINE_S,
            )
        except (Exception, asyncio.TimeoutError) as error:
            await self._stop_server()
            cause = self._last_error if isinstance(error, asyncio.TimeoutError) else error
            raise TransportError(
                f"cannot connect to NATS at {self.url} within {CONNECT_DEADLINE_S:.0f} s ({cause!r}); "
                "check that nats-server runs at that URL, or leave the NATS URL empty to start a local server"
            ) from None
        self._max_payload = self._client.max_payload
        self._js = self._client.jetstream()
        await self._ensure_stream()
        await self._client.subscribe(f"{self.config.prefix}.sync.{self.peer_id}", cb=self._on_request)
        logger.info("NATS transport %s connected to %s (max payload %d bytes)", self.peer_id, self.url, self._max_payload)

    async def _on_error(self, error: Exception) -> None:
        """Log a NATS connection error in one line, at most once per ERROR_LOG_INTERVAL_S."""
        self._last_error = error
        now = time.monotonic()
        if now - self._last_error_logged >= ERROR_LOG_INTERVAL_S:
            self._last_error_logged = now
            logger.warning("NATS connection to %s failed, retrying: %r", self.url, error)

    async def _ensure_stream(self) -> None:
        assert self._js is not None
        config = api.StreamConfig(
            name=self.config.stream_name,
            subjects=[f"{self.config.prefix}.gossip.>"],
            storage=api.StorageType.FILE,
            max_age=self.config.history_max_age_s,
            max_bytes=self.config.history_max_bytes,
            duplicate_window=self.config.duplicate_window_s,
            max_msg_size=self._max_payload,
        )
        try:
            await self._js.add_stream(config)
        except BadRequestError:
            # The stream exists with other limits (another node created it): adopt ours.
            await self._js.update_stream(config)

    async def _stop(self) -> None:
        client, self._client = self._client, None
        if client is not None and not client.is_closed:
            try:
                await client.drain()
            except Exception as error:  # noqa: BLE001 - closing anyway
                logger.warning("NATS drain failed, closing: %r", error)
                await client.close()
        await self._stop_server()
        logger.info("NATS transport %s stopped", self.peer_id)

    async def _stop_server(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def _publish(self, topic: str, data: bytes) -> None:
        assert self._client is not None
        headers = {MSG_ID_HEADER: hashlib.blake2b(data, digest_size=16).hexdigest(), SENDER_HEADER: self.peer_id}
        await self._client.publish(self._subject(topic), data, headers=headers)

    async def _subscribe(self, topic: str) -> None:
        assert self._client is not None

        async def on_message(message: Msg) -> None:
            sender = self._note_sender(message)
            self._deliver(Delivery(topic=topic, data=message.data, sender=sender))

        await self._client.subscribe(self._subject(topic), cb=on_message)
        # A PING round trip makes the server register the subscription before subscribe()
        # returns; without it, frames published right away from another connection can be missed.
        await self._client.flush(timeout=10)

    async def _request(self, peer: str, data: bytes, timeout: float) -> bytes:
        assert self._client is not None
        try:
            reply = await self._client.request(
                f"{self.config.prefix}.sync.{peer}", data, timeout=timeout, headers={SENDER_HEADER: self.peer_id}
            )
        except NoRespondersError:
            raise TransportError(f"no node serves sync requests as peer {peer} on NATS; check that it runs") from None
        except NatsTimeoutError:
            raise TimeoutError(f"sync request to peer {peer} timed out after {timeout} s") from None
        return reply.data

    async def _on_request(self, message: Msg) -> None:
        sender = self._note_sender(message)
        try:
            reply = await self._serve_request(sender, message.data)
        except Exception as error:  # noqa: BLE001 - one failed request must not stop the subscription
            logger.warning("sync request from %s failed: %r", sender, error)
            return
        await message.respond(reply)

    async def history(self, topic: str, idle_timeout_s: float = 2.0) -> AsyncIterator[bytes]:
        """Yield every frame the JetStream stream holds for `topic`, oldest first."""
        assert self._js is not None
        subscription = await self._js.subscribe(
            self._subject(topic), ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
        )
        try:
            while True:
                try:
                    message = await subscription.next_msg(timeout=idle_timeout_s)
                except NatsTimeoutError:
                    return
                yield message.data
                if message.metadata.num_pending == 0:
                    return
        finally:
            await subscription.unsubscribe()

    async def stream_info(self) -> Any:
        assert self._js is not None
        return await self._js.stream_info(self.config.stream_name)

    def _subject(self, topic: str) -> str:
        return f"{self.config.prefix}.gossip.{topic}"

    def _note_sender(self, message: Msg) -> str:
        sender = (message.headers or {}).get(SENDER_HEADER, "")
        if sender:
            self._seen_peers[sender] = time.monotonic()
        return sender
