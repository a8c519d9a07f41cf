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

__all__ = [
    "REQUESTS",
    "BlockRangeUncovered",
    "InvalidRoute",
    "KvBudgetExceeded",
    "NoLiveHeadHolder",
    "PlanError",
    "RequestAccepted",
    "RequestCancelled",
    "RequestCompleted",
    "RequestFailed",
    "RequestSubmitted",
    "RouteReplanned",
    "SchedulerError",
    "TokenGenerated",
    "plan_digest",
    "records_digest",
]
