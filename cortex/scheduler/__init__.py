"""Scheduler: request lifecycle events, the Scheduler view, route planning and admission.

Importing this package registers the `requests` event family (`request_events.py`).
docs/scheduler.md describes the events, the lifecycle, the planning policy and the API.
"""

from cortex.scheduler.errors import (
    BlockRangeUncovered,
    InvalidRoute,
    KvBudgetExceeded,
    NoLiveHeadHolder,
    PlanError,
    SchedulerError,
)
from cortex.scheduler.lifecycle import (
    ACCEPTED,
    CANCELLED,
    COMPLETED,
    FAILED,
    IN_FLIGHT_STATES,
    RUNNING,
    SUBMITTED,
    TERMINAL_STATES,
    UNKNOWN,
    RequestRecord,
)
from cortex.scheduler.request_events import (
    REQUESTS,
    RequestAccepted,
    RequestCancelled,
    RequestCompleted,
    RequestFailed,
    RequestSubmitted,
    RouteReplanned,
    TokenGenerated,
    plan_digest,
    records_digest,
)
from cortex.scheduler.view import SchedulerReducer, SchedulerView

__all__ = [
    "ACCEPTED",
    "CANCELLED",
    "COMPLETED",
    "FAILED",
    "IN_FLIGHT_STATES",
    "REQUESTS",
    "RUNNING",
    "SUBMITTED",
    "TERMINAL_STATES",
    "UNKNOWN",
    "BlockRangeUncovered",
    "InvalidRoute",
    "KvBudgetExceeded",
    "NoLiveHeadHolder",
    "PlanError",
    "RequestAccepted",
    "RequestCancelled",
    "RequestCompleted",
    "RequestFailed",
    "RequestRecord",
    "RequestSubmitted",
    "RouteReplanned",
    "SchedulerError",
    "SchedulerReducer",
    "SchedulerView",
    "TokenGenerated",
    "plan_digest",
    "records_digest",
]
