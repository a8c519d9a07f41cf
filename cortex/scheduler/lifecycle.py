"""Request lifecycle: the facts the Scheduler view keeps per request, and the state derived from them.

The view stores every lifecycle event of a request as a fact keyed by its stamp
(lamport, author, seq), and derives the request's state from the whole set of facts with
`derive`. Because the derivation reads a set, not a sequence, the state does not depend on
delivery order, and an event that arrives early (a token batch before its acceptance) simply
counts once the facts that authorize it arrive.

Who may publish what (checked in `derive`, ignoring facts that break it):

    RequestSubmitted    anyone; the author is the submitter
    RequestAccepted     anyone; the author becomes a driver of the request
    TokenGenerated      a driver
    RouteReplanned      a driver
    RequestCompleted    a driver
    RequestCancelled    the submitter
    RequestFailed       a driver or the submitter, or anyone while no driver has accepted

The view cannot check that the author of an acceptance is the rendezvous driver, because it
does not fold the Registry: `cortex.scheduler.planning.driver_order` gives that order.

State: the earliest terminal fact (lowest stamp) decides a terminal state, which wins over
any non-terminal one; otherwise `running` once a token batch counts, `accepted` once a
driver accepted, `submitted` once the submission is known, and `unknown` before that.
The route is the one in the latest (highest stamp) acceptance or re-plan by a driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cortex.scheduler.request_events import (
    RequestAccepted,
    RequestCancelled,
    RequestCompleted,
    RequestFailed,
    RequestSubmitted,
    RouteReplanned,
    TokenGenerated,
)
from events.model import type_of

Stamp = tuple[int, str, int]

UNKNOWN = "unknown"
SUBMITTED = "submitted"
ACCEPTED = "accepted"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
TERMINAL_STATES = frozenset({COMPLETED, FAILED, CANCELLED})
IN_FLIGHT_STATES = frozenset({SUBMITTED, ACCEPTED, RUNNING})

Outcome = RequestCompleted | RequestFailed | RequestCancelled


@dataclass(frozen=True)
class Fact:
    """One accepted lifecycle event of a request: its stamp, author clock time and body."""

    stamp: Stamp
    time_ms: int
    body: Any

    @property
    def author(self) -> str:
        return self.stamp[1]

    @property
    def seq(self) -> int:
        return self.stamp[2]

    def to_json(self) -> list[Any]:
        return [list(self.stamp), self.time_ms, type_of(self.body).name, type_of(self.body).body_to_json(self.body)]


@dataclass
class RequestRecord:
    """One request: the facts folded so far and the lifecycle state derived from them.

    Times are the authors' wall clocks in ms, taken from the events. Fields after `facts`
    are derived by `derive` and never set directly.
    """

    request_id: str
    facts: dict[Stamp, Fact] = field(default_factory=dict)
    state: str = UNKNOWN
    submission: RequestSubmitted | None = None
    submitter: str = ""
    submitted_ms: int = -1
    drivers: tuple[str, ...] = ()
    driver: str = ""
    accepted_ms: int = -1
    route: dict[str, str] = field(default_factory=dict)
    kv_reservations: dict[str, int] = field(default_factory=dict)
    plan_digest: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_ms: int = -1
    last_token_ms: int = -1
    replans: int = 0
    outcome: Outcome | None = None
    outcome_author: str = ""
    finished_ms: int = -1

    @property
    def model_id(self) -> str:
        return self.submission.model_id if self.submission is not None else ""

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def is_in_flight(self) -> bool:
        return self.state in IN_FLIGHT_STATES

    @property
    def degraded(self) -> bool:
        """Whether the request completed with output that did not come from the swarm."""
        return isinstance(self.outcome, RequestCompleted) and self.outcome.degraded

    @property
    def deadline_at_ms(self) -> int | None:
        """The submitter's deadline as a wall-clock time in ms, or None without a deadline."""
        if self.submission is None or self.submission.deadline_ms == 0:
            return None
        return self.submitted_ms + self.submission.deadline_ms

    @property
    def holders(self) -> frozenset[str]:
        """The peers on the current route."""
        return frozenset(self.route.values())

    def to_json(self) -> dict[str, Any]:
        """Return the facts as JSON-ready data in canonical order; the derived fields follow from them."""
        return {"facts": [self.facts[stamp].to_json() for stamp in sorted(self.facts)], "state": self.state}


def derive(record: RequestRecord) -> None:
    """Recompute every derived field of `record` from its facts (see the module docstring)."""
    facts = [record.facts[stamp] for stamp in sorted(record.facts)]
    submission = next((fact for fact in facts if isinstance(fact.body, RequestSubmitted)), None)
    acceptances = [fact for fact in facts if isinstance(fact.body, RequestAccepted)]
    drivers = frozenset(fact.author for fact in acceptances)
    submitter = submission.author if submission is not None else ""

    record.submission = submission.body if submission is not None else None
    record.submitter = submitter
    record.submitted_ms = submission.time_ms if submission is not None else -1
    record.drivers = tuple(sorted(drivers))
    replans = [fact for fact in facts if isinstance(fact.body, RouteReplanned) and fact.author in drivers]
    _derive_route(record, acceptances, replans)
    batches = [fact for fact in facts if isinstance(fact.body, TokenGenerated) and fact.author in drivers]
    _derive_tokens(record, batches)

    terminal = next((fact for fact in facts if _is_authorized_outcome(fact, submitter, drivers)), None)
    record.outcome = terminal.body if terminal is not None else None
    record.outcome_author = terminal.author if terminal is not None else ""
    record.finished_ms = terminal.time_ms if terminal is not None else -1
    record.state = _state(record, terminal)


def _derive_route(record: RequestRecord, acceptances: list[Fact], replans: list[Fact]) -> None:
    latest_acceptance = acceptances[-1] if acceptances else None
    record.driver = latest_acceptance.author if latest_acceptance is not None else ""
    record.accepted_ms = min((fact.time_ms for fact in acceptances), default=-1)
    record.replans = len(replans)
    plans = sorted([*acceptances, *replans], key=lambda fact: fact.stamp)
    if not plans:
        record.route, record.kv_reservations, record.plan_digest, record.prompt_tokens = {}, {}, "", 0
        return
    plan: RequestAccepted | RouteReplanned = plans[-1].body
    record.route = dict(plan.route)
    record.kv_reservations = dict(plan.kv_reservations)
    record.plan_digest = plan.plan_digest
    record.prompt_tokens = plan.prompt_tokens


def _derive_tokens(record: RequestRecord, batches: list[Fact]) -> None:
    record.completion_tokens = max((fact.body.step_stop for fact in batches), default=0)
    record.first_token_ms = min((fact.time_ms for fact in batches), default=-1)
    record.last_token_ms = max((fact.time_ms for fact in batches), default=-1)


def _is_authorized_outcome(fact: Fact, submitter: str, drivers: frozenset[str]) -> bool:
    body = fact.body
    if isinstance(body, RequestCompleted):
        return fact.author in drivers
    if isinstance(body, RequestCancelled):
        return fact.author == submitter
    if isinstance(body, RequestFailed):
        return fact.author in drivers or fact.author == submitter or not drivers
    return False


def _state(record: RequestRecord, terminal: Fact | None) -> str:
    if record.submission is None:
        return UNKNOWN
    if terminal is not None:
        if isinstance(terminal.body, RequestCompleted):
            return COMPLETED
        return CANCELLED if isinstance(terminal.body, RequestCancelled) else FAILED
    if record.completion_tokens > 0:
        return RUNNING
    return ACCEPTED if record.drivers else SUBMITTED
