"""The driver loop over local executors gives exactly LocalModel's output."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from cortex.driver.errors import CallFailed, NoLiveHolder
from cortex.driver.executors import LocalBlockExecutor, LocalExpertDispatcher
from cortex.driver.loop import DriverLoop, Stage
from cortex.runtime.engine import LocalModel
from cortex.runtime.generation import generate_tokens
from cortex.runtime.loader import Loader

PROMPT = [1, 17, 42, 99, 7, 256, 3]


def _driver(loader: Loader, block_ranges: list[tuple[int, int]]) -> DriverLoop:
    experts = {
        layer: {index: loader.load_expert(layer, index) for index in range(loader.num_experts)}
        for layer in loader.moe_layers
    }
    dispatcher = LocalExpertDispatcher(experts)
    stages = [Stage(LocalBlockExecutor(loader.load_block(a, b), dispatcher)) for a, b in block_ranges]
    return DriverLoop(loader.load_head(), stages)


@pytest.mark.parametrize("arch", ["deepseek_v3", "mixtral", "llama"])
async def test_driver_loop_equals_local_model(arch: str, checkpoint: Callable[[str], Path]) -> None:
    folder = checkpoint(arch)
    expected = list(generate_tokens(LocalModel.load(folder, device="cpu"), PROMPT, 12))
    loader = Loader(folder, device="cpu")
    split = loader.num_layers // 2
    driver = _driver(loader, [(0, split), (split, loader.num_layers)])

    outcome = await driver.generate("s1", PROMPT, 12)

    assert outcome.token_ids == expected
    assert outcome.stop_reason == "max_tokens"
    assert set(outcome.timings_ms) == {"prefill", "decode", "total"}


class _FailingOnce:
    """A block executor that fails its first call after `fail_at` calls, as a dead holder does."""

    def __init__(self, inner: LocalBlockExecutor, fail_at: int) -> None:
        self.inner = inner
        self.spec = inner.spec
        self.peer = "dying-peer"
        self.calls = 0
        self.fail_at = fail_at

    async def run(self, session_id: str, hidden: torch.Tensor, position: int) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.fail_at:
            raise CallFailed(self.peer, f"block {self.spec}", "connection lost")
        return await self.inner.run(session_id, hidden, position)

    async def close(self, session_id: str) -> None:
        await self.inner.close(session_id)


async def test_stage_replays_session_on_replacement(checkpoint: Callable[[str], Path]) -> None:
    folder = checkpoint("deepseek_v3")
    expected = list(generate_tokens(LocalModel.load(folder, device="cpu"), PROMPT, 10))
    loader = Loader(folder, device="cpu")
    experts = {layer: {i: loader.load_expert(layer, i) for i in range(loader.num_experts)} for layer in loader.moe_layers}
    dispatcher = LocalExpertDispatcher(experts)
    dying = _FailingOnce(LocalBlockExecutor(loader.load_block(0, 3), dispatcher), fail_at=4)
    spare = LocalBlockExecutor(loader.load_block(0, 3), dispatcher)
    offered: list[set[str]] = []

    async def replace(failed: set[str]) -> LocalBlockExecutor | None:
        offered.append(failed)
        return spare

    stage = Stage(dying, replace)
    outcome = await DriverLoop(loader.load_head(), [stage]).generate("s1", PROMPT, 10)

    assert outcome.token_ids == expected
    assert offered == [{"dying-peer"}]
    assert len(outcome.replays) == 1
    assert outcome.replays[0]["replayed_tokens"] == len(PROMPT) + 3


async def test_stage_without_replacement_raises(checkpoint: Callable[[str], Path]) -> None:
    loader = Loader(checkpoint("llama"), device="cpu")
    dying = _FailingOnce(LocalBlockExecutor(loader.load_block(0, 2), LocalExpertDispatcher({})), fail_at=1)
    async def no_replacement(failed: set[str]) -> None:
        return None

    driver = DriverLoop(loader.load_head(), [Stage(dying, no_replacement)])

    with pytest.raises(NoLiveHolder, match="dying-peer"):
        await driver.generate("s1", PROMPT, 5)
