"""`cortex bench swarm`: the same checkpoint run locally and by a 4-node swarm on loopback.

Measured in one run:

- local tokens/s: `LocalModel` greedy generation in this process (what `cortex generate` runs);
- swarm tokens/s: the same prompt and token count answered by node processes on loopback
  (node 0: head and blocks; the experts over the others, two replicas each), production
  settings: libp2p bus (`--bus nats` for NATS), CurveZMQ data plane, signed records, durable SQLite logs. The
  generated tokens must equal the local ones, or the bench fails;
- per-MoE-layer dispatch overhead: the driver's mean wall time to dispatch one token's
  routed experts of one layer over the data plane, minus the same dispatch run locally;
- the raw ZeroMQ round trip (`cortex.comm.measure_raw_round_trip`) of one token's hidden
  state, the floor of any remote dispatch;
- two more floors on the same payload: the raw round trip with a signed record per message,
  checked on arrival (`cortex.comm.measure_signed_round_trip`), and a whole data-plane call
  between two data planes in this process with their SQLite logs
  (`cortex.comm.measure_local_call_round_trip`, two experts, no model compute). Against the
  swarm's calls they split the gap into the records, the data plane's own work, and what
  separate processes add;
- where a data-plane call's time goes: the driver's mean call, from sending to a checked
  reply, and the expert nodes' mean time from receiving a call to handing its reply to
  ZeroMQ. The difference is the loopback and the driver's own work on the message.

Both token rates count generation (prefill and decode) over generated tokens; the swarm
figure uses the driver's own timings, so gossip latency of the submission is left out and
reported separately as `swarm_request_ms`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cortex.bench._common import BenchReport, Goal, add_common_arguments, emit

PROMPT = "Return the number of items in the container"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "swarm",
        help="local vs loopback swarm (4 nodes by default) tokens/s, dispatch overhead, raw ZeroMQ round trip",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    add_common_arguments(parser)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the demo model, else a DeepSeek-V3 test model)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens to generate (default: 32, --quick: 8)")
    parser.add_argument("--nodes", type=int, default=4, help="node processes in the swarm (default: 4)")
    parser.add_argument(
        "--bus", choices=["libp2p", "nats"], default="libp2p",
        help="gossip bus backend (default: libp2p, a node's default; nats starts a local nats-server)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tokens = args.tokens or (8 if args.quick else 32)
    with tempfile.TemporaryDirectory(prefix="cortex-bench-swarm-") as folder:
        root = Path(folder)
        model = _model_folder(args.model, root)
        report = asyncio.run(_measure(model, root, tokens, args.nodes, args.bus))
    return emit(report, args.json)


def _model_folder(model: Path | None, root: Path) -> Path:
    from cortex.commands.generate import DEMO_MODEL_DIR

    if model is not None:
        return model.resolve()
    if (DEMO_MODEL_DIR / "config.json").exists():
        return DEMO_MODEL_DIR
    from cortex.runtime.testmodels import make_test_checkpoint

    print(f"the demo model is not installed ({DEMO_MODEL_DIR}); using a DeepSeek-V3 test checkpoint", file=sys.stderr)
    return make_test_checkpoint("deepseek_v3", root / "deepseek_v3")


async def _measure(model: Path, root: Path, tokens: int, nodes: int, bus: str) -> BenchReport:
    import torch

    from cortex.comm import measure_local_call_round_trip, measure_raw_round_trip, measure_signed_round_trip

    torch.set_num_threads(1)
    local = _measure_local(model, tokens)
    swarm = await _measure_swarm(model, root, tokens, nodes, bus)
    if swarm["token_ids"] != local["token_ids"]:
        raise SystemExit(f"error: swarm tokens {swarm['token_ids']} differ from local tokens {local['token_ids']}")
    payload = local["hidden_size"] * 4
    raw = await measure_raw_round_trip(payload_bytes=payload, rounds=200, warmup=20)
    signed = await measure_signed_round_trip(payload_bytes=payload, rounds=200, warmup=20)
    in_process = await measure_local_call_round_trip(root / "local-call", hidden_size=local["hidden_size"], rounds=200, warmup=20)
    overhead_ms = swarm["dispatch_ms"] - local["dispatch_ms"]
    report = BenchReport("swarm")
    report.results = {
        "model": str(model),
        "nodes": nodes,
        "generated_tokens": len(local["token_ids"]),
        "settings": f"{bus} bus, CurveZMQ data plane, Ed25519-signed records, SQLite logs (WAL, fsynced seq reservations), 1 torch thread per process",
        "local_tokens_per_s": local["tokens_per_s"],
        "swarm_tokens_per_s": swarm["tokens_per_s"],
        "swarm_request_ms": swarm["request_ms"],
        "moe_layers": local["moe_layers"],
        "local_dispatch_per_moe_layer_ms": local["dispatch_ms"],
        "swarm_dispatch_per_moe_layer_ms": swarm["dispatch_ms"],
        "dispatch_overhead_per_moe_layer_ms": overhead_ms,
        "raw_zmq_round_trip_median_ms": raw.median_us / 1000,
        "raw_zmq_round_trip_payload_bytes": payload,
        "signed_round_trip_median_ms": signed.median_us / 1000,
        "local_call_median_ms": in_process.median_us / 1000,
        "swarm_calls_per_moe_layer": swarm["calls_per_layer"],
        "swarm_call_ms": swarm["call_ms"],
        "swarm_serve_ms": swarm["serve_ms"],
        "tokens_identical": True,
    }
    report.goals = [
        Goal("swarm vs local tokens/s", swarm["tokens_per_s"] / local["tokens_per_s"], 0.5),
        Goal("dispatch overhead vs raw ZeroMQ round trip", overhead_ms / (raw.median_us / 1000), 3.0, higher_is_better=False),
    ]
    return report


def _measure_local(model: Path, tokens: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from cortex.runtime.engine import LocalModel, dispatch_experts
    from cortex.runtime.generation import generate_tokens

    tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    prompt_ids = list(tokenizer(PROMPT)["input_ids"])
    local = LocalModel.load(model, device="cpu", terminal=False)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    list(generate_tokens(local, prompt_ids, 4, eos_token_ids=eos))  # warm-up
    started = time.perf_counter()
    token_ids = list(generate_tokens(local, prompt_ids, tokens, eos_token_ids=eos))
    elapsed = time.perf_counter() - started

    # Time one token's local expert dispatch per MoE layer, as the swarm driver times its remote one.
    durations: list[float] = []
    original = local.run_block

    def timed_run_block(block: Any, session_id: str, hidden: Any) -> Any:
        from cortex.runtime.fragments import BlockOutput, MoeCall

        step = block.forward_until_moe(session_id, hidden)
        while isinstance(step, MoeCall):
            begun = time.perf_counter()
            outputs = dispatch_experts(step, local.experts_of(step.layer))
            if step.hidden.shape[0] == 1:
                durations.append(time.perf_counter() - begun)
            step = block.combine_and_continue(session_id, outputs)
        assert isinstance(step, BlockOutput)
        return step.hidden

    local.run_block = timed_run_block  # type: ignore[method-assign]
    list(generate_tokens(local, prompt_ids, tokens, eos_token_ids=eos))
    local.run_block = original  # type: ignore[method-assign]
    moe_layers = len({layer for block in local.blocks for layer in block.moe_layers})
    return {
        "token_ids": token_ids,
        "tokens_per_s": len(token_ids) / elapsed,
        "dispatch_ms": 1000 * sum(durations) / max(len(durations), 1),
        "moe_layers": moe_layers,
        "hidden_size": int(local.config.hidden_size),
    }


async def _measure_swarm(model: Path, root: Path, tokens: int, nodes: int, bus: str) -> dict[str, Any]:
    import orjson

    from cortex.node.client import SwarmClient
    from cortex.node.launcher import LocalSwarm, demo_layout
    from cortex.runtime.loader import Loader

    loader = Loader(model, device="cpu", terminal=False)
    layout = demo_layout(loader.num_layers, loader.moe_layers, loader.num_experts, nodes)
    swarm = LocalSwarm(root / "swarm", model, layout, backend=bus, log_level="WARNING")
    await swarm.start()
    try:
        client = SwarmClient(root / "client", swarm.client_transport_factory())
        await client.start()
        try:
            model_id = client.resolve_model(str(model))
            await client.wait_for_model(model_id, {f for fragments in layout for f in fragments}, 60.0)
            warm = await client.submit(model_id, PROMPT, 4)
            await client.run(warm, 120.0)
            submitted = time.perf_counter()
            request_id = await client.submit(model_id, PROMPT, tokens)
            result = await client.run(request_id, 300.0)
            request_ms = (time.perf_counter() - submitted) * 1000
        finally:
            await client.stop()
    finally:
        await swarm.stop()
    if result.completed is None:
        raise SystemExit(f"error: the swarm request failed: {result.failed}")
    if result.completed.degraded:
        # A degraded result comes from the driver's local fallback model: no swarm was measured.
        raise SystemExit(
            f"error: the request completed in degraded mode ({result.completed.degraded_reason}), so the swarm was not measured"
        )
    timings = result.completed.timings_ms
    statuses = [orjson.loads((node.data_dir / "node.status.json").read_bytes()) for node in swarm.nodes]
    router = next(iter(statuses[0]["router"].values()))
    driver = statuses[0]["dataplane"]
    served = [status["dataplane"] for status in statuses[1:]]
    shutil.rmtree(root / "swarm", ignore_errors=True)
    answered = driver.get("calls_sent", 0) - driver.get("call_timeouts", 0) - driver.get("call_errors", 0)
    calls_served = sum(counters.get("calls_served", 0) for counters in served)
    return {
        "token_ids": result.token_ids,
        "tokens_per_s": len(result.token_ids) / ((timings["prefill"] + timings["decode"]) / 1000),
        "request_ms": request_ms,
        "dispatch_ms": 1000 * router["single_token_dispatch_s"] / max(router["single_token_dispatches"], 1),
        # Every MoE layer of the warm-up and the measured request, prefill included.
        "calls_per_layer": driver.get("calls_sent", 0) / max(router["dispatches"], 1),
        "call_ms": 1000 * driver.get("call_s", 0.0) / max(answered, 1),
        "serve_ms": 1000 * sum(counters.get("serve_s", 0.0) for counters in served) / max(calls_served, 1),
    }
