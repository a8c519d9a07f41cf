"""A block held by another node, called over the data plane.

Shape legend: T = new tokens of the session, D = hidden size.

The holder keeps the session's KV cache under the request id and drops it when the
request's `RequestCompleted`, `RequestFailed` or `RequestCancelled` reaches it, so `close`
sends nothing.
"""

from __future__ import annotations

from typing import Protocol

import torch


class StageCaller(Protocol):
    async def call_stage(self, peer: str, request_id: str, spec: str, position: int, hidden: torch.Tensor) -> torch.Tensor: ...


class RemoteBlockExecutor:
    """`BlockExecutor` for block `spec` on `peer`; session ids are request ids."""

    def __init__(self, caller: StageCaller, peer: str, spec: str) -> None:
        self.caller = caller
        self.peer = peer
        self.spec = spec

    async def run(self, session_id: str, hidden: torch.Tensor, position: int) -> torch.Tensor:
        return await self.caller.call_stage(self.peer, session_id, self.spec, position, hidden)  # [T, D]

    async def close(self, session_id: str) -> None:
        return None
