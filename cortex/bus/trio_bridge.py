"""Run a trio event loop in its own thread and call into it from asyncio.

libp2p 0.8.1 runs only on trio while the node runs on asyncio (pyzmq,
nats-py). `TrioThread` owns one daemon thread running `trio.run`. asyncio
code schedules trio work with `call` (through `trio_token.run_sync_soon`),
and trio code hands results back with `loop.call_soon_threadsafe`. One
crossing costs about 30 microseconds, so callers batch work per crossing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from cortex.bus.errors import TransportError

logger = logging.getLogger(__name__)

T = TypeVar("T")
MainFunction = Callable[[trio.Nursery, Callable[[], None], trio.Event], Awaitable[None]]


class TrioThread:
    """A trio loop in a thread, with a nursery that asyncio code can start tasks in.

    `main(nursery, ready, stopping)` runs inside the trio loop for the thread's
    whole life. It sets up its resources, calls `ready()`, waits for the
    `stopping` event that `stop()` sets, then releases what it opened (not
    cancelled, so its cleanup can await). Tasks left in the nursery are
    cancelled after `main` returns.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._cancel_scope: trio.CancelScope | None = None
        self._stopping: trio.Event | None = None
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._finished: concurrent.futures.Future[None] = concurrent.futures.Future()

    async def start(self, main: MainFunction, timeout: float) -> None:
        """Start the thread and wait until `main` calls its `ready` callback."""
        self._thread = threading.Thread(target=self._run, args=(main,), name=self.name, daemon=True)
        self._thread.start()
        try:
            await asyncio.wait_for(asyncio.wrap_future(self._started), timeout)
        except TimeoutError:
            await self.stop(timeout)
            raise TransportError(f"{self.name}: trio thread did not become ready within {timeout} s") from None

    def _run(self, main: MainFunction) -> None:
        try:
            trio.run(self._main, main)
        except BaseException as error:  # noqa: BLE001 - reported to the waiting asyncio side
            logger.error("%s: trio loop failed: %r", self.name, error)
            if not self._started.done():
                self._started.set_exception(TransportError(f"{self.name}: trio loop failed: {error!r}"))
            if not self._finished.done():
                self._finished.set_exception(error)
            return
        if not self._started.done():
            self._started.set_exception(TransportError(f"{self.name}: trio loop exited before it was ready"))
        self._finished.set_result(None)

    async def _main(self, main: MainFunction) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stopping = trio.Event()
        with trio.CancelScope() as scope:
            self._cancel_scope = scope
            async with trio.open_nursery() as nursery:
                self._nursery = nursery

                def ready() -> None:
                    if not self._started.done():
                        self._started.set_result(None)

                await main(nursery, ready, self._stopping)
                nursery.cancel_scope.cancel()

    def call(self, function: Callable[..., Awaitable[T]], *args: Any) -> asyncio.Future[T]:
        """Run `function(*args)` as a task in the trio loop; return an asyncio future of its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._token is None or self._nursery is None:
            future.set_exception(TransportError(f"{self.name}: trio thread is not running"))
            return future

        def settle(result: T | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        async def task() -> None:
            try:
                result = await function(*args)
            except Exception as error:  # noqa: BLE001 - handed to the asyncio caller
                loop.call_soon_threadsafe(settle, None, error)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        nursery = self._nursery
        try:
            self._token.run_sync_soon(lambda: nursery.start_soon(task))
        except trio.RunFinishedError:
            future.set_exception(TransportError(f"{self.name}: trio thread has stopped"))
        return future

    def _signal(self, function: Callable[[], Any] | None) -> None:
        if self._token is None or function is None:
            return
        try:
            self._token.run_sync_soon(function)
        except trio.RunFinishedError:
            pass

    def call_sync_soon(self, function: Callable[..., Any], *args: Any) -> None:
        """Run a plain function in the trio loop without waiting for it."""
        if self._token is None:
            raise TransportError(f"{self.name}: trio thread is not running")
        self._token.run_sync_soon(function, *args)

    async def stop(self, timeout: float) -> None:
        """Ask `main` to finish, wait for the loop to exit and join the thread.

        If `main` has not returned within `timeout`, the whole loop is cancelled
        and given `timeout` more seconds.
        """
        if self._thread is None:
            return
        self._signal(self._stopping.set if self._stopping is not None else None)
        finished = asyncio.wrap_future(self._finished)
        try:
            await asyncio.wait_for(asyncio.shield(finished), timeout)
        except TimeoutError:
            logger.error("%s: trio loop did not finish within %s s, cancelling it", self.name, timeout)
            self._signal(self._cancel_scope.cancel if self._cancel_scope is not None else None)
            try:
                await asyncio.wait_for(finished, timeout)
            except (TimeoutError, Exception) as error:  # noqa: BLE001 - logged, the thread is abandoned
                logger.error("%s: trio loop still running after cancel: %r", self.name, error)
        except Exception as error:  # noqa: BLE001 - the failure was already logged by _run
            logger.debug("%s: trio loop ended with %r", self.name, error)
        # The loop has returned (or was abandoned above), so this join is short.
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("%s: thread %s is still alive after stop", self.name, self._thread.name)
        self._thread = None
