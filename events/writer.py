"""EventWriter: the only way a node creates its own events.

The writer picks the next sequence number and Lamport clock, signs, and appends the event to
the log in a durable transaction (WAL fsynced) before it returns the event for publishing. So
every event that left the node is in its log. After any crash, SIGKILL or power loss
included, the writer resumes from the highest stored seq, so it never signs two events with
one seq, which peers would record as equivocation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from events.acceptance import Acceptor
from events.codec import MAX_INT, Event, sign_event
from events.errors import EventError
from events.identity import Identity

logger = logging.getLogger(__name__)


def wall_clock_ms() -> int:
    """Return the wall clock in integer milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


class EventWriter:
    """Signs, appends and returns this node's own events with fresh seq and Lamport values."""

    def __init__(self, identity: Identity, acceptor: Acceptor, clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        if acceptor.own_peer_id != identity.peer_id:
            raise EventError(
                f"the acceptor's own_peer_id is {acceptor.own_peer_id}, but the writer's identity is "
                f"{identity.peer_id}; build the Acceptor with own_peer_id=identity.peer_id"
            )
        self.identity = identity
        self.acceptor = acceptor
        self._clock_ms = clock_ms
        self._last_seq = acceptor.store.max_seq(identity.peer_id)
        if self._last_seq:
            logger.info("event writer for %s resumes after seq %d", identity.peer_id, self._last_seq)

    @property
    def last_seq(self) -> int:
        """The seq of the last event this node wrote, 0 if none."""
        return self._last_seq

    def write(self, body: Any, refs: tuple[str, ...] = ()) -> Event:
        """Sign `body` as this node's next event, append it durably and fold it into the views.

        Returns the event; publish `event.wire` only after this returns. If the append fails
        the seq is not used, and the next call signs a new event with that seq.
        """
        seq = self._last_seq + 1
        lamport = self.acceptor.lamport + 1
        # NOTE: a valid peer can sign an event with a Lamport clock near 2**63 and so exhaust
        # every node's clock. Bounding the jump a peer may make is left to the admission policy.
        if lamport > MAX_INT:
            raise EventError(f"the Lamport clock reached the limit of {MAX_INT}; this log cannot grow further")
        event = sign_event(self.identity, body, seq=seq, lamport=lamport, time_ms=self._clock_ms(), refs=refs)
        self.acceptor.accept_own(event)
        self._last_seq = seq
        logger.debug("wrote %s seq %d lamport %d id %s", event.type, seq, lamport, event.id)
        return event
