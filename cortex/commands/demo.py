"""`cortex demo`: a local swarm of node processes answers one prompt, and every process stops after."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = "Return the number of items in the"


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sampling flags shared with `cortex generate`."""
    parser.add_argument("--max-tokens", type=int, default=32, help="maximum number of new tokens (default: 32)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 picks the most likely token (default: 0)"
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="sample only from the most likely tokens holding this much probability (default: 1.0)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling, so a run can be repeated")
    parser.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop before this text; repeat for several"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a local swarm of node processes and answer one prompt with it",
        description=(
            "Start N node processes on loopback (node 0: head and blocks; the others: the routed experts, two "
            "replicas each), submit a prompt, stream the answer, print which node served what and how long each "
            "phase took, then stop every process it started."
        ),
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the text to continue (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder to serve instead of the demo model")
    parser.add_argument("--nodes", type=int, default=4, help="number of node processes, at least 1 (default: 4)")
    parser.add_argument("--bus", choices=["libp2p", "nats"], default="libp2p", help="gossip bus backend (default: libp2p)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary object at the end instead of text")
    parser.add_argument("--keep", action="store_true", help="keep the swarm's data directories (logs, event logs) after the run")
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        print(f"error: --nodes must be at least 1, got {args.nodes}", file=sys.stderr)
        return 2
    if args.max_tokens < 1:
        print(f"error: --max-tokens must be at least 1, got {args.max_tokens}", file=sys.stderr)
        return 2
    from cortex.commands.generate import _model_dir, swarm_prompt_problem

    folder = _model_dir(args.model)
    if folder is None:
        return 2
    from cortex.driver.takeover import TAKEOVER_READERS

    # Checked before any process starts. The prompt is sealed to the client, the driver and the next drivers.
    problem = swarm_prompt_problem(folder, args.prompt, args.max_tokens, readers=2 + min(args.nodes - 1, TAKEOVER_READERS))
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    import asyncio

    from cortex.node.client import ClientError

    try:
        summary = asyncio.run(_run_demo(args, folder.resolve()))
    except (ClientError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0 if summary.get("failed") is None else 1


async def _run_demo(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    import shutil
    import tempfile
    import time

    from cortex.node.client import SwarmClient
    from cortex.node.launcher import LocalSwarm, demo_layout
    from cortex.runtime.loader import Loader

    loader = Loader(folder, device="cpu", terminal=False)
    layout = demo_layout(loader.num_layers, loader.moe_layers, loader.num_experts, args.nodes)
    root = Path(tempfile.mkdtemp(prefix="cortex-demo-"))
    swarm = LocalSwarm(root, folder, layout, backend=args.bus)
    timings: dict[str, float] = {}
    _note(args, f"starting {args.nodes} node(s) on loopback ({args.bus} bus) in {root}")
    started = time.monotonic()
    try:
        await swarm.start()
        timings["swarm_start_ms"] = (time.monotonic() - started) * 1000
        _note(args, f"swarm serving after {timings['swarm_start_ms'] / 1000:.1f} s")
        client = SwarmClient(root / "client", swarm.client_transport_factory())
        await client.start()
        try:
            model_id = client.resolve_model(str(folder))
            await client.wait_for_model(model_id, {f for fragments in layout for f in fragments}, 60.0)
            submitted = time.monotonic()
            request_id = await client.submit(
                model_id, args.prompt, args.max_tokens, args.temperature, args.top_p, args.seed, args.stop
            )
            if not args.json:
                sys.stdout.write(args.prompt)
                sys.stdout.flush()
            result = await client.run(request_id, 600.0, None if args.json else _write)
            timings["request_ms"] = (time.monotonic() - submitted) * 1000
        finally:
            await client.stop()
    finally:
        await swarm.stop()
    summary = _summary(swarm, result, model_id, timings)
    _print_summary(args, summary)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return summary


def _summary(swarm: Any, result: Any, model_id: str, timings: dict[str, float]) -> dict[str, Any]:
    from cortex.node.report import expert_records, served_rows

    served = served_rows(expert_records(swarm.nodes[0].data_dir, {result.request_id}))
    nodes = []
    for node in swarm.nodes:
        rows = served.get(node.peer_id, {})
        nodes.append({
            "node": node.index,
            "peer_id": node.peer_id,
            "pid": node.process.pid if node.process is not None else None,
            "fragments": node.fragments,
            "driver": node.peer_id == result.driver,
            "expert_rows_served": rows.get("rows", 0),
            "expert_calls_served": rows.get("calls", 0),
        })
    completed = result.completed
    request_timings = dict(completed.timings_ms) if completed is not None else {}
    return {
        "model_id": model_id,
        "request_id": result.request_id,
        "text": result.text,
        "token_ids": result.token_ids,
        "driver": result.driver,
        "route": result.route,
        "nodes": nodes,
        "timings_ms": {**{k: round(v, 1) for k, v in timings.items()}, **request_timings},
        "degraded": bool(completed.degraded) if completed is not None else False,
        "degraded_reason": completed.degraded_reason if completed is not None else "",
        "finish_reason": completed.finish_reason if completed is not None else None,
        "failed": None if result.failed is None else {"reason": result.failed.reason_code, "message": result.failed.message},
    }


def _print_summary(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    import orjson

    if args.json:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
        return
    sys.stdout.write("\n\n")
    for node in summary["nodes"]:
        fragments = [f for f in node["fragments"] if not f.startswith("expert")]
        experts = len(node["fragments"]) - len(fragments)
        held = ", ".join(fragments + ([f"{experts} experts"] if experts else []))
        role = " (driver)" if node["driver"] else ""
        served = f", served {node['expert_rows_served']} expert rows in {node['expert_calls_served']} calls" if experts else ""
        print(f"node {node['node']} {node['peer_id'][-8:]}{role}: {held}{served}")
    phases = ", ".join(f"{name.removesuffix('_ms')} {value / 1000:.2f} s" for name, value in summary["timings_ms"].items())
    print(f"timings: {phases}")
    if summary["degraded"]:
        print(f"degraded: answered by the driver's fallback model, not the swarm ({summary['degraded_reason']})")
    if summary["failed"] is not None:
        print(f"request failed ({summary['failed']['reason']}): {summary['failed']['message']}", file=sys.stderr)


def _note(args: argparse.Namespace, message: str) -> None:
    print(message, file=sys.stderr)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
