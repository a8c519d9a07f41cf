"""ExpertBatcher: experts queued in one loop iteration run from one callback, each failure stays with its expert."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cortex.driver.executors import run_inline
from cortex.node.service import ExpertBatcher


class ScaleService:
    """Expert `index` multiplies rows by index + 1; expert 13 does not exist; counts forward passes."""

    def __init__(self) -> None:
        self.passes: list[tuple[int, int, int]] = []

    def run_expert(self, layer: int, index: int, rows: torch.Tensor) -> torch.Tensor:
        if index == 13:
            raise KeyError(f"no expert[{layer}][{index}]")
        self.passes.append((layer, index, rows.shape[0]))
        return rows * (index + 1)


async def test_concurrent_calls_share_one_pass_per_expert() -> None:
    service = ScaleService()
    batcher = ExpertBatcher(service, run_inline)  # type: ignore[arg-type]

    first, second = await asyncio.gather(
        batcher.run_many([(1, 0, torch.ones(1, 4)), (1, 2, torch.ones(2, 4))]),
        batcher.run_many([(1, 2, torch.full((1, 4), 2.0))]),
    )

    assert torch.equal(first[0], torch.ones(1, 4))
    assert torch.equal(first[1], torch.full((2, 4), 3.0))
    assert torch.equal(second[0], torch.full((1, 4), 6.0))
    assert sorted(service.passes) == [(1, 0, 1), (1, 2, 3)]
    assert (batcher.forward_passes, batcher.merged_calls) == (2, 1)


async def test_failing_expert_leaves_other_experts_served() -> None:
    service = ScaleService()
    batcher = ExpertBatcher(service, run_inline)  # type: ignore[arg-type]

    # Rows of another width for expert 0 make its merged pass fail; expert 1 must still return its outputs.
    honest = asyncio.ensure_future(batcher.run_many([(1, 1, torch.ones(2, 4))]))
    mismatched = asyncio.ensure_future(batcher.run_many([(1, 0, torch.ones(2, 4)), (1, 0, torch.ones(2, 5))]))
    missing = asyncio.ensure_future(batcher.run_many([(1, 13, torch.ones(1, 4))]))

    async with asyncio.timeout(2.0):
        assert torch.equal((await honest)[0], torch.full((2, 4), 2.0))
        with pytest.raises(RuntimeError):
            await mismatched
        with pytest.raises(KeyError, match="expert"):
            await missing
