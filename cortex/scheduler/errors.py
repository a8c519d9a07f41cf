"""Errors of the scheduler: planning failures, each with the reason code a driver publishes.

`SchedulerError` is the base. `PlanError` and its subclasses mean a request cannot be
planned now. Each carries `code`, the `reason_code` of the `RequestFailed` event that a
driver publishes for it (see `request_failed_for` in `cortex.scheduler.admission`). Each
also carries `details`, the numbers behind the message as integers and strings.
"""

from __future__ import annotations


class SchedulerError(Exception):
    """Base class of every error raised by `cortex.scheduler`."""


class PlanError(SchedulerError):
    """A request cannot be planned with the swarm as the views show it."""

    code = "plan_failed"

    def __init__(self, message: str, details: dict[str, int | str] | None = None) -> None:
        super().__init__(message)
        self.details: dict[str, int | str] = dict(details or {})


class NoLiveHeadHolder(PlanError):
    """No live peer has loaded the head of the model, so no node can drive the request."""

    code = "no_head_holder"


class BlockRangeUncovered(PlanError):
    """Some decoder layers of the model have no live holder that can take the request."""

    code = "block_range_uncovered"


class KvBudgetExceeded(PlanError):
    """Every live holder of some layers lacks the KV-cache room this request needs."""

    code = "kv_budget_exceeded"


class InvalidRoute(PlanError):
    """A route or a model geometry given to the planner is inconsistent."""

    code = "invalid_route"


class ContextTooLong(PlanError):
    """The prompt plus `max_tokens` exceeds the model's maximum context length."""

    code = "context_too_long"
