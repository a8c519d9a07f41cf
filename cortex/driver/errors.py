"""Errors of the driver, the TokenRouter and the node's serving side."""

from __future__ import annotations

import asyncio
from typing import Any


class DriverError(Exception):
    """Base class of every error raised by `cortex.driver`."""


class CallFailed(DriverError):
    """A call to one peer failed or timed out; the caller may retry it on another holder."""

    def __init__(self, peer: str, what: str, reason: str) -> None:
        super().__init__(f"{what} on peer {peer} failed: {reason}")
        self.peer = peer
        self.what = what
        self.reason = reason


class NoLiveHolder(DriverError):
    """Every holder of a fragment failed or none is live, so the request cannot go on."""


class RequestRejected(DriverError):
    """A request that a node refuses to run, with the reason (admission, unknown model, ...)."""


def abandon_call(task: asyncio.Future[Any]) -> None:
    """Drop a call whose result no caller awaits any more: cancel it, and take the error it ends with.

    A call can end with an error (a timeout, say) in the same event loop iteration in which its
    caller is cancelled, or while it handles its own cancellation. Taking that error keeps
    asyncio from logging it as never retrieved.
    """
    if task.done():
        _take_error(task)
    else:
        task.cancel()
        task.add_done_callback(_take_error)


def _take_error(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
