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

__all__ = [
    "AGREED",
    "BAD_FRAME",
    "DISAGREED",
    "EQUIVOCATED",
    "FALSE_VOTE",
    "NOT_FINITE",
    "NO_QUORUM",
    "QUORUM",
    "PeerPenalized",
    "QuorumDecided",
    "QuorumVoted",
]
