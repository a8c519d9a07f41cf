"""Quorum and straggler policies: how many replicas a call goes to, and when to hedge it.

Redundancy: a request asks for `redundancy` r (RequestSubmitted, 1 to 8), and a node's
`QuorumPolicy.redundancy` is the minimum it applies to every request it routes (a model
policy). Each expert call then goes to r distinct trusted replicas.

Spot checks: with r = 1, a call is still sent to a second replica with probability
`spot_check_ppm` / 1e6. The choice is a pure function of the policy seed, the request, the
step and the layer (`spot_checked`), so replay recomputes it from the seed and probability
that each spot-check vote records.

Probes: an excluded peer gets no calls, so it could never show agreeing results again. With
probability `probe_ppm` / 1e6 (drawn like a spot check, with a salted seed), a replicated
layer call also sends one expert's rows to one excluded holder of it. The probe's output is
compared with the winning group but never used and never counts toward the quorum; the
decision lists the probed peer as agreeing or dissenting, so its trust follows the rule.

Stragglers (`StragglerPolicy`): a call with no reply after the hedge delay is sent again to
the next replica, and the first reply wins. The hedge delay is
`clamp(HEDGE_LATENCY_FACTOR * expected latency * size, HEDGE_MIN_S, HEDGE_MAX_S)`. The
expected latency is this node's smoothed round trip to the peer, which decode calls of a
few rows dominate, so `size = max(1, rows / ROWS_PER_LATENCY)` gives a prefill call with
many rows more time. A call also has its own deadline,
`clamp(DEADLINE_LATENCY_FACTOR * expected latency * size, DEADLINE_MIN_S, call timeout)`,
after which it fails and is retried elsewhere like a call to a dead peer. A call that lost to its hedge is
recorded as a round trip of its elapsed time, a lower bound, so the slow peer's smoothed
latency rises and later rankings put it behind the others.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cortex.quorum.events import PPM

HEDGE_LATENCY_FACTOR = 4.0
HEDGE_MIN_S = 0.2  # below this, scheduling noise on a loaded host would hedge healthy calls
ROWS_PER_LATENCY = 16  # rows of a typical call behind the smoothed latency (a decode step, top-k experts)
HEDGE_MAX_S = 1.0
DEADLINE_LATENCY_FACTOR = 20.0
DEADLINE_MIN_S = 2.0  # a first call (prefill) runs many rows, so the deadline never drops below this
MAX_EXTRA_REPLICAS = 2  # replicas asked beyond r when the first r outputs form no quorum
PROBE_PPM = 20_000  # share of replicated layer calls that also probe an excluded holder
PROBE_SEED_SALT = 0x70726F6265  # keeps probe draws independent of spot-check draws


@dataclass(frozen=True)
class QuorumPolicy:
    """A node's quorum settings: the minimum redundancy and the spot-check probability and seed."""

    redundancy: int = 1
    spot_check_ppm: int = 0
    seed: int = 0
    probe_ppm: int = PROBE_PPM

    def __post_init__(self) -> None:
        if not 1 <= self.redundancy <= 8:
            raise ValueError(f"redundancy must be in 1..8, got {self.redundancy}")
        if not 0 <= self.spot_check_ppm <= PPM:
            raise ValueError(f"spot_check_ppm must be in 0..{PPM}, got {self.spot_check_ppm}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in 0..2**63-1, got {self.seed}")
        if not 0 <= self.probe_ppm <= PPM:
            raise ValueError(f"probe_ppm must be in 0..{PPM}, got {self.probe_ppm}")

    def probes(self, request_id: str, step: int, layer: int) -> bool:
        """Return whether this replicated layer call also probes an excluded holder."""
        return spot_checked(self.seed ^ PROBE_SEED_SALT, request_id, step, layer, self.probe_ppm)


def spot_checked(seed: int, request_id: str, step: int, layer: int, probability_ppm: int) -> bool:
    """Return whether the spot check samples this call: BLAKE2b-64 of the inputs, mod 1e6, below the probability."""
    if probability_ppm <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}\n{request_id}\n{step}\n{layer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % PPM < probability_ppm


@dataclass(frozen=True)
class StragglerPolicy:
    """Hedge delays and per-call deadlines derived from a peer's expected latency."""

    hedge_factor: float = HEDGE_LATENCY_FACTOR
    hedge_min_s: float = HEDGE_MIN_S
    hedge_max_s: float = HEDGE_MAX_S
    deadline_factor: float = DEADLINE_LATENCY_FACTOR
    deadline_min_s: float = DEADLINE_MIN_S

    def hedge_delay_s(self, expected_latency_ms: float, rows: int = 1) -> float:
        """Return how long to wait for a reply to a call of `rows` rows before calling another replica."""
        scaled = self.hedge_factor * expected_latency_ms / 1000 * _size(rows)
        return min(max(scaled, self.hedge_min_s), self.hedge_max_s)

    def deadline_s(self, expected_latency_ms: float, call_timeout_s: float, rows: int = 1) -> float:
        """Return the deadline of a call of `rows` rows: a multiple of the expected latency, at most the call timeout."""
        scaled = self.deadline_factor * expected_latency_ms / 1000 * _size(rows)
        return min(max(scaled, self.deadline_min_s), call_timeout_s)


def _size(rows: int) -> float:
    return max(1.0, rows / ROWS_PER_LATENCY)
