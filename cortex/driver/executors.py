"""The two interfaces the driver loop is written against, and their local implementations.

- `ExpertDispatcher.dispatch(session_id, call, step) -> outputs [T, K, D]`: runs the routed
  experts of one paused MoE layer. `LocalExpertDispatcher` runs experts held in this
  process; `cortex.driver.router.TokenRouter` sends them to replicas over the data plane.
- `BlockExecutor.run(session_id, hidden [T, D], position) -> hidden [T, D]`: appends
  tokens to a session on one block (decoder layers a to b-1) and returns the block's
  output. `LocalBlockExecutor` runs a block held in this process and dispatches its MoE
  layers through an `ExpertDispatcher`; `cortex.driver.remote.RemoteBlockExecutor` calls
  the block's holder.

Shape legend: T = new tokens of the session, D = hidden size, K = experts per token.

Compute runs through a `Compute` callable, so a node can run torch in its worker thread
while its event loop keeps serving the network. A block returns from
`forward_until_moe` before its experts run, so no worker thread waits on the network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import torch

from cortex.runtime.engine import dispatch_experts
from cortex.runtime.fragments import Block, BlockOutput, BlockStep, Expert, MoeCall

R = TypeVar("R")
# NOTE: sized for small CPU models; a large model's one-token block step can hold the event
# loop for tens of milliseconds, delaying other calls' network I/O by as much.
INLINE_MAX_TOKENS = 1
Compute = Callable[..., Awaitable[Any]]


async def run_inline(function: Callable[..., R], *args: Any) -> R:
    """Run `function(*args)` in the event loop thread (tests, one-process runs)."""
    with torch.inference_mode():
        return function(*args)


def worker_compute(executor: ThreadPoolExecutor) -> Compute:
    """Return a `Compute` that runs torch work in `executor` under inference mode."""

    def call(function: Callable[..., Any], *args: Any) -> Any:
        with torch.inference_mode():
            return function(*args)

    async def compute(function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, call, function, *args)

    return compute


class ExpertDispatcher(Protocol):
    async def dispatch(self, session_id: str, call: MoeCall, step: int) -> torch.Tensor:
        """Return the unweighted outputs [T, K, D] of every token's routed experts in `call`.

        `step` is the session position of the call's first token, for the records.
        """
        ...


class BlockExecutor(Protocol):
    spec: str

    async def run(self, session_id: str, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Append hidden states [T, D] at `position` to the session and return the block's output [T, D]."""
        ...

    async def close(self, session_id: str) -> None:
        """Drop the session's KV cache on the block."""
        ...


class LocalExpertDispatcher:
    """Runs routed experts held in this process; `experts[layer][index]`."""

    def __init__(self, experts: dict[int, dict[int, Expert]], compute: Compute = run_inline) -> None:
        self.experts = experts
        self.compute = compute

    async def dispatch(self, session_id: str, call: MoeCall, step: int) -> torch.Tensor:
        outputs: torch.Tensor = await self.compute(dispatch_experts, call, self.experts[call.layer])
        return outputs


class LocalBlockExecutor:
    """A block held in this process whose MoE layers go through `dispatcher`.

    Calls of at most `INLINE_MAX_TOKENS` tokens (decode steps) run in the event loop thread:
    for them the hand-off to the worker thread and back costs more than the compute.
    """

    def __init__(self, block: Block, dispatcher: ExpertDispatcher, compute: Compute = run_inline) -> None:
        self.block = block
        self.spec = block.spec
        self.dispatcher = dispatcher
        self.compute = compute

    async def run(self, session_id: str, hidden: torch.Tensor, position: int) -> torch.Tensor:
        compute = run_inline if hidden.shape[0] <= INLINE_MAX_TOKENS else self.compute
        step: BlockStep = await compute(self.block.forward_until_moe, session_id, hidden, position)
        try:
            while isinstance(step, MoeCall):
                outputs = await self.dispatcher.dispatch(session_id, step, position)  # [T, K, D]
                step = await compute(self.block.combine_and_continue, session_id, outputs)
        except BaseException:
            # The session is paused mid-block and cannot continue: drop it so a replay starts clean.
            self.block.close_session(session_id)
            raise
        assert isinstance(step, BlockOutput)
        return step.hidden

    async def close(self, session_id: str) -> None:
        self.block.close_session(session_id)
