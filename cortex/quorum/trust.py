"""Trust view: peer trust folded from quorum votes, decisions, penalties and equivocations.

The view keeps every quorum fact (one per `QuorumVoted`, `QuorumDecided` and
`PeerPenalized`) sorted by the canonical stamp (lamport, author, seq), and folds them in
that order with the rule of `cortex.quorum.rules`. A fact that sorts after every folded one
is folded at once. A late fact that sorts before them marks the fold stale, so the next
query refolds from the start. So two nodes that accepted the same events hold the same
trust whatever order the events arrived in.

What makes a vote or decision provably false (the voter is penalized, the fact has no other
effect), checked from the event alone:

- a `QuorumVoted` that gives two outputs of one expert with equal digests different
  distances (equal bytes are at equal distance from any reference);
- a `QuorumDecided` with outcome `agreed` that names dissenters while its quorum is below 2,
  fewer producers than the quorum agree, or no producer other than the voter agrees (a voter
  cannot outvote everyone with its own output).

Votes and decisions of a voter that is excluded when they fold are passed over and counted
as ignored. An equivocating author has trust 0 from the start of the fold, so all of its
votes and decisions are passed over.

NOTE: a voter that names a majority of other producers as agreeing and an honest one as
dissenting, with consistent digests, is not caught by these checks: its accusations count
until other evidence excludes it. Catching it needs the tensors, which only the voter has.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from cortex.quorum.events import AGREED, DISAGREED, EQUIVOCATED, FALSE_VOTE, QUORUM, PeerPenalized, QuorumDecided, QuorumVoted
from cortex.quorum.rules import (
    DISSENT_PENALTY,
    FALSE_VOTE_PENALTY,
    PROBATION_DECISIONS,
    RECOVERY_STEP,
    REPORT_PENALTY,
    TRUST_MAX,
    TRUST_START,
    is_excluded,
)
from events.codec import Event
from events.views import Dispatcher

Stamp = tuple[int, str, int]
DERIVED_REASONS = frozenset({DISAGREED, FALSE_VOTE, EQUIVOCATED})  # penalties the fold computes itself


@dataclass(frozen=True)
class Fact:
    """One quorum event as the fold needs it."""

    stamp: Stamp
    event_id: str
    kind: str  # "vote", "decision" or "report"
    voter: str
    agreeing: tuple[str, ...] = ()
    dissenting: tuple[str, ...] = ()
    agreed: bool = False
    consistent: bool = True
    peer: str = ""
    reason: str = ""


@dataclass
class PeerTrust:
    """One peer's trust and the counts it was folded from."""

    trust: int = TRUST_START
    agreements: int = 0
    dissents: int = 0
    false_votes: int = 0
    reports: int = 0
    streak: int = PROBATION_DECISIONS  # agreeing decisions since the last dissent

    def to_json(self) -> dict[str, int]:
        return {
            "trust": self.trust, "agreements": self.agreements, "dissents": self.dissents,
            "false_votes": self.false_votes, "reports": self.reports, "streak": self.streak,
        }


@dataclass
class FoldState:
    """The result of folding the facts in canonical order."""

    peers: dict[str, PeerTrust] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    reported: set[tuple[str, str, str]] = field(default_factory=set)


