"""A whole model in one process, run fragment by fragment.

`LocalModel` keeps a head, blocks covering every layer, and every routed
expert. It drives them exactly as a distributed driver would: embed, run each
block until it pauses at an MoE layer, dispatch the routed experts, combine,
continue, and finish with the head's logits. It is what `cortex generate` and degraded
mode run.

Shape legend: T = new tokens of the session, D = hidden size, V = vocabulary
size, K = experts per token, N = token rows sent to one expert.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cortex.runtime.fragments import Block, BlockOutput, Expert, Head, MoeCall
from cortex.runtime.loader import Loader
from cortex.runtime.progress import MIB

logger = logging.getLogger(__name__)


def dispatch_experts(call: MoeCall, experts: dict[int, Expert]) -> torch.Tensor:
    """Run every token's routed experts and return their outputs [T, K, D].

    Tokens are grouped by expert, so each expert runs once on all its rows
    [N, D]. `experts` maps expert index to the loaded `Expert` of `call.layer`.
    """
    expert_ids = call.routing.expert_ids  # [T, K]
    tokens, top_k = expert_ids.shape
    hidden = call.hidden  # [T, D]
    if tokens == 1:
        rows = [experts[index](hidden) for index in expert_ids[0].tolist()]  # K x [1, D]
        return torch.cat(rows).unsqueeze(0)  # [1, K, D]

    flat = expert_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)  # slots grouped by expert
    present, counts = torch.unique_consecutive(flat[order], return_counts=True)
    grouped = hidden[order // top_k]  # [T*K, D], the token of each slot
    outputs = torch.empty_like(grouped)
    start = 0
    for index, count in zip(present.tolist(), counts.tolist(), strict=True):
        outputs[start : start + count] = experts[index](grouped[start : start + count])  # [N, D]
        start += count
    unsorted = torch.empty_like(outputs)
    unsorted[order] = outputs
    return unsorted.view(tokens, top_k, -1)  # [T, K, D]


class LocalModel:
    """Every fragment of one model in this process, with a forward pass per session."""

    def __init__(self, head: Head, blocks: Sequence[Block], experts: dict[tuple[int, int], Expert], config: Any) -> None:
        self.head = head
        self.blocks = list(blocks)
        self.config = config
        self._experts: dict[int, dict[int, Expert]] = {}
        for (layer, index), expert in experts.items():
            self._experts.setdefault(layer, {})[index] = expert

    @classmethod
    def load(
        cls,
        checkpoint_dir: str | Path,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        block_size: int | None = None,
        terminal: bool | None = None,
    ) -> LocalModel:
        """Load a whole checkpoint as a head, blocks of `block_size` layers (default: one block) and all experts."""
        loader = Loader(checkpoint_dir, device=device, dtype=dtype, terminal=terminal)
        step = block_size or loader.num_layers
        specs = ["head"] + [f"block[{a}:{min(a + step, loader.num_layers)}]" for a in range(0, loader.num_layers, step)]
        specs += [f"expert[{layer}][{index}]" for layer in loader.moe_layers for index in range(loader.num_experts)]
        total = sum(loader.fragment_nbytes(spec) for spec in specs)
        with loader.shared_progress(Path(checkpoint_dir).name, total):
            fragments = [loader.load(spec) for spec in specs]
        head = fragments[0]
        blocks = [f for f in fragments if isinstance(f, Block)]
        experts = {(f.layer, f.index): f for f in fragments if isinstance(f, Expert)}
        assert isinstance(head, Head)
        model = cls(head, blocks, experts, loader.config)
        logger.info(
            "loaded %s: %d blocks, %d experts, %.2f MiB", Path(checkpoint_dir).name, len(blocks), len(experts), model.nbytes / MIB
        )
        return model

    @property
    def nbytes(self) -> int:
        total = self.head.nbytes + sum(block.nbytes for block in self.blocks)
        return total + sum(e.nbytes for experts in self._experts.values() for e in experts.values())

    def experts_of(self, layer: int) -> dict[int, Expert]:
        return self._experts[layer]

    def run_block(self, block: Block, session_id: str, hidden: torch.Tensor) -> torch.Tensor:
        """Run `hidden` [T, D] through one block, dispatching its MoE layers locally."""
        step = block.forward_until_moe(session_id, hidden)
        while isinstance(step, MoeCall):
            outputs = dispatch_experts(step, self._experts[step.layer])  # [T, K, D]
            step = block.combine_and_continue(session_id, outputs)
        assert isinstance(step, BlockOutput)
        return step.hidden

    def forward(self, session_id: str, token_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Append `token_ids` [T] to the session and return logits [T, V], or [1, V] for the last token."""
        hidden = self.head.embed(token_ids)  # [T, D]
        for block in self.blocks:
            hidden = self.run_block(block, session_id, hidden)
        if not all_logits:
            hidden = hidden[-1:]
        return self.head.logits(hidden)

    def session_length(self, session_id: str) -> int:
        return self.blocks[0].session_length(session_id)

    def close_session(self, session_id: str) -> None:
        for block in self.blocks:
            block.close_session(session_id)
