"""Helpers that sign quorum events for reducer tests."""

from __future__ import annotations

import itertools
from typing import Any

from cortex.quorum import AGREED, NO_QUORUM, PeerPenalized, QuorumDecided, QuorumVoted
from events import Event, Identity, sign_event

REQUEST = "ab" * 32
DIGEST_A = "a" * 64
DIGEST_B = "b" * 64

_clock = itertools.count(1)
_seqs: dict[str, itertools.count[int]] = {}


def signed(identity: Identity, body: Any, lamport: int | None = None) -> Event:
    """Sign `body` as the next event of `identity`, at a fresh Lamport time unless one is given."""
    seq = next(_seqs.setdefault(identity.peer_id, itertools.count(1)))
    return sign_event(identity, body, seq=seq, lamport=lamport or next(_clock), time_ms=1_000)


def decision(agreeing: list[str], dissenting: list[str], layer: int = 1, step: int = 0, agreed: bool = True) -> QuorumDecided:
    return QuorumDecided(
        request_id=REQUEST, model_id="m", step=step, layer=layer, outcome=AGREED if agreed else NO_QUORUM,
        quorum=2, rounds=1, experts=(0,), winner_digests=(DIGEST_A if agreed else "",),
        agreeing=tuple(agreeing), dissenting=tuple(dissenting),
    )


def vote(producers: list[str], digests: list[str], distances: list[int]) -> QuorumVoted:
    return QuorumVoted(
        request_id=REQUEST, model_id="m", step=0, layer=1, dtype="float32", tolerance_nano=1_000_000,
        experts=tuple(0 for _ in producers), producers=tuple(producers), digests=tuple(digests),
        distances_nano=tuple(distances),
    )


def penalty(peer: str, reason: str = "bad_frame") -> PeerPenalized:
    return PeerPenalized(peer=peer, reason=reason, evidence=("c" * 64,), detail="test")