@dataclass
class TrustView:
    """Quorum facts in canonical order, the equivocating authors, and the folded trust."""

    # NOTE: every fact is kept for refolds, one per replicated layer call and step, so the list
    # grows without bound on a long-running swarm with redundancy; nothing compacts it yet.
    facts: list[Fact] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    equivocated: dict[str, int] = field(default_factory=dict)
    state: FoldState = field(default_factory=FoldState)
    folded: int = 0  # facts[:folded] are in `state`, unless `stale`
    stale: bool = False

    # --- queries -------------------------------------------------------------------

    def trust_of(self, peer_id: str) -> int:
        """Return the peer's trust, 0 to TRUST_MAX (TRUST_START for a peer with no facts)."""
        if peer_id in self.equivocated:
            return 0
        record = self._state().peers.get(peer_id)
        return TRUST_START if record is None else record.trust

    def is_excluded(self, peer_id: str) -> bool:
        """Return whether routers must send the peer no calls (trust below TRUST_THRESHOLD)."""
        return is_excluded(self.trust_of(peer_id))

    def excluded_peers(self) -> list[str]:
        """Return the excluded peers that appear in any fact, sorted."""
        known = set(self._state().peers) | set(self.equivocated)
        return sorted(peer for peer in known if self.is_excluded(peer))

    def peer(self, peer_id: str) -> PeerTrust:
        """Return a copy of the peer's record (a fresh one for a peer with no facts)."""
        record = self._state().peers.get(peer_id)
        copy = PeerTrust(**record.to_json()) if record is not None else PeerTrust()
        if peer_id in self.equivocated:
            copy.trust = 0
        return copy

    def counts(self) -> dict[str, int]:
        """Return the counts of votes, decisions (agreed, no_quorum), penalties, false and ignored votes."""
        keys = ("votes", "decisions", "agreed", "no_quorum", "penalties", "false_votes", "ignored")
        counts = self._state().counts
        return {key: counts[key] for key in keys}

    def to_json(self) -> dict[str, Any]:
        state = self._state()
        peers = {peer: state.peers[peer].to_json() for peer in sorted(state.peers)}
        for peer in peers:
            peers[peer]["trust"] = self.trust_of(peer)
        return {"peers": peers, "equivocated": dict(sorted(self.equivocated.items())), "counts": self.counts()}

    def digest(self) -> str:
        data = orjson.dumps(self.to_json(), option=orjson.OPT_SORT_KEYS)
        return hashlib.blake2b(data, digest_size=32).hexdigest()

    # --- folding -------------------------------------------------------------------

    def insert(self, fact: Fact) -> None:
        if fact.event_id in self.ids:
            return
        self.ids.add(fact.event_id)
        position = bisect.bisect(self.facts, fact.stamp, key=lambda item: item.stamp)
        self.facts.insert(position, fact)
        if not self.stale and position == self.folded == len(self.facts) - 1:
            _fold_fact(self.state, fact, self.equivocated)
            self.folded += 1
        else:
            self.stale = True

    def drop_author_from(self, author: str, seq: int) -> None:
        self.equivocated[author] = min(seq, self.equivocated.get(author, seq))
        self.facts = [fact for fact in self.facts if not (fact.stamp[1] == author and fact.stamp[2] >= seq)]
        self.ids = {fact.event_id for fact in self.facts}
        self.stale = True

    def _state(self) -> FoldState:
        if self.stale:
            self.state = FoldState()
            for fact in self.facts:
                _fold_fact(self.state, fact, self.equivocated)
            self.folded = len(self.facts)
            self.stale = False
        return self.state


def _record(state: FoldState, peer: str) -> PeerTrust:
    record = state.peers.get(peer)
    if record is None:
        record = state.peers[peer] = PeerTrust()
    return record


def _may_vote(state: FoldState, voter: str, equivocated: dict[str, int]) -> bool:
    if voter in equivocated:
        return False
    record = state.peers.get(voter)
    return record is None or not is_excluded(record.trust)


def _fold_fact(state: FoldState, fact: Fact, equivocated: dict[str, int]) -> None:
    if fact.kind == "report":
        _fold_report(state, fact, equivocated)
        return
    if not _may_vote(state, fact.voter, equivocated):
        state.counts["ignored"] += 1
        return
    if not fact.consistent:
        voter = _record(state, fact.voter)
        voter.trust = max(0, voter.trust - FALSE_VOTE_PENALTY)
        voter.false_votes += 1
        state.counts["false_votes"] += 1
        return
    if fact.kind == "vote":
        state.counts["votes"] += 1
        return
    state.counts["decisions"] += 1
    state.counts["agreed" if fact.agreed else "no_quorum"] += 1
    if not fact.agreed:
        return
    for peer in fact.dissenting:
        if peer != fact.voter:
            _dissent(_record(state, peer))
    for peer in fact.agreeing:
        if peer != fact.voter:
            _agree(_record(state, peer))


