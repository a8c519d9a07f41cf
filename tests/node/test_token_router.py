"""TokenRouter with an in-process directory: grouping, scatter, retries, and the expert batcher."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cortex.driver.errors import CallFailed, NoLiveHolder, abandon_call
from cortex.driver.executors import run_inline
from cortex.driver.router import TokenRouter, cover_replicas
from cortex.node.service import ExpertBatcher, ModelService
from cortex.runtime.engine import dispatch_experts
from cortex.runtime.fragments import Expert, MoeCall
from cortex.runtime.loader import Loader
from cortex.runtime.routing import RoutingDecision


class _Directory:
    """Replicas "a" and "b" hold every expert; peers in `dead` fail every call."""

    call_timeout_s = 1.0

    def __init__(self, experts: dict[int, Expert], dead: set[str]) -> None:
        self.experts = experts
        self.dead = dead
        self.calls: list[tuple[str, list[int]]] = []
        self.failures: list[str] = []

    def replicas(self, layer: int, expert: int) -> list[str]:
        return ["a", "b"]

    def note_failure(self, peer: str) -> None:
        self.failures.append(peer)

    async def call_experts(
        self, peer: str, request_id: str, step: int, segments: list[tuple[int, int, torch.Tensor]]
    ) -> list[torch.Tensor]:
        self.calls.append((peer, [expert for _, expert, _ in segments]))
        if peer in self.dead:
            raise CallFailed(peer, "expert", "connection refused")
        return [self.experts[expert](rows) for _, expert, rows in segments]


def _moe_call(loader: Loader, tokens: int) -> tuple[MoeCall, dict[int, Expert]]:
    layer = loader.moe_layers[0]
    experts = {index: loader.load_expert(layer, index) for index in range(loader.num_experts)}
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, loader.hidden_size, generator=generator)  # [T, D]
    expert_ids = torch.stack([torch.randperm(loader.num_experts, generator=generator)[:4] for _ in range(tokens)])  # [T, K]
    weights = torch.full((tokens, 4), 0.25)  # [T, K]
    return MoeCall(layer, hidden, RoutingDecision(expert_ids, weights)), experts


@pytest.fixture
def loader(checkpoint: Callable[[str], Path]) -> Loader:
    return Loader(checkpoint("deepseek_v3"), device="cpu")


async def test_router_equals_local_dispatch(loader: Loader) -> None:
    call, experts = _moe_call(loader, tokens=5)
    directory = _Directory(experts, dead=set())

    outputs = await TokenRouter(directory).dispatch("r1", call, step=0)  # [T, K, D]

    assert outputs.shape == (5, 4, loader.hidden_size)
    assert torch.equal(outputs, dispatch_experts(call, experts))
    # Both replicas hold every expert, so the layer's experts go to the better ranked one in one call.
    assert [peer for peer, _ in directory.calls] == ["a"]
    assert directory.calls[0][1] == sorted(set(call.routing.expert_ids.reshape(-1).tolist()))


def test_cover_picks_fewest_replicas() -> None:
    # "c" is ranked second for every expert but alone holds all four; "a" and "b" hold two each.
    candidates = {1: ["a", "c"], 2: ["a", "c"], 5: ["b", "c"], 7: ["b", "c"]}

    assert cover_replicas(candidates, load={}) == {"c": [1, 2, 5, 7]}


def test_cover_tie_breaks() -> None:
    candidates = {0: ["a", "b"], 1: ["b", "a"], 2: ["a", "b"], 3: ["c", "a"]}

    assert cover_replicas(candidates, load={}) == {"a": [0, 1, 2, 3]}
    # Calls in flight do not outweigh coverage: only "a" covers all four experts.
    assert cover_replicas(candidates, load={"a": 5}) == {"a": [0, 1, 2, 3]}
    two_way = {0: ["a", "b"], 1: ["b", "a"], 2: ["a", "b"]}
    assert cover_replicas(two_way, load={}) == {"a": [0, 1, 2]}  # better mean rank
    assert cover_replicas(two_way, load={"a": 1}) == {"b": [0, 1, 2]}  # fewer calls in flight
    assert cover_replicas({4: ["y", "x"]}, load={}) == cover_replicas({4: ["y", "x"]}, load={}) == {"y": [4]}


def test_cover_splits_across_replicas() -> None:
    candidates = {0: ["a"], 1: ["b"], 2: ["a", "b"], 3: ["c", "b"]}

    plan = cover_replicas(candidates, load={})

    assert plan == {"b": [1, 2, 3], "a": [0]}


async def test_router_retries_failed_replica(loader: Loader) -> None:
    call, experts = _moe_call(loader, tokens=3)
    directory = _Directory(experts, dead={"a"})
    router = TokenRouter(directory)

    outputs = await router.dispatch("r1", call, step=0)

    assert torch.equal(outputs, dispatch_experts(call, experts))
    assert directory.failures == ["a"]
    assert router.stats.retries == 1
    assert set(router.stats.rows_by_peer) == {"b"}


async def test_router_without_live_replica_raises(loader: Loader) -> None:
    call, experts = _moe_call(loader, tokens=2)

    with pytest.raises(NoLiveHolder, match="no live replica left"):
        await TokenRouter(_Directory(experts, dead={"a", "b"})).dispatch("r1", call, step=0)


async def test_expert_batcher_merges_concurrent_calls(checkpoint: Callable[[str], Path]) -> None:
    service = ModelService(checkpoint("deepseek_v3"), "test", "cpu", "float32")
    layer = service.loader.moe_layers[0]
    service.load(f"expert[{layer}][3]")
    batcher = ExpertBatcher(service, run_inline)
    inputs = [torch.randn(rows, service.loader.hidden_size) for rows in (1, 2, 3)]

    outputs = await asyncio.gather(*(batcher.run(layer, 3, rows) for rows in inputs))

    assert batcher.forward_passes == 1
    assert batcher.merged_calls == 2
    for rows, output in zip(inputs, outputs, strict=True):
        torch.testing.assert_close(output, service.run_expert(layer, 3, rows), rtol=1e-5, atol=1e-6)


def test_cover_prefers_local_node() -> None:
    # "r" alone covers all three, but this node ("me") runs experts 1 and 2 without a call.
    candidates = {1: ["me", "r"], 2: ["r", "me"], 3: ["r", "s"]}

    assert cover_replicas(candidates, load={}, local="me") == {"me": [1, 2], "r": [3]}
    assert cover_replicas(candidates, load={}) == {"r": [1, 2, 3]}


async def test_abandon_call_cancels_or_takes_the_error() -> None:
    reported: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))

    async def times_out() -> None:
        raise CallFailed("a", "expert", "no reply within 3.0 s")

    # A call that failed as its caller was cancelled, dropped as is: asyncio reports it.
    dropped = asyncio.ensure_future(times_out())
    await asyncio.sleep(0)
    del dropped
    gc.collect()
    assert len(reported) == 1
    assert "never retrieved" in str(reported[0]["message"])

    failed = asyncio.ensure_future(times_out())
    await asyncio.sleep(0)
    running = asyncio.ensure_future(asyncio.sleep(10))
    abandon_call(failed)
    abandon_call(running)
    await asyncio.sleep(0)
    assert running.cancelled()
    del failed
    gc.collect()
    assert len(reported) == 1
