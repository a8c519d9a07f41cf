"""Errors raised by the gossip bus and its transports."""

from __future__ import annotations


class BusError(Exception):
    """Base class of every error the bus raises."""


class TransportError(BusError):
    """A transport failed to start, publish, subscribe or serve a request."""


class TransportClosed(TransportError):
    """The transport was used before `start()` or after `stop()`."""


class FrameTooLarge(BusError):
    """A frame exceeds the size a transport can carry."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"frame of {size} bytes exceeds the limit of {limit} bytes; "
            f"lower BusConfig.max_frame_bytes or split the payload"
        )
        self.size = size
        self.limit = limit


class FrameDecodeError(BusError):
    """Bytes received from a peer are not a valid frame or sync message."""


class SyncError(BusError):
    """A sync request failed: the peer was unreachable, timed out or returned an error."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"sync with peer {peer} failed: {reason}")
        self.peer = peer
        self.reason = reason
