"""Scheduler view: lifecycle, authorization of each event, terminal precedence, reservations."""

from __future__ import annotations

from scheduler_events_factory import (
    DRIVER,
    HOLDER_A,
    HOLDER_B,
    HOLDER_C,
    OUTSIDER,
    SUBMITTER,
    TAKEOVER,
    acceptance,
    cancellation,
    completion,
    failure,
    replan,
    request_id_of,
    signed,
    submission,
    tokens,
)

from cortex.scheduler.lifecycle import ACCEPTED, CANCELLED, COMPLETED, FAILED, RUNNING, SUBMITTED, UNKNOWN
from cortex.scheduler.view import SchedulerReducer, SchedulerView, fold
from events import Event

SUBMIT = signed(SUBMITTER, submission(deadline_ms=5_000), seq=1, time_ms=1_000)
REQUEST = request_id_of(SUBMIT)
ROUTE = {"block[0:2]": HOLDER_A.peer_id, "block[2:4]": HOLDER_B.peer_id}
ACCEPT = signed(DRIVER, acceptance(REQUEST, ROUTE), seq=1, lamport=2, time_ms=1_010)
TOKENS_0_2 = signed(DRIVER, tokens(REQUEST, 0, 2), seq=2, lamport=3, time_ms=1_050)
TOKENS_2_4 = signed(DRIVER, tokens(REQUEST, 2, 4), seq=3, lamport=4, time_ms=1_090)
COMPLETE = signed(DRIVER, completion(REQUEST), seq=4, lamport=5, time_ms=1_100)


def state_of(*events: Event) -> str:
    record = fold(events).record(REQUEST)
    assert record is not None
    return record.state


def test_submission_recorded() -> None:
    view = fold([SUBMIT])
    record = view.record(REQUEST)

    assert record is not None
    assert record.state == SUBMITTED
    assert record.submitter == SUBMITTER.peer_id
    assert record.model_id == "model-1"
    assert record.submitted_ms == 1_000
    assert record.deadline_at_ms == 6_000
    assert [item.request_id for item in view.in_flight()] == [REQUEST]


def test_acceptance_sets_route_and_reservations() -> None:
    view = fold([SUBMIT, ACCEPT])
    record = view.record(REQUEST)

    assert record is not None
    assert record.state == ACCEPTED
    assert record.driver == DRIVER.peer_id
    assert record.route == ROUTE
    assert record.accepted_ms == 1_010
    assert record.prompt_tokens == 4
    assert view.kv_reserved_by_holder() == {HOLDER_A.peer_id: 100, HOLDER_B.peer_id: 100}
    assert view.load_by_holder() == {HOLDER_A.peer_id: 1, HOLDER_B.peer_id: 1}
    assert [item.request_id for item in view.driven_by(DRIVER.peer_id)] == [REQUEST]
    assert [item.request_id for item in view.routed_through(HOLDER_B.peer_id)] == [REQUEST]


def test_tokens_make_request_running() -> None:
    record = fold([SUBMIT, ACCEPT, TOKENS_2_4, TOKENS_0_2]).record(REQUEST)

    assert record is not None
    assert record.state == RUNNING
    assert record.completion_tokens == 4
    assert record.first_token_ms == 1_050
    assert record.last_token_ms == 1_090


def test_completion_frees_reservations() -> None:
    view = fold([SUBMIT, ACCEPT, TOKENS_0_2, COMPLETE])
    record = view.record(REQUEST)

    assert record is not None
    assert record.state == COMPLETED
    assert record.finished_ms == 1_100
    assert record.outcome == COMPLETE.body
    assert not record.degraded
    assert view.in_flight() == []
    assert view.kv_reserved_by_holder() == {}


def test_degraded_completion_visible() -> None:
    degraded = signed(DRIVER, completion(REQUEST, degraded_reason="no live holder of expert[1][3]"), seq=4, lamport=5)

    record = fold([SUBMIT, ACCEPT, degraded]).record(REQUEST)

    assert record is not None
    assert record.degraded


def test_terminal_wins_in_reverse_order() -> None:
    assert state_of(COMPLETE, TOKENS_0_2, ACCEPT, SUBMIT) == COMPLETED
    assert state_of(TOKENS_0_2, SUBMIT) == SUBMITTED
    assert state_of(TOKENS_0_2, SUBMIT, ACCEPT) == RUNNING


def test_events_before_submission_unknown() -> None:
    view = fold([ACCEPT, TOKENS_0_2])
    record = view.record(REQUEST)

    assert record is not None
    assert record.state == UNKNOWN
    assert view.in_flight() == []


def test_tokens_from_non_driver_ignored() -> None:
    forged = signed(OUTSIDER, tokens(REQUEST, 0, 9), seq=1, lamport=3)

    record = fold([SUBMIT, ACCEPT, forged]).record(REQUEST)

    assert record is not None
    assert record.state == ACCEPTED
    assert record.completion_tokens == 0


def test_completion_from_non_driver_ignored() -> None:
    forged = signed(OUTSIDER, completion(REQUEST), seq=1, lamport=3)

    assert state_of(SUBMIT, ACCEPT, forged) == ACCEPTED


def test_cancel_only_by_submitter() -> None:
    forged = signed(OUTSIDER, cancellation(REQUEST), seq=1, lamport=3)
    cancel = signed(SUBMITTER, cancellation(REQUEST), seq=2, lamport=3)

    assert state_of(SUBMIT, ACCEPT, forged) == ACCEPTED
    assert state_of(SUBMIT, ACCEPT, cancel) == CANCELLED


