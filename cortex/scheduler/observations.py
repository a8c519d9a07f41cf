"""Local observations of peers: round-trip latency and calls in flight, as this node measured them.

These are one node's measurements, not shared state: two nodes hold different numbers, and
nothing here is an event. Planning uses them only to rank holders that are equally valid,
and every plan that affects other nodes is published (`RequestAccepted`, `RouteReplanned`),
so the swarm never needs to agree on these numbers.

The cache reads no clock: callers pass measured durations in ms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LATENCY_SMOOTHING = 0.2  # weight of a new sample in the exponential moving average
DEFAULT_LATENCY_MS = 10.0  # assumed round trip to a peer never measured
LOCAL_LATENCY_MS = 0.0  # round trip to this node itself


@dataclass
class PeerObservations:
    """Smoothed round-trip times and in-flight call counts per peer id, measured by this node."""

    latency_ms: dict[str, float] = field(default_factory=dict)
    calls_in_flight: dict[str, int] = field(default_factory=dict)
    local_peer: str = ""

    def record_round_trip(self, peer_id: str, milliseconds: float) -> None:
        """Fold one measured round trip into the peer's moving average."""
        if milliseconds < 0:
            raise ValueError(f"a round trip of {milliseconds} ms to {peer_id} is negative; pass a measured duration")
        previous = self.latency_ms.get(peer_id)
        if previous is None:
            self.latency_ms[peer_id] = float(milliseconds)
        else:
            self.latency_ms[peer_id] = previous + LATENCY_SMOOTHING * (milliseconds - previous)

    def call_started(self, peer_id: str) -> None:
        """Count a call sent to the peer and not yet answered."""
        self.calls_in_flight[peer_id] = self.calls_in_flight.get(peer_id, 0) + 1

    def call_finished(self, peer_id: str) -> None:
        """Uncount a call to the peer that returned, failed or timed out."""
        remaining = self.calls_in_flight.get(peer_id, 0) - 1
        if remaining > 0:
            self.calls_in_flight[peer_id] = remaining
        else:
            self.calls_in_flight.pop(peer_id, None)

    def expected_latency_ms(self, peer_id: str) -> float:
        """Return the smoothed round trip to the peer, LOCAL_LATENCY_MS for this node, or DEFAULT_LATENCY_MS."""
        if peer_id == self.local_peer and peer_id:
            return LOCAL_LATENCY_MS
        return self.latency_ms.get(peer_id, DEFAULT_LATENCY_MS)

    def load(self, peer_id: str) -> int:
        """Return how many calls this node has in flight to the peer."""
        return self.calls_in_flight.get(peer_id, 0)
