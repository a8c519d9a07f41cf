"""Errors raised by the replay tools: opening logs, selecting events and loading views."""

from __future__ import annotations


class ReplayError(Exception):
    """Base class of every error the `replay` package raises."""


class LogOpenError(ReplayError):
    """A log file cannot be opened for reading (missing, not a Cortex log, unknown format)."""


class EventNotFound(ReplayError):
    """An event id or id prefix matches no event, or more than one."""


class SelectionError(ReplayError):
    """A `--until`, `--since` or time value cannot be parsed or points outside the log."""


class ViewUnavailable(ReplayError):
    """A view's module is not installed in this build, or its name is not registered."""
