"""The gossip bus: signed events reach every node over one of three transports.

Transports (`Transport`) carry opaque byte frames: `MemoryTransport` inside
one process for unit tests, `Libp2pTransport` (gossipsub, peer to peer) and
`NatsTransport` (NATS with a JetStream history). See docs/bus.md.
"""

from cortex.bus.errors import BusError, FrameDecodeError, FrameTooLarge, SyncError, TransportClosed, TransportError
from cortex.bus.transport import Delivery, FaultInjector, RequestHandler, Subscription, Transport

__all__ = [
    "BusError",
    "Delivery",
    "FaultInjector",
    "FrameDecodeError",
    "FrameTooLarge",
    "RequestHandler",
    "Subscription",
    "SyncError",
    "Transport",
    "TransportClosed",
    "TransportError",
]
