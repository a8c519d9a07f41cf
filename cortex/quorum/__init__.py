"""Quorum: cross-checks of replicated expert outputs, votes and decisions, and peer trust."""

from cortex.quorum.events import (
    AGREED,
    BAD_FRAME,
    DISAGREED,
    EQUIVOCATED,
    FALSE_VOTE,
    NO_QUORUM,
    NOT_FINITE,
    QUORUM,
    PeerPenalized,
    QuorumDecided,
    QuorumVoted,
)
from cortex.quorum.rules import TRUST_MAX, TRUST_START, TRUST_THRESHOLD
from cortex.quorum.trust import PeerTrust, TrustReducer, TrustView

__all__ = [
    "AGREED",
    "BAD_FRAME",
    "DISAGREED",
    "EQUIVOCATED",
    "FALSE_VOTE",
    "NOT_FINITE",
    "NO_QUORUM",
    "QUORUM",
    "TRUST_MAX",
    "TRUST_START",
    "TRUST_THRESHOLD",
    "PeerTrust",
    "PeerPenalized",
    "QuorumDecided",
    "QuorumVoted",
    "TrustReducer",
    "TrustView",
]
