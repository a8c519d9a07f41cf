"""TrustReducer: the trust rule, false votes, equivocation, and order independence."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from quorum_helpers import DIGEST_A, DIGEST_B, decision, penalty, signed, vote

from cortex.quorum import TRUST_MAX, TRUST_THRESHOLD, TrustReducer, TrustView
from cortex.quorum.rules import DISSENT_PENALTY, FALSE_VOTE_PENALTY, PROBATION_DECISIONS, RECOVERY_STEP, REPORT_PENALTY
from events import Event, Identity

VOTER, HONEST_A, HONEST_B, FAULTY, LIAR = (Identity.generate() for _ in range(5))
IDS = [identity.peer_id for identity in (VOTER, HONEST_A, HONEST_B, FAULTY, LIAR)]


def fold(events: list[Event], equivocations: dict[str, int] | None = None) -> TrustView:
    reducer = TrustReducer()
    view = reducer.empty()
    for author, seq in (equivocations or {}).items():
        view = reducer.apply_equivocation(view, author, seq)
    for event in events:
        view = reducer.apply(view, event)
    return view


def test_unknown_peer_has_full_trust() -> None:
    view = fold([])

    assert view.trust_of(FAULTY.peer_id) == TRUST_MAX
    assert not view.is_excluded(FAULTY.peer_id)
    assert view.excluded_peers() == []


def test_dissent_lowers_trust_until_excluded() -> None:
    ids = [HONEST_A.peer_id, HONEST_B.peer_id]
    events = [signed(VOTER, decision(ids, [FAULTY.peer_id], layer=layer)) for layer in range(3)]
    view = fold(events)

    assert view.trust_of(FAULTY.peer_id) == TRUST_MAX - 3 * DISSENT_PENALTY
    assert view.is_excluded(FAULTY.peer_id)
    assert view.excluded_peers() == [FAULTY.peer_id]
    assert view.trust_of(HONEST_A.peer_id) == TRUST_MAX
    assert view.peer(FAULTY.peer_id).dissents == 3
    assert view.peer(HONEST_A.peer_id).agreements == 3
    assert view.counts()["decisions"] == 3


def test_always_wrong_peer_never_regains_trust() -> None:
    ids = [HONEST_A.peer_id, HONEST_B.peer_id]
    events = []
    trust = []
    view = fold([])
    reducer = TrustReducer()
    for step in range(60):
        # Wrong once in every PROBATION_DECISIONS decisions, right in the others.
        wrong = step % PROBATION_DECISIONS == 0
        body = decision(ids, [FAULTY.peer_id], step=step) if wrong else decision([*ids, FAULTY.peer_id], [], step=step)
        events.append(signed(VOTER, body))
        view = reducer.apply(view, events[-1])
        trust.append(view.trust_of(FAULTY.peer_id))

    assert all(later <= earlier for earlier, later in zip(trust, trust[1:], strict=False))
    assert trust[-1] == TRUST_MAX - 3 * DISSENT_PENALTY


def test_peer_wrong_once_recovers_by_rule() -> None:
    ids = [HONEST_A.peer_id, HONEST_B.peer_id]
    agreeing = PROBATION_DECISIONS + 10
    events = [signed(VOTER, decision(ids, [FAULTY.peer_id]))]
    events += [signed(VOTER, decision([*ids, FAULTY.peer_id], [], step=step)) for step in range(1, agreeing + 1)]
    view = fold(events)

    assert view.trust_of(FAULTY.peer_id) == TRUST_MAX - DISSENT_PENALTY + 10 * RECOVERY_STEP
    assert fold(events[:PROBATION_DECISIONS + 1]).trust_of(FAULTY.peer_id) == TRUST_MAX - DISSENT_PENALTY


def test_excluded_peer_recovers_through_probes() -> None:
    ids = [HONEST_A.peer_id, HONEST_B.peer_id]
    events = [signed(VOTER, decision(ids, [FAULTY.peer_id], layer=layer)) for layer in range(3)]
    # Probes: agreeing decisions that name the excluded peer, one per later step.
    needed = PROBATION_DECISIONS + (TRUST_THRESHOLD - (TRUST_MAX - 3 * DISSENT_PENALTY)) // RECOVERY_STEP
    events += [signed(VOTER, decision([*ids, FAULTY.peer_id], [], step=step)) for step in range(1, needed + 1)]

    assert fold(events[:-1]).is_excluded(FAULTY.peer_id)
    assert not fold(events).is_excluded(FAULTY.peer_id)
    assert fold(events).trust_of(FAULTY.peer_id) == TRUST_THRESHOLD


def test_voter_own_output_earns_nothing() -> None:
    events = [signed(VOTER, decision([VOTER.peer_id, HONEST_A.peer_id], [FAULTY.peer_id], layer=layer)) for layer in range(2)]
    view = fold(events)

    assert view.peer(VOTER.peer_id).agreements == 0
    assert view.peer(HONEST_A.peer_id).agreements == 2
    assert view.peer(FAULTY.peer_id).dissents == 2


def test_lying_voter_alone_cannot_exclude_honest_peers() -> None:
    # The liar claims that only its own output agreed and both honest outputs dissented.
    honest = [HONEST_A.peer_id, HONEST_B.peer_id]
    events = [signed(LIAR, decision([LIAR.peer_id], honest, layer=layer)) for layer in range(6)]
    view = fold(events)

    assert view.trust_of(HONEST_A.peer_id) == TRUST_MAX
    assert view.trust_of(HONEST_B.peer_id) == TRUST_MAX
    assert view.is_excluded(LIAR.peer_id)
    assert view.peer(LIAR.peer_id).false_votes == 2
    assert view.counts()["ignored"] == 4


def test_minority_agreeing_decision_is_false() -> None:
    honest = [HONEST_A.peer_id, HONEST_B.peer_id]
    view = fold([signed(LIAR, decision([FAULTY.peer_id], honest))])

    assert view.trust_of(LIAR.peer_id) == TRUST_MAX - FALSE_VOTE_PENALTY
    assert view.trust_of(HONEST_A.peer_id) == TRUST_MAX


def test_inconsistent_vote_is_false() -> None:
    # Outputs with equal digests are equal bytes, so they cannot be at different distances.
    producers = [HONEST_A.peer_id, HONEST_B.peer_id, FAULTY.peer_id]
    honest_vote = vote(producers, [DIGEST_A, DIGEST_A, DIGEST_B], [0, 0, 100_000_000])
    lying_vote = vote(producers, [DIGEST_A, DIGEST_A, DIGEST_B], [0, 200_000_000, 0])
    view = fold([signed(VOTER, honest_vote), signed(LIAR, lying_vote)])

    assert view.trust_of(VOTER.peer_id) == TRUST_MAX
    assert view.trust_of(LIAR.peer_id) == TRUST_MAX - FALSE_VOTE_PENALTY
    assert view.counts()["votes"] == 1
    assert view.counts()["false_votes"] == 1


def test_excluded_voter_decisions_are_ignored() -> None:
    honest = [HONEST_A.peer_id, HONEST_B.peer_id]
    events = [signed(VOTER, decision(honest, [FAULTY.peer_id], layer=layer)) for layer in range(3)]
    events.append(signed(FAULTY, decision([FAULTY.peer_id, HONEST_A.peer_id], [HONEST_B.peer_id])))
    view = fold(events)

    assert view.trust_of(HONEST_B.peer_id) == TRUST_MAX
    assert view.counts()["ignored"] == 1


def test_no_quorum_decision_changes_no_trust() -> None:
    view = fold([signed(VOTER, decision([HONEST_A.peer_id], [FAULTY.peer_id], agreed=False))])

    assert view.trust_of(FAULTY.peer_id) == TRUST_MAX
    assert view.counts()["no_quorum"] == 1


def test_report_counts_once_per_reporter_and_reason() -> None:
    events = [signed(VOTER, penalty(FAULTY.peer_id)) for _ in range(3)]
    events.append(signed(HONEST_A, penalty(FAULTY.peer_id)))
    events.append(signed(HONEST_A, penalty(FAULTY.peer_id, reason="disagreed")))
    view = fold(events)

    assert view.trust_of(FAULTY.peer_id) == TRUST_MAX - 2 * REPORT_PENALTY
    assert view.peer(FAULTY.peer_id).reports == 2
    assert view.counts()["penalties"] == 5


def test_equivocation_zeroes_trust_for_good() -> None:
    honest = [HONEST_A.peer_id, HONEST_B.peer_id]
    decisions = [signed(VOTER, decision([*honest, FAULTY.peer_id], [], step=step)) for step in range(30)]
    liar_decision = signed(FAULTY, decision([FAULTY.peer_id, HONEST_A.peer_id], [HONEST_B.peer_id]))
    view = fold([*decisions, liar_decision], equivocations={FAULTY.peer_id: 1})

    assert view.trust_of(FAULTY.peer_id) == 0
    assert view.is_excluded(FAULTY.peer_id)
    assert view.trust_of(HONEST_B.peer_id) == TRUST_MAX
    assert FAULTY.peer_id in view.excluded_peers()


def test_equivocation_after_events_refolds() -> None:
    honest = [HONEST_A.peer_id, HONEST_B.peer_id]
    liar_decision = signed(FAULTY, decision([FAULTY.peer_id, HONEST_A.peer_id], [HONEST_B.peer_id]))
    reducer = TrustReducer()
    view = reducer.apply(reducer.empty(), liar_decision)
    assert view.trust_of(HONEST_B.peer_id) == TRUST_MAX - DISSENT_PENALTY

    view = reducer.apply_equivocation(view, FAULTY.peer_id, 1)

    assert view.trust_of(HONEST_B.peer_id) == TRUST_MAX
    assert view.trust_of(FAULTY.peer_id) == 0
    assert view.counts()["decisions"] == 0
    assert honest


def _history() -> list[Event]:
    """A mixed history: a faulty peer, a liar, a recovering peer, reports, several voters."""
    honest = [HONEST_A.peer_id, HONEST_B.peer_id]
    events = [signed(VOTER, decision(honest, [FAULTY.peer_id], layer=layer)) for layer in range(2)]
    events += [signed(LIAR, decision([LIAR.peer_id], honest, step=step)) for step in range(3)]
    events += [signed(HONEST_A, decision([VOTER.peer_id, HONEST_B.peer_id, FAULTY.peer_id], [], step=s)) for s in range(25)]
    events += [signed(VOTER, penalty(LIAR.peer_id)), signed(HONEST_B, penalty(FAULTY.peer_id, "bad_frame"))]
    events += [signed(VOTER, vote(honest, [DIGEST_A, DIGEST_A], [5, 5]))]
    events += [signed(HONEST_B, decision(honest, [FAULTY.peer_id], layer=9))]
    return events


HISTORY = _history()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32), duplicates=st.integers(min_value=0, max_value=5))
def test_trust_converges_for_any_delivery_order(seed: int, duplicates: int) -> None:
    shuffled = list(HISTORY) + random.Random(seed).sample(HISTORY, duplicates)
    random.Random(seed).shuffle(shuffled)
    in_order = sorted(HISTORY, key=lambda event: (event.lamport, event.author, event.seq))

    view = fold(shuffled)
    reference = fold(in_order)

    assert view.to_json() == reference.to_json()
    assert view.digest() == reference.digest()
    for peer in IDS:
        assert view.trust_of(peer) == reference.trust_of(peer)


def test_history_reference_values() -> None:
    view = fold(sorted(HISTORY, key=lambda event: (event.lamport, event.author, event.seq)))

    assert view.is_excluded(LIAR.peer_id)
    assert view.trust_of(HONEST_A.peer_id) == TRUST_MAX
    assert view.trust_of(FAULTY.peer_id) < TRUST_MAX
    assert view.trust_of(VOTER.peer_id) == TRUST_MAX
    assert view.counts()["false_votes"] >= 2
    assert TRUST_THRESHOLD > 0
