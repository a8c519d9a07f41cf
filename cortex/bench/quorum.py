"""`cortex bench quorum`: tokens/s with redundancy 1, 2 and 3 and with spot checks, in one run.

Setup: three expert nodes on loopback (node processes, every expert each, NATS bus with
its own local nats-server, CurveZMQ data plane, signed records, SQLite logs), and a driver
node holding the head and every block, run in this process so the bench can change its
quorum policy between phases without restarting it. With `--quick`, the three expert nodes
run in this process too (each with its own bus connection, data plane, log and compute
thread), because starting three Python processes that import torch takes most of a quick
run's time on a loaded machine; their compute then shares one interpreter with the driver. Each phase answers the same prompt with
greedy decoding, and its tokens must equal the redundancy-1 tokens or the bench fails:

- r1: redundancy 1, one replica per expert call;
- r2, r3: redundancy 2 and 3, every call compared by quorum and its vote and decision
  published;
- spot: redundancy 1 with spot checks of probability 0.1 (a sampled share of the calls also
  goes to a second replica).

Token rates count prefill and decode over generated tokens, from the driver's own timings,
best of `--repeats` requests per phase, after one warm-up request. Goals compare r2 with r1
directly, and with r1 plus the extra compute alone: the r1 time of a token plus one more
dispatch of each MoE layer, which is what r2 costs when the second replica's work cannot
overlap the first (all cores busy). Above that prediction, the rest is comparison and votes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cortex.bench._common import BenchReport, Goal, add_common_arguments, emit

PROMPT = "Return the number of items in the container"
SPOT_CHECK_PPM = 100_000
PHASES = (("r1", 1, 0), ("r2", 2, 0), ("r3", 3, 0), ("spot", 1, SPOT_CHECK_PPM))
SERVE_TIMEOUT_S = 120.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quorum",
        help="tokens/s with redundancy 1, 2, 3 and spot checks (p=0.1) on a loopback swarm",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    add_common_arguments(parser)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the demo model, else a DeepSeek-V3 test model)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per request (default: 24, --quick: 6)")
    parser.add_argument("--repeats", type=int, default=None, help="measured requests per phase, best kept (default: 3, --quick: 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cortex.bench.swarm import _model_folder

    tokens = args.tokens or (6 if args.quick else 24)
    repeats = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="cortex-bench-quorum-") as folder:
        root = Path(folder)
        model = _model_folder(args.model, root)
        report = asyncio.run(_measure(model, root, tokens, repeats, in_process=args.quick))
    return emit(report, args.json)


async def _measure(model: Path, root: Path, tokens: int, repeats: int, in_process: bool) -> BenchReport:
    from cortex.node.launcher import LocalSwarm
    from cortex.runtime.loader import Loader

    started = time.perf_counter()
    loader = Loader(model, device="cpu", terminal=False)
    experts = [f"expert[{layer}][{index}]" for layer in loader.moe_layers for index in range(loader.num_experts)]
    layout = [list(experts) for _ in range(3)]
    swarm: Any = InProcessSwarm(root / "swarm", model, layout) if in_process else LocalSwarm(root / "swarm", model, layout, backend="nats", log_level="WARNING")
    await swarm.start()
    try:
        phases = await _run_phases(swarm, model, root, loader.num_layers, tokens, repeats)
    finally:
        await swarm.stop()
    settings = "3 expert nodes in the bench process" if in_process else "3 expert node processes"
    return _report(model, len(loader.moe_layers), repeats, phases, time.perf_counter() - started, settings)


class InProcessSwarm:
    """Expert nodes run as `Node`s in this process on one local nats-server: the `--quick` setup."""

    def __init__(self, root: Path, model: Path, layout: list[list[str]]) -> None:
        self.root = root
        self.model = model
        self.layout = layout
        self.nats: Any = None
        self.nodes: list[Any] = []
        self.tasks: list[asyncio.Future[None]] = []

    async def start(self) -> None:
        """Start the nodes without waiting for them, so the driver starts at the same time; see `ready`."""
        from cortex.bus.nats_server import LocalNatsServer
        from cortex.node.node import Node

        self.nats = LocalNatsServer(self.root / "nats")
        await self.nats.start()
        for index, fragments in enumerate(self.layout):
            node = Node(_node_config(self, self.model, self.root / f"node{index}", tuple(fragments)))
            self.nodes.append(node)
            self.tasks.append(asyncio.ensure_future(node.run()))

    async def ready(self) -> None:
        """Wait until every node serves."""
        from cortex.node.lifecycle import read_status

        def serving(node: Any) -> bool:
            status = read_status(node.config.data_dir)
            return status is not None and status.get("state") == "serving"

        for node, task in zip(self.nodes, self.tasks, strict=True):
            await _wait_serving(node, task, serving)

    def client_transport_factory(self) -> Any:
        from cortex.node.launcher import transport_factory

        return transport_factory("nats", [], self.nats.url)

    async def stop(self) -> None:
        for node in self.nodes:
            node.stopping.set()
        for task in self.tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30.0)
        if self.nats is not None:
            await self.nats.stop()


async def _run_phases(swarm: Any, model: Path, root: Path, num_layers: int, tokens: int, repeats: int) -> dict[str, dict[str, Any]]:
    from cortex.node.client import SwarmClient
    from cortex.node.node import Node
    from cortex.quorum.policy import QuorumPolicy

    node = Node(_node_config(swarm, model, root / "driver", ("head", f"block[0:{num_layers}]")))
    task = asyncio.ensure_future(node.run())
    client = SwarmClient(root / "client", swarm.client_transport_factory())
    try:
        await _wait_serving(node, task, lambda node: bool(node.services) and all(s.head is not None for s in node.services.values()) and bool(node.tokenizers))
        if isinstance(swarm, InProcessSwarm):
            await swarm.ready()
        await client.start()
        model_id = client.resolve_model(str(model))
        await client.wait_for_model(model_id, {"head"}, SERVE_TIMEOUT_S)
        router = next(iter(node.routers.values()))
        assert router.quorum is not None
        await _request(client, model_id, 1, tokens)  # warm-up: connections, caches, first rankings
        phases: dict[str, dict[str, Any]] = {}
        for name, redundancy, spot_check_ppm in PHASES:
            router.quorum.policy = QuorumPolicy(spot_check_ppm=spot_check_ppm)
            before = dataclasses.replace(router.stats.quorum)
            dispatches, dispatch_s = router.stats.single_token_dispatches, router.stats.single_token_dispatch_s
            runs = [await _request(client, model_id, redundancy, tokens) for _ in range(repeats)]
            count = router.stats.single_token_dispatches - dispatches
            phases[name] = {
                "tokens_per_s": max(rate for rate, _ in runs),
                "token_ids": runs[-1][1],
                "dispatch_ms": 1000 * (router.stats.single_token_dispatch_s - dispatch_s) / max(count, 1),
                "decisions": router.stats.quorum.decisions - before.decisions,
                "spot_checks": router.stats.quorum.spot_checks - before.spot_checks,
            }
    finally:
        with contextlib.suppress(Exception):
            await client.stop()
        node.stopping.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30.0)
    return phases


async def _request(client: Any, model_id: str, redundancy: int, tokens: int) -> tuple[float, list[int]]:
    """Run one request; return its tokens/s (prefill and decode, the driver's timings) and its tokens."""
    request_id = await client.submit(model_id, PROMPT, tokens, redundancy=redundancy)
    result = await client.run(request_id, 300.0)
    if result.completed is None or result.completed.degraded:
        raise SystemExit(f"error: a redundancy {redundancy} request did not complete on the swarm: {result.failed}")
    timings = result.completed.timings_ms
    return len(result.token_ids) / max((timings["prefill"] + timings["decode"]) / 1000, 1e-9), list(result.token_ids)


def _node_config(swarm: Any, model: Path, data_dir: Path, fragments: tuple[str, ...]) -> Any:
    from cortex.node.config import BusSettings, DataPlaneSettings, ModelSettings, NodeConfig

    return NodeConfig(
        data_dir=data_dir,
        bus=BusSettings(backend="nats", nats_url=swarm.nats.url, join_wait_s=5.0),
        data_plane=DataPlaneSettings(call_timeout_s=10.0),
        models=(ModelSettings(path=model, fragments=fragments),),
        torch_threads=1,
        device="cpu",
        fallback_model=None,
        log_level="WARNING",
    )


async def _wait_serving(node: Any, task: asyncio.Future[None], serving: Callable[[Any], bool]) -> None:
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while not serving(node):
        if task.done():
            task.result()
            raise SystemExit(f"error: node {node.config.data_dir.name} stopped before it served")
        if time.monotonic() > deadline:
            raise SystemExit(f"error: node {node.config.data_dir.name} did not serve within {SERVE_TIMEOUT_S} s")
        await asyncio.sleep(0.05)


def _report(model: Path, moe_layers: int, repeats: int, phases: dict[str, dict[str, Any]], wall_s: float, nodes: str) -> BenchReport:
    reference = phases["r1"]["token_ids"]
    for name, phase in phases.items():
        if phase["token_ids"] != reference:
            raise SystemExit(f"error: phase {name} generated {phase['token_ids']}, redundancy 1 generated {reference}")
    report = BenchReport("quorum")
    report.results = {
        "model": str(model),
        "generated_tokens": len(reference),
        "repeats_per_phase": repeats,
        "settings": f"{nodes} (every expert each), in-process driver, NATS bus, CurveZMQ data plane, signed records and votes, SQLite logs, 1 torch thread per node",
        **{f"{name}_tokens_per_s": phase["tokens_per_s"] for name, phase in phases.items()},
        **{f"{name}_decisions": phase["decisions"] for name, phase in phases.items()},
        "spot_check_probability_ppm": SPOT_CHECK_PPM,
        "spot_checks": phases["spot"]["spot_checks"],
        "tokens_identical": True,
        "bench_wall_s": wall_s,
    }
    # If the second replica's work could not overlap at all, a token would take its r1 time
    # plus one more dispatch of every MoE layer: the cost of the extra compute alone.
    r1_token_ms = 1000 / phases["r1"]["tokens_per_s"]
    extra_compute_ms = phases["r1"]["dispatch_ms"] * moe_layers
    predicted_r2 = 1000 / (r1_token_ms + extra_compute_ms)
    report.results.update({
        **{f"{name}_dispatch_per_moe_layer_ms": phase["dispatch_ms"] for name, phase in phases.items()},
        "r2_predicted_from_extra_compute_tokens_per_s": predicted_r2,
    })
    report.goals = [
        Goal("r2 vs r1 tokens/s", phases["r2"]["tokens_per_s"] / phases["r1"]["tokens_per_s"], 0.5),
        Goal("r2 vs r1 plus extra compute alone", phases["r2"]["tokens_per_s"] / predicted_r2, 0.8),
        Goal("spot check p=0.1 vs r1 tokens/s", phases["spot"]["tokens_per_s"] / phases["r1"]["tokens_per_s"], 0.8),
    ]
    print(f"r3 vs r1 tokens/s: {phases['r3']['tokens_per_s'] / phases['r1']['tokens_per_s']:.3f}", file=sys.stderr)
    return report
