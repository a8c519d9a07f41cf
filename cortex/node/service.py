"""The fragments of one model that this node loaded, and the calls that run them.

Calls arrive over the channel (`cortex.node.channel`):

- `block`: meta `{model, spec, session, position}`, tensors `[hidden [T, D]]`; runs the
  block for the session, dispatching its MoE layers through this node's TokenRouter, and
  returns `[hidden [T, D]]`.
- `close`: meta `{model, spec, session}`; drops the session's KV cache.
- `experts`: meta `{model, segments: [[layer, expert, rows], ...], sessions}`, tensors
  `[rows [N, D]]`; returns `[outputs [N, D]]` and a signed `ExpertBatchServed` record.

Shape legend: T = tokens, D = hidden size, N = expert rows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cortex.driver.executors import Compute, ExpertDispatcher, LocalBlockExecutor
from cortex.runtime.fragments import Block, Expert, Head
from cortex.runtime.loader import Loader
from cortex.runtime.model_id import model_id

logger = logging.getLogger(__name__)


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

    def run_experts(self, segments: list[list[int]], rows: torch.Tensor) -> torch.Tensor:
        """Run each segment's rows through its expert and return the outputs [N, D] in row order."""
        outputs = torch.empty_like(rows)
        start = 0
        for layer, index, count in segments:
            expert = self.experts.get(layer, {}).get(index)
            if expert is None:
                raise ServiceError(f"this node does not hold expert[{layer}][{index}] of model {self.model_id[:16]}")
            outputs[start : start + count] = expert(rows[start : start + count])  # [n, D]
            start += count
        if start != rows.shape[0]:
            raise ServiceError(f"segments cover {start} rows but the call sent {rows.shape[0]}")
        return outputs

    def fragments(self) -> list[str]:
        names = (["head"] if self.head is not None else []) + sorted(self.blocks)
        names += [f"expert[{layer}][{index}]" for layer in sorted(self.experts) for index in sorted(self.experts[layer])]
        return names
