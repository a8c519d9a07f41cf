"""Scheduler: request lifecycle events, the Scheduler view, route planning and admission.

Importing this package registers the `requests` event family (`request_events.py`).
docs/scheduler.md describes the events, the lifecycle, the planning policy and the API.
"""

from cortex.scheduler.admission import KV_CACHE_HARDWARE_KEY, ModelGeometry, kv_budget, request_failed_for
from cortex.scheduler.errors import (
    BlockRangeUncovered,
    ContextTooLong,
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
from cortex.scheduler.observations import PeerObservations
from cortex.scheduler.planning import (
    PlanningContext,
    RoutePlan,
    choose_driver,
    driver_order,
    rank_expert_replicas,
    rank_replicas,
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
    request_id_for,
)
from cortex.scheduler.routes import admit, plan_route, replan_route
from cortex.scheduler.view import SchedulerReducer, SchedulerView

__all__ = [
    "ACCEPTED",
    "CANCELLED",
    "COMPLETED",
    "FAILED",
    "IN_FLIGHT_STATES",
    "KV_CACHE_HARDWARE_KEY",
    "REQUESTS",
    "RUNNING",
    "SUBMITTED",
    "TERMINAL_STATES",
    "UNKNOWN",
    "BlockRangeUncovered",
    "ContextTooLong",
    "InvalidRoute",
    "KvBudgetExceeded",
    "ModelGeometry",
    "NoLiveHeadHolder",
    "PeerObservations",
    "PlanError",
    "PlanningContext",
    "RequestAccepted",
    "RequestCancelled",
    "RequestCompleted",
    "RequestFailed",
    "RequestRecord",
    "RequestSubmitted",
    "RouteReplanned",
    "RoutePlan",
    "SchedulerError",
    "SchedulerReducer",
    "SchedulerView",
    "TokenGenerated",
    "admit",
    "choose_driver",
    "driver_order",
    "kv_budget",
    "plan_digest",
    "plan_route",
    "rank_expert_replicas",
    "rank_replicas",
    "records_digest",
    "replan_route",
    "request_id_for",
    "request_failed_for",
]