def _dissent(record: PeerTrust) -> None:
    record.trust = max(0, record.trust - DISSENT_PENALTY)
    record.dissents += 1
    record.streak = 0


def _agree(record: PeerTrust) -> None:
    record.agreements += 1
    record.streak += 1
    if record.streak > PROBATION_DECISIONS:
        record.trust = min(TRUST_MAX, record.trust + RECOVERY_STEP)


def _fold_report(state: FoldState, fact: Fact, equivocated: dict[str, int]) -> None:
    state.counts["penalties"] += 1
    if fact.reason in DERIVED_REASONS or not _may_vote(state, fact.voter, equivocated):
        return
    key = (fact.voter, fact.peer, fact.reason)
    if key in state.reported:
        return
    state.reported.add(key)
    record = _record(state, fact.peer)
    record.trust = max(0, record.trust - REPORT_PENALTY)
    record.reports += 1


def decision_is_valid(voter: str, quorum: int, agreeing: tuple[str, ...], dissenting: tuple[str, ...]) -> bool:
    """Return whether an `agreed` decision that names dissenters is possible.

    Each expert's winning group is a strict majority of its outputs, so at least 2 outputs
    (quorum >= 2) by producers that all appear in `agreeing`, and one of them is not the
    voter's own. The per-expert counts are in the vote, not in the decision, so this checks
    the layer as a whole.
    """
    if not [peer for peer in dissenting if peer != voter]:
        return True
    return quorum >= 2 and len(agreeing) >= quorum and any(peer != voter for peer in agreeing)


def vote_is_consistent(vote: QuorumVoted) -> bool:
    """Return whether outputs with equal digests have equal distances, for every expert of the vote."""
    seen: dict[tuple[int, str], int] = {}
    for expert, digest, distance in zip(vote.experts, vote.digests, vote.distances_nano, strict=True):
        if seen.setdefault((expert, digest), distance) != distance:
            return False
    return True


def _stamp(event: Event) -> Stamp:
    return (event.lamport, event.author, event.seq)


def _apply_vote(view: TrustView, event: Event) -> TrustView:
    vote: QuorumVoted = event.body
    view.insert(Fact(_stamp(event), event.id, "vote", event.author, consistent=vote_is_consistent(vote)))
    return view


def _apply_decision(view: TrustView, event: Event) -> TrustView:
    decision: QuorumDecided = event.body
    agreed = decision.outcome == AGREED
    consistent = not agreed or decision_is_valid(event.author, decision.quorum, decision.agreeing, decision.dissenting)
    view.insert(
        Fact(_stamp(event), event.id, "decision", event.author, decision.agreeing, decision.dissenting, agreed, consistent)
    )
    return view


def _apply_penalty(view: TrustView, event: Event) -> TrustView:
    penalty: PeerPenalized = event.body
    view.insert(Fact(_stamp(event), event.id, "report", event.author, peer=penalty.peer, reason=penalty.reason))
    return view


class TrustReducer:
    """Reducer of the trust view (family `quorum`); see the module docstring."""

    def __init__(self) -> None:
        self._dispatch: Dispatcher[TrustView] = Dispatcher(
            "trust",
            [QUORUM],
            {QuorumVoted: _apply_vote, QuorumDecided: _apply_decision, PeerPenalized: _apply_penalty},
        )

    def empty(self) -> TrustView:
        return TrustView()

    def apply(self, view: TrustView, event: Event) -> TrustView:
        disputed = view.equivocated.get(event.author)
        if disputed is not None and event.seq >= disputed:
            return view
        return self._dispatch(view, event)

    def apply_equivocation(self, view: TrustView, author: str, seq: int) -> TrustView:
        view.drop_author_from(author, seq)
        return view
