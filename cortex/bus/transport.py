"""The transport interface every bus backend implements, and fault injection.

A transport carries opaque byte frames. It does not decode events: the
bus above it batches events into frames and checks every event on receipt.

Two kinds of traffic cross a transport:

* gossip: `publish(topic, data)` sends a frame to every subscriber of the
  topic, best effort (frames may be lost, and a node's own frames are not
  delivered back to it);
* requests: `request(peer, data)` sends one message to one peer and returns
  its reply, the peer's handler being set with `set_request_handler`. The sync
  protocol of the bus runs on it.

`FaultInjector` drops or delays a share of inbound gossip frames so that tests
can exercise repair. Requests are never dropped by it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from cortex.bus.errors import FrameTooLarge, TransportClosed

logger = logging.getLogger(__name__)

RequestHandler = Callable[[str, bytes], Awaitable[bytes]]
"""Serves a request: takes the requesting peer id and the request bytes, returns the reply."""


@dataclass(frozen=True)
class Delivery:
    """A gossip frame received on a topic.

    `sender` is the peer id of the node that published the frame when the
    transport authenticates it (libp2p signs each message with the publisher's
    key), and the self-declared sender header on NATS and in memory.
    """

    topic: str
    data: bytes
    sender: str


@dataclass
class FaultInjector:
    """Drops `drop_rate` of inbound gossip frames and delays `delay_rate` of them by `delay_s`."""

    drop_rate: float = 0.0
    delay_rate: float = 0.0
    delay_s: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("drop_rate", "delay_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is outside [0, 1]; pass a share such as 0.1")
        self._random = random.Random(self.seed)
        self.dropped = 0
        self.delayed = 0

    def decide(self) -> float | None:
        """Return None to drop a frame, else the delay in seconds to apply (0 for none)."""
        if self.drop_rate and self._random.random() < self.drop_rate:
            self.dropped += 1
            return None
        if self.delay_rate and self._random.random() < self.delay_rate:
            self.delayed += 1
            return self.delay_s
        return 0.0


class Subscription:
    """Frames received on one topic, in arrival order, as an async iterator."""

    def __init__(self, topic: str, on_close: Callable[[Subscription], None]) -> None:
        self.topic = topic
        self._queue: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._on_close = on_close
        self._closed = False

    @property
    def pending(self) -> int:
        """Frames received but not yet taken by the consumer."""
        return self._queue.qsize()

    def put(self, delivery: Delivery) -> None:
        if not self._closed:
            self._queue.put_nowait(delivery)

    def get_nowait(self) -> Delivery | None:
        """Return the next queued frame, or None if none is queued (or the subscription closed)."""
        if self._queue.empty():
            return None
        item = self._queue.get_nowait()
        if item is None:
            self._queue.put_nowait(None)  # keep the close marker for the next get()
        return item

    async def get(self) -> Delivery:
        """Wait for the next frame; raises TransportClosed once the subscription is closed."""
        item = await self._queue.get()
        if item is None:
            raise TransportClosed(f"subscription to {self.topic!r} is closed")
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        self._on_close(self)

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Delivery]:
        while True:
            try:
                yield await self.get()
            except TransportClosed:
                return


class Transport(ABC):
    """One bus backend: gossip of opaque frames plus point-to-point requests.

    Subclasses implement the `_`-prefixed hooks and call `_deliver` for each
    inbound gossip frame, on the asyncio loop that called `start()`.
    """

    name: str = "abstract"

    def __init__(self, peer_id: str, faults: FaultInjector | None = None) -> None:
        self.peer_id = peer_id
        self.faults = faults
        self._subscriptions: dict[str, list[Subscription]] = {}
        self._request_handler: RequestHandler | None = None
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self._running

    @property
    @abstractmethod
    def max_frame_bytes(self) -> int:
        """Largest frame `publish` accepts."""

    async def start(self) -> None:
        """Connect or listen; after this, publish and subscribe work."""
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        await self._start()
        self._running = True

    async def stop(self) -> None:
        """Close every subscription and release sockets, threads and processes."""
        if not self._running:
            return
        self._running = False
        for subscriptions in list(self._subscriptions.values()):
            for subscription in list(subscriptions):
                subscription.close()
        await self._stop()

    async def publish(self, topic: str, data: bytes) -> None:
        """Send one frame to the subscribers of `topic` on other nodes (best effort)."""
        self._check_running("publish")
        if len(data) > self.max_frame_bytes:
            raise FrameTooLarge(len(data), self.max_frame_bytes)
        await self._publish(topic, data)

    async def subscribe(self, topic: str) -> Subscription:
        """Start receiving frames published on `topic` by other nodes."""
        self._check_running("subscribe")
        first = topic not in self._subscriptions
        subscription = Subscription(topic, self._remove_subscription)
        self._subscriptions.setdefault(topic, []).append(subscription)
        if first:
            await self._subscribe(topic)
        return subscription

    def set_request_handler(self, handler: RequestHandler) -> None:
        """Set the coroutine that serves requests from peers (one per transport)."""
        self._request_handler = handler

    async def request(self, peer: str, data: bytes, timeout: float) -> bytes:
        """Send `data` to `peer` and return its reply; raises TransportError or TimeoutError."""
        self._check_running("request")
        return await asyncio.wait_for(self._request(peer, data, timeout), timeout)

    @abstractmethod
    def peers(self) -> list[str]:
        """Peer ids this node can send requests to right now."""

    def _check_running(self, operation: str) -> None:
        if not self._running:
            raise TransportClosed(f"{self.name} transport: {operation}() called before start() or after stop()")

    def _remove_subscription(self, subscription: Subscription) -> None:
        subscriptions = self._subscriptions.get(subscription.topic, [])
        if subscription in subscriptions:
            subscriptions.remove(subscription)

    def _deliver(self, delivery: Delivery) -> None:
        """Hand an inbound frame to the topic's subscriptions, through the fault injector."""
        if not self._running:
            return
        if self.faults is not None:
            delay = self.faults.decide()
            if delay is None:
                logger.debug("fault injector dropped a frame on %s from %s", delivery.topic, delivery.sender)
                return
            if delay > 0 and self._loop is not None:
                self._loop.call_later(delay, self._fan_out, delivery)
                return
        self._fan_out(delivery)

    def _fan_out(self, delivery: Delivery) -> None:
        for subscription in self._subscriptions.get(delivery.topic, []):
            subscription.put(delivery)

    async def _serve_request(self, peer: str, data: bytes) -> bytes:
        if self._request_handler is None:
            raise TransportClosed(f"{self.name} transport has no request handler; call set_request_handler()")
        return await self._request_handler(peer, data)

    @abstractmethod
    async def _start(self) -> None: ...

    @abstractmethod
    async def _stop(self) -> None: ...

    @abstractmethod
    async def _publish(self, topic: str, data: bytes) -> None: ...

    @abstractmethod
    async def _subscribe(self, topic: str) -> None: ...

    @abstractmethod
    async def _request(self, peer: str, data: bytes, timeout: float) -> bytes: ...
