"""`cortex tail --bus ADDRESS`: print events live from the gossip bus, as a listener.

The tail joins the bus the way a node does, through the same `Transport` classes, with a
fresh throwaway identity, and only listens: it publishes nothing and answers no sync
requests. Every event of every EVENTS frame is decoded and its signature checked, like on
the node's acceptance path, and events that fail are counted, logged and skipped. Gossip may
deliver an event more than once (a republished frame), so the ids of the last
`DEDUPLICATE_WINDOW` events are remembered and repeats are dropped.

Addresses:

    nats://HOST:PORT                       a NATS server (the JetStream history is not read)
    /ip4/HOST/tcp/PORT/p2p/PEER_ID         a libp2p node to bootstrap from (gossipsub)
    /ip4/HOST/udp/PORT/quic-v1/p2p/PEER_ID the same over QUIC

Only events published after the subscription starts are shown; a node's log has the past.

NOTE: the tail only listens to gossip. A node's bus fetches events that gossip lost
(anti-entropy); the tail does not, so over libp2p, where gossipsub drops frames under load,
some events can be missing from its output. Follow the node's log for a complete view.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from events.codec import Event, decode_event
from events.errors import EventRejected
from events.identity import Identity
from replay.errors import ReplayError
from replay.reader import EventFilter

if TYPE_CHECKING:
    from cortex.bus.transport import Transport

logger = logging.getLogger(__name__)

DEFAULT_TOPIC = "events"
DEDUPLICATE_WINDOW = 100_000


class BusAddressError(ReplayError):
    """A `--bus` address is not a NATS URL or a libp2p multiaddr with a peer id."""


def transport_for(address: str) -> Transport:
    """Build the bus transport that reaches `address`, with a throwaway identity."""
    identity = Identity.generate()
    if address.startswith(("nats://", "tls://")):
        from cortex.bus.nats_transport import NatsConfig, NatsTransport

        return NatsTransport(identity.peer_id, NatsConfig(url=address))
    if address.startswith(("/ip4/", "/ip6/", "/dns")) and "/p2p/" in address:
        from cortex.bus.libp2p_transport import Libp2pConfig, Libp2pTransport

        key_pair = identity.to_libp2p_key_pair()
        quic = "/quic" in address
        config = Libp2pConfig.for_quic(key_pair) if quic else Libp2pConfig(key_pair=key_pair)
        config.bootstrap = [address]
        return Libp2pTransport(config)
    raise BusAddressError(
        f"bus address {address!r} is neither a NATS URL (nats://HOST:PORT) nor a libp2p multiaddr "
        "with a peer id (/ip4/HOST/tcp/PORT/p2p/PEER_ID)"
    )


class BusTail:
    """Decodes, checks, deduplicates and filters the events of gossip frames."""

    def __init__(self, event_filter: EventFilter, sink: Callable[[Event], None]) -> None:
        self.event_filter = event_filter
        self.sink = sink
        self.rejected: collections.Counter[str] = collections.Counter()
        self.printed = 0
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()

    def on_frame(self, data: bytes) -> None:
        """Handle one gossip frame: print each new, valid, matching event in it."""
        from cortex.bus import frames
        from cortex.bus.errors import FrameDecodeError

        try:
            kind, body = frames.decode_kind(data)
            if kind != frames.Kind.EVENTS:
                return
            wires = frames.decode_events_body(body)
        except FrameDecodeError as error:
            self._count("bad_frame", str(error))
            return
        for wire in wires:
            try:
                event = decode_event(wire)
            except EventRejected as error:
                self._count(error.reason.value, str(error))
                continue
            if event.id in self._recent:
                continue
            self._recent[event.id] = None
            if len(self._recent) > DEDUPLICATE_WINDOW:
                self._recent.popitem(last=False)
            if self.event_filter.matches(event):
                self.sink(event)
                self.printed += 1

    def _count(self, reason: str, message: str) -> None:
        count = self.rejected[reason] = self.rejected[reason] + 1
        # Log the 1st, 2nd, 4th, 8th, ... of each reason, so a flood cannot fill stderr.
        if count & (count - 1) == 0:
            logger.warning("skipped a bus event (%d so far for %s): %s", count, reason, message)


async def follow_bus(
    address: str,
    tail: BusTail,
    duration_s: float | None,
    on_ready: Callable[[], None] = lambda: None,
    topic: str = DEFAULT_TOPIC,
) -> None:
    """Subscribe to the bus at `address` and feed frames to `tail` until `duration_s` passes."""
    from cortex.bus.errors import TransportClosed, TransportError

    transport = transport_for(address)
    try:
        await transport.start()
        subscription = await transport.subscribe(topic)
    except (TransportError, OSError) as error:
        await transport.stop()
        raise ReplayError(f"cannot join the bus at {address}: {error}") from error
    on_ready()
    deadline = None if duration_s is None else time.monotonic() + duration_s
    try:
        while True:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                break
            try:
                delivery = await asyncio.wait_for(subscription.get(), timeout)
            except (TimeoutError, TransportClosed):
                break
            tail.on_frame(delivery.data)
    finally:
        subscription.close()
        await transport.stop()
