"""The fragments of one model that this node loaded, and the calls that run them.

The node serves them over the data plane (`cortex.comm`):

- `stage` calls (`StageInputSent` with `hidden` [T, D]) run a block for the request's
  session, dispatching its MoE layers through the node's TokenRouter, and reply with
  `StageOutputProduced` and the block's output [T, D].
- `expert` calls (one `ExpertBatchSent` record per layer, with a tensor [N, D] per expert)
  run the routed experts and reply with `ExpertBatchProduced` and the outputs [N, D]; a
  call with `ExpertInputSent` records gets `ExpertOutputProduced` ones. `ExpertBatcher`
  merges the calls for one expert that arrive together (from concurrent requests) into one
  forward pass.

Shape legend: T = tokens, D = hidden size, N = expert rows.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import torch

from cortex.driver.executors import Compute, ExpertDispatcher, LocalBlockExecutor
from cortex.runtime.fragments import Block, Expert, Head
from cortex.runtime.loader import Loader
from cortex.runtime.model_id import model_id

logger = logging.getLogger(__name__)

INLINE_MAX_ROWS = 4


class ServiceError(Exception):
    """A call names a model, fragment or session this node does not serve."""


class ModelService:
    """Loaded fragments of one model: an optional head, blocks by spec, experts by layer."""

    def __init__(self, path: Path, name: str, device: str, dtype: str) -> None:
        self.path = path
        self.name = name
        self.loader = Loader(path, device=device, dtype=dtype, terminal=False)
        self.model_id = model_id(self.loader.checkpoint)
        self.head: Head | None = None
        self.blocks: dict[str, Block] = {}
        self.experts: dict[int, dict[int, Expert]] = {}
        self.executors: dict[str, LocalBlockExecutor] = {}

    def load(self, fragment: str) -> int:
        """Load one fragment and return the bytes it takes."""
        loaded = self.loader.load(fragment)
        if isinstance(loaded, Head):
            self.head = loaded
        elif isinstance(loaded, Block):
            self.blocks[loaded.spec] = loaded
        else:
            self.experts.setdefault(loaded.layer, {})[loaded.index] = loaded
        return int(loaded.nbytes)

    def attach(self, dispatcher: ExpertDispatcher, compute: Compute) -> None:
        """Give every loaded block the dispatcher its MoE layers use."""
        self.executors = {spec: LocalBlockExecutor(block, dispatcher, compute) for spec, block in self.blocks.items()}

    def executor(self, spec: str) -> LocalBlockExecutor:
        executor = self.executors.get(spec)
        if executor is None:
            raise ServiceError(f"this node does not serve {spec} of model {self.model_id[:16]}; it serves {sorted(self.executors)}")
        return executor

    def run_expert(self, layer: int, index: int, rows: torch.Tensor) -> torch.Tensor:
        """Run rows [N, D] through expert[layer][index] and return its outputs [N, D]."""
        expert = self.experts.get(layer, {}).get(index)
        if expert is None:
            raise ServiceError(f"this node does not hold expert[{layer}][{index}] of model {self.model_id[:16]}")
        return expert(rows)

    def fragments(self) -> list[str]:
        names = (["head"] if self.head is not None else []) + sorted(self.blocks)
        names += [f"expert[{layer}][{index}]" for layer in sorted(self.experts) for index in sorted(self.experts[layer])]
        return names


class ExpertBatcher:
    """Merges the calls for one expert that arrive in one event loop iteration into one forward pass.

    Rows [N, D] of every queued call are concatenated, run once, and split back in order, so
    concurrent requests share each expert's matrix multiply. A pass over at most
    INLINE_MAX_ROWS rows runs in the event loop (the hand-off to the worker costs more), a
    larger one in the compute worker. All experts queued in one iteration are run by one
    callback, so a call for several experts costs one loop iteration, not one per expert.
    """

    def __init__(self, service: ModelService, compute: Compute) -> None:
        self.service = service
        self.compute = compute
        self.forward_passes = 0
        self.merged_calls = 0
        self._queues: dict[tuple[int, int], list[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, layer: int, index: int, rows: torch.Tensor) -> torch.Tensor:
        """Run rows [N, D] through expert[layer][index], merged with other queued rows for it."""
        return (await self.run_many([(layer, index, rows)]))[0]

    async def run_many(self, segments: list[tuple[int, int, torch.Tensor]]) -> list[torch.Tensor]:
        """Run each (layer, expert, rows [N, D]); return the outputs [N, D] in order."""
        loop = asyncio.get_running_loop()
        futures = []
        for layer, index, rows in segments:
            future: asyncio.Future[torch.Tensor] = loop.create_future()
            if not self._queues:
                loop.call_soon(self._flush)
            self._queues.setdefault((layer, index), []).append((rows, future))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    def _flush(self) -> None:
        queues, self._queues = self._queues, {}
        for key, queued in queues.items():
            # A failure (rows that do not fit the expert, say) fails this expert's calls only.
            try:
                self._forward(key, queued)
            except Exception as error:  # noqa: BLE001 - every waiting call of this expert gets the failure
                _fail(queued, error)

    def _forward(self, key: tuple[int, int], queued: list[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]]) -> None:
        rows = torch.cat([item for item, _ in queued]) if len(queued) > 1 else queued[0][0]  # [N, D]
        self.forward_passes += 1
        self.merged_calls += len(queued) - 1
        if rows.shape[0] > INLINE_MAX_ROWS:
            task = asyncio.get_running_loop().create_task(self._forward_in_worker(key, rows, queued))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        with torch.inference_mode():
            outputs = self.service.run_expert(key[0], key[1], rows)
        _split(queued, outputs)

    async def _forward_in_worker(
        self, key: tuple[int, int], rows: torch.Tensor, queued: list[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]]
    ) -> None:
        try:
            outputs: torch.Tensor = await self.compute(self.service.run_expert, key[0], key[1], rows)
        except Exception as error:  # noqa: BLE001 - every waiting call gets the failure
            _fail(queued, error)
            return
        _split(queued, outputs)


def _fail(queued: list[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]], error: Exception) -> None:
    for _, future in queued:
        if not future.done():
            future.set_exception(error)


def _split(queued: list[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]], outputs: torch.Tensor) -> None:
    offset = 0
    for item, future in queued:
        if not future.done():
            future.set_result(outputs[offset : offset + item.shape[0]])
        offset += item.shape[0]
