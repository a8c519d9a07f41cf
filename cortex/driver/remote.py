"""A block held by another node, called over the data plane.

Shape legend: T = new tokens of the session, D = hidden size.
"""

from __future__ import annotations

from typing import Protocol

import torch

from cortex.driver.errors import CallFailed


class BlockCaller(Protocol):
    async def call_block(
        self, peer: str, method: str, meta: dict[str, object], tensors: list[torch.Tensor]
    ) -> list[torch.Tensor]: ...


class RemoteBlockExecutor:
    """`BlockExecutor` for block `spec` of `model_id` on `peer`."""

    def __init__(self, caller: BlockCaller, peer: str, model_id: str, spec: str) -> None:
        self.caller = caller
        self.peer = peer
        self.model_id = model_id
        self.spec = spec

    async def run(self, session_id: str, hidden: torch.Tensor, position: int) -> torch.Tensor:
        meta: dict[str, object] = {"model": self.model_id, "spec": self.spec, "session": session_id, "position": position}
        tensors = await self.caller.call_block(self.peer, "block", meta, [hidden])
        if len(tensors) != 1 or tuple(tensors[0].shape) != tuple(hidden.shape):
            raise CallFailed(self.peer, f"block {self.spec}", f"reply shapes {[list(t.shape) for t in tensors]}, expected {list(hidden.shape)}")
        return tensors[0]  # [T, D]

    async def close(self, session_id: str) -> None:
        await self.caller.call_block(self.peer, "close", {"model": self.model_id, "spec": self.spec, "session": session_id}, [])