def test_failure_before_acceptance_from_anyone() -> None:
    refusal = signed(OUTSIDER, failure(REQUEST, "kv_budget_exceeded"), seq=1, lamport=2)

    assert state_of(SUBMIT, refusal) == FAILED
    assert state_of(SUBMIT, refusal, ACCEPT) == ACCEPTED
    assert state_of(ACCEPT, SUBMIT, refusal) == ACCEPTED


def test_failure_by_driver_counts() -> None:
    failed = signed(DRIVER, failure(REQUEST), seq=2, lamport=3)
    record = fold([SUBMIT, ACCEPT, failed]).record(REQUEST)

    assert record is not None
    assert record.state == FAILED
    assert record.outcome_author == DRIVER.peer_id


def test_earliest_terminal_wins() -> None:
    cancel_early = signed(SUBMITTER, cancellation(REQUEST), seq=2, lamport=3)
    cancel_late = signed(SUBMITTER, cancellation(REQUEST), seq=2, lamport=9)

    assert state_of(SUBMIT, ACCEPT, COMPLETE, cancel_early) == CANCELLED
    assert state_of(cancel_early, COMPLETE, ACCEPT, SUBMIT) == CANCELLED
    assert state_of(SUBMIT, ACCEPT, cancel_late, COMPLETE) == COMPLETED
    assert state_of(COMPLETE, cancel_late, ACCEPT, SUBMIT) == COMPLETED


def test_replan_moves_reservation() -> None:
    new_route = {"block[0:2]": HOLDER_A.peer_id, "block[2:4]": HOLDER_C.peer_id}
    replanned = signed(DRIVER, replan(REQUEST, HOLDER_B.peer_id, new_route), seq=3, lamport=4)

    view = fold([SUBMIT, ACCEPT, TOKENS_0_2, replanned])
    record = view.record(REQUEST)

    assert record is not None
    assert record.route == new_route
    assert record.replans == 1
    assert view.kv_reserved_by_holder() == {HOLDER_A.peer_id: 100, HOLDER_C.peer_id: 100}
    assert view.routed_through(HOLDER_B.peer_id) == []


def test_replan_by_outsider_ignored() -> None:
    new_route = {"block[0:4]": HOLDER_C.peer_id}
    forged = signed(OUTSIDER, replan(REQUEST, HOLDER_B.peer_id, new_route), seq=1, lamport=9)

    record = fold([SUBMIT, ACCEPT, forged]).record(REQUEST)

    assert record is not None
    assert record.route == ROUTE
    assert record.replans == 0


def test_takeover_switches_driver() -> None:
    route = {"block[0:4]": HOLDER_C.peer_id}
    takeover = signed(TAKEOVER, acceptance(REQUEST, route, takeover_of=DRIVER.peer_id), seq=1, lamport=6, time_ms=1_500)
    more_tokens = signed(TAKEOVER, tokens(REQUEST, 2, 6), seq=2, lamport=7, time_ms=1_600)

    record = fold([more_tokens, takeover, TOKENS_0_2, ACCEPT, SUBMIT]).record(REQUEST)

    assert record is not None
    assert record.driver == TAKEOVER.peer_id
    assert record.drivers == tuple(sorted([DRIVER.peer_id, TAKEOVER.peer_id]))
    assert record.route == route
    assert record.completion_tokens == 6
    assert record.accepted_ms == 1_010


def test_equivocation_drops_facts_from_seq() -> None:
    reducer = SchedulerReducer()
    forward = fold([SUBMIT, ACCEPT, TOKENS_0_2, TOKENS_2_4], reducer)
    forward = reducer.apply_equivocation(forward, DRIVER.peer_id, 3)

    marked_first: SchedulerView = reducer.apply_equivocation(reducer.empty(), DRIVER.peer_id, 3)
    for event in [TOKENS_2_4, SUBMIT, TOKENS_0_2, ACCEPT]:
        marked_first = reducer.apply(marked_first, event)

    record = forward.record(REQUEST)
    assert record is not None
    assert record.completion_tokens == 2
    assert forward.equivocated_from_seq == {DRIVER.peer_id: 3}
    assert forward.digest() == marked_first.digest()


def test_equivocating_submitter_removes_request() -> None:
    reducer = SchedulerReducer()
    view = reducer.apply_equivocation(fold([SUBMIT], reducer), SUBMITTER.peer_id, 1)

    assert view.record(REQUEST) is None
    assert view.in_flight() == []


def test_overdue_uses_callers_now() -> None:
    view = fold([SUBMIT, ACCEPT])

    assert view.overdue(now_ms=6_000) == []
    assert [record.request_id for record in view.overdue(now_ms=6_001)] == [REQUEST]
    assert fold([SUBMIT, ACCEPT, COMPLETE]).overdue(now_ms=99_999) == []


def test_digest_changes_with_state() -> None:
    assert fold([SUBMIT]).digest() != fold([SUBMIT, ACCEPT]).digest()
    assert fold([SUBMIT, ACCEPT]).digest() == fold([ACCEPT, SUBMIT]).digest()


def test_same_nonce_other_author_is_other_request() -> None:
    copied = signed(OUTSIDER, SUBMIT.body, seq=1, time_ms=1_200)

    view = fold([SUBMIT, copied])

    assert request_id_of(copied) != REQUEST
    record = view.record(REQUEST)
    assert record is not None
    assert record.submitter == SUBMITTER.peer_id
    assert len(view.in_flight()) == 2
