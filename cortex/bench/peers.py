"""`cortex bench peers`: one MoE layer's top-2 expert dispatch, Cortex against hivemind.

Both systems serve the same 8 experts (256 -> 1024 -> 256 float32 feed-forward networks,
generated from one seed and loaded as identical tensors on both sides) from processes
separate from the client, on 127.0.0.1, and both route with the same router weights. The
bench times the whole layer (routing, dispatch, gather, weighted sum) for batches of 1 and
16 tokens, checks both systems' outputs against a computation in this process, and reports
the ratio hivemind ms / Cortex ms for 16 tokens.

- Cortex: `--servers` expert server processes on the data plane, with a node's settings on
  both ends: CurveZMQ, signed and verified records, and an fsynced SQLite log. The client
  groups tokens per expert with the TokenRouter (see `_peers_cortex`).
- hivemind: one `Server` with a `ModuleBackend` per expert and a `RemoteMixtureOfExperts`
  client, each in a process of the hivemind venv (see `_hivemind_side` and
  `_hivemind_venv`), with its NAT, relay and IPFS options off.

The servers of both systems start in parallel. The two systems are then timed in
alternating rounds of layer calls (see `_peers_rounds`), each while the other is idle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cortex.bench._common import BenchReport, Goal, add_common_arguments, emit
from cortex.bench._hivemind_venv import HivemindUnavailable, HivemindVenv, clean_environment, default_cache_dir
from cortex.bench._subprocesses import Child, ChildFailed, ChildProcesses

if TYPE_CHECKING:
    import torch

    from cortex.bench._peers_cortex import ExpertServer
    from cortex.bench._peers_rounds import HivemindClient, Measurement

logger = logging.getLogger(__name__)

EXPERTS = 8
HIDDEN_SIZE = 256
INTERMEDIATE_SIZE = 1024
TOP_K = 2
BATCH_SIZES = (1, 16)
GOAL_BATCH = 16
SPEEDUP_TARGET = 10.0
RTOL = 1e-5
ATOL = 1e-5
TORCH_THREADS = 1
READY_TIMEOUT_S = 120.0
# A hivemind server not serving this long before --ready-timeout-s prints its threads' stacks.
STACK_DUMP_MARGIN_S = 15.0
SERVER_START_FAILED = "server failed to start"
HIVEMIND_HANDLERS = 4
GOAL_NAME = "Cortex top-2 dispatch of 16 tokens vs hivemind (hivemind ms / Cortex ms)"


class PeersBenchError(RuntimeError):
    """The bench could not produce a valid comparison (a process failed, outputs differ)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "peers",
        help="top-2 MoE expert dispatch latency: Cortex's data plane against hivemind",
        description=(
            "Serve the same 8 experts (256 -> 1024 -> 256 float32 FFNs) with Cortex's data plane and with "
            "hivemind on 127.0.0.1, time one top-2 MoE layer for batches of 1 and 16 tokens, and check both "
            "outputs against a local computation. Goal: Cortex >= 10x faster than hivemind for 16 tokens. "
            "The first run builds hivemind's own venv (torch==2.13.0, then hivemind) under --cache-dir, "
            "which takes minutes; --skip-hivemind measures Cortex only."
        ),
    )
    add_common_arguments(parser)
    parser.add_argument("--skip-hivemind", action="store_true", help="measure Cortex only; the goal is left out")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="where the hivemind venv is cached (default: ~/.cache/cortex)"
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed layer calls per batch size (default: 30; 8 with --quick)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed layer calls per batch size first (default: 5; 2 with --quick)")
    parser.add_argument("--servers", type=int, default=2, help="Cortex expert server processes, experts spread round-robin (default: 2)")
    parser.add_argument(
        "--hivemind-handlers", type=int, default=HIVEMIND_HANDLERS, help="hivemind connection handler processes (default: 4)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the expert weights and tokens (default: 0)")
    parser.add_argument("--call-timeout-s", type=float, default=30.0, help="time limit of one expert call, both systems (default: 30)")
    parser.add_argument(
        "--ready-timeout-s", type=float, default=READY_TIMEOUT_S,
        help="time limit for each server and client to start, and a hivemind server that misses it is started once more (default: 120)",
    )  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repeats = 8 if args.quick and args.repeats == 30 else args.repeats
    warmup = 2 if args.quick and args.warmup == 5 else args.warmup
    if repeats < 1 or warmup < 0 or not 1 <= args.servers <= EXPERTS or args.hivemind_handlers < 1 or args.ready_timeout_s <= 0:
        raise SystemExit(
            f"invalid options: need --repeats >= 1, --warmup >= 0, 1 <= --servers <= {EXPERTS}, "
            f"--hivemind-handlers >= 1 and --ready-timeout-s > 0; got {repeats}, {warmup}, {args.servers}, "
            f"{args.hivemind_handlers} and {args.ready_timeout_s}"
        )
    import torch

    torch.set_num_threads(TORCH_THREADS)
    report = BenchReport("peers")
    load_before = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory(prefix="cortex-bench-peers-") as work:
            outcome = _compare(args, Path(work), repeats, warmup)
    except (PeersBenchError, ChildFailed) as error:
        print(f"cortex bench peers failed: {error}", file=sys.stderr)
        return 1
    report.results.update(outcome.results)
    report.results.update(_settings(args, repeats, warmup))
    # Other processes on the machine delay every wake-up of both systems' processes.
    report.results["load_average_1min_before"] = round(load_before, 2)
    report.results["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    if outcome.hivemind_reason is None:
        value = report.results[f"hivemind_batch_{GOAL_BATCH}_median_ms"] / report.results[f"cortex_batch_{GOAL_BATCH}_median_ms"]
        report.goals.append(Goal(GOAL_NAME, value, SPEEDUP_TARGET))
    else:
        print(f"goal '{GOAL_NAME}' left out: hivemind {outcome.hivemind_reason}", file=sys.stderr)
    return emit(report, args.json)


def _settings(args: argparse.Namespace, repeats: int, warmup: int) -> dict[str, Any]:
    return {
        "experts": EXPERTS,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "dtype": "float32",
        "top_k": TOP_K,
        "warmup_calls_per_batch": warmup,
        "timed_calls_per_batch": repeats,
        "seed": args.seed,
        "torch_threads_per_process": TORCH_THREADS,
        "output_tolerance": f"rtol={RTOL:g} atol={ATOL:g} against a local float32 computation",
        "cortex_expert_servers": args.servers,
        "cortex_settings": "CurveZMQ on 127.0.0.1; records signed and verified before a message leaves, appended to SQLite logs (WAL, fsynced seq reservations) right after",
        "hivemind_settings": (
            f"libp2p with TLS on 127.0.0.1; NAT traversal, relays, auto-relay and IPFS off; "
            f"{args.hivemind_handlers} connection handlers"
        ),
    }


class Outcome:
    """Figures measured by `_compare`, and the reason hivemind was not measured, if it was not."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self.hivemind_reason: str | None = None


def _compare(args: argparse.Namespace, work: Path, repeats: int, warmup: int) -> Outcome:
    import asyncio

    import torch

    from cortex.bench._peers_cortex import ExpertServer, reference_layer

    weights = make_weights(args.seed)
    inputs = make_inputs(args.seed)
    torch.save(weights, work / "weights.pt")
    torch.save(inputs, work / "inputs.pt")
    outcome = Outcome()
    with ChildProcesses(work) as children:
        hivemind_server = None
        if args.skip_hivemind:
            outcome.hivemind_reason = "was skipped (--skip-hivemind)"
        else:
            hivemind_server, outcome.hivemind_reason = _start_hivemind_server(args, children, work)
        cortex_servers = _start_cortex_servers(args, children, work)
        hivemind = None
        if hivemind_server is not None:
            hivemind, outcome.hivemind_reason = _start_hivemind_client(args, children, work, hivemind_server)
            if hivemind is None and outcome.hivemind_reason and outcome.hivemind_reason.startswith(SERVER_START_FAILED):
                # hivemind forks while its threads run, so a lock held at a fork can hang a start.
                # _hivemind_side.py avoids the one seen, and a new server does not inherit a hang.
                logger.warning("hivemind %s; starting a new hivemind server once", outcome.hivemind_reason)
                children.stop(hivemind_server)
                hivemind_server, outcome.hivemind_reason = _start_hivemind_server(args, children, work, "hivemind-server-retry")
                if hivemind_server is not None:
                    hivemind, outcome.hivemind_reason = _start_hivemind_client(args, children, work, hivemind_server)
        announced = [server.read_json("endpoint", args.ready_timeout_s) for server in cortex_servers]
        servers = [ExpertServer(item["peer_id"], item["endpoint"], tuple(item["experts"])) for item in announced]
        logger.info("all servers are ready; timing %s", "Cortex" if hivemind is None else "Cortex and hivemind")
        measurement = asyncio.run(_measure(args, servers, work, weights["router"], inputs, hivemind, repeats, warmup))
        if hivemind is not None and hivemind.failure is None:
            try:
                hivemind_settings, hivemind_outputs = hivemind.finish(work / "hivemind-outputs.pt")
            except (ChildFailed, BrokenPipeError, OSError) as error:
                hivemind.failure = f"client failed to finish: {error}"
        if hivemind is not None and hivemind.failure is not None:
            outcome.hivemind_reason, hivemind = hivemind.failure, None
        logger.info("timing done; stopping the servers")
    references = {name: reference_layer(weights, batch, TOP_K) for name, batch in inputs.items()}
    outcome.results.update(_summarize("cortex", measurement.cortex_times_ms))
    calls = measurement.cortex_calls_per_layer[str(GOAL_BATCH)]
    outcome.results[f"cortex_batch_{GOAL_BATCH}_data_plane_calls"] = calls
    outcome.results["cortex_max_abs_error"] = _check_outputs("Cortex", measurement.cortex_outputs, references)
    if hivemind is not None:
        outcome.results.update(_summarize("hivemind", measurement.hivemind_times_ms))
        outcome.results["hivemind_max_abs_error"] = _check_outputs("hivemind", hivemind_outputs, references)
        outcome.results["hivemind_version"] = hivemind_settings.get("hivemind_version", "unknown")
        outcome.results["hivemind_status"] = "measured"
    else:
        outcome.results["hivemind_status"] = f"not measured: hivemind {outcome.hivemind_reason}"
    return outcome


async def _measure(
    args: argparse.Namespace,
    servers: list[ExpertServer],
    work: Path,
    router: torch.Tensor,
    inputs: dict[str, torch.Tensor],
    hivemind: HivemindClient | None,
    repeats: int,
    warmup: int,
) -> Measurement:
    import asyncio

    from cortex.bench._peers_cortex import CortexMoeLayer
    from cortex.bench._peers_rounds import measure_alternating

    layer = CortexMoeLayer(router, servers, _request_id(work), args.call_timeout_s)
    await layer.start(work / "cortex-client")
    # Bounds the Cortex calls only: hivemind's replies have their own time limits.
    budget_s = (repeats + warmup) * len(BATCH_SIZES) * args.call_timeout_s
    try:
        async with asyncio.timeout(budget_s):
            return await measure_alternating(layer, hivemind, inputs, TOP_K, repeats, warmup)
    except TimeoutError:
        raise PeersBenchError(f"the layer calls did not finish within {budget_s:.0f} s") from None
    finally:
        await layer.close()


def make_weights(seed: int) -> dict[str, torch.Tensor]:
    """Generate the router [E, D] and each expert's tensors from `seed`.

    The scales keep outputs of order 1 and router logits far apart, which makes a near tie,
    where float32 rounding could change a token's experts, unlikely. The output check
    would report one as a mismatch.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    weights = {"router": torch.randn(EXPERTS, HIDDEN_SIZE, generator=generator) * 0.5}
    for expert in range(EXPERTS):
        weights[f"experts.{expert}.up.weight"] = torch.randn(INTERMEDIATE_SIZE, HIDDEN_SIZE, generator=generator) * 0.1
        weights[f"experts.{expert}.up.bias"] = torch.randn(INTERMEDIATE_SIZE, generator=generator) * 0.1
        weights[f"experts.{expert}.down.weight"] = torch.randn(HIDDEN_SIZE, INTERMEDIATE_SIZE, generator=generator) * 0.05
        weights[f"experts.{expert}.down.bias"] = torch.randn(HIDDEN_SIZE, generator=generator) * 0.1
    return weights


def make_inputs(seed: int) -> dict[str, torch.Tensor]:
    """Generate one batch of tokens [T, D] per batch size, keyed by T as text."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    return {str(size): torch.randn(size, HIDDEN_SIZE, generator=generator) for size in BATCH_SIZES}


def _start_hivemind_server(
    args: argparse.Namespace, children: ChildProcesses, work: Path, name: str = "hivemind-server"
) -> tuple[Child | None, str | None]:
    venv = _hivemind_venv(args)
    try:
        venv.ensure()
    except HivemindUnavailable as error:
        return None, f"could not be installed: {error}"
    argv = [
        str(venv.python), str(_hivemind_script()), "serve",
        "--weights", str(work / "weights.pt"),
        "--handlers", str(args.hivemind_handlers),
        "--threads", str(TORCH_THREADS),
        "--max-lifetime-s", str(_server_lifetime_s(args)),
        "--stack-dump-after-s", str(max(args.ready_timeout_s - STACK_DUMP_MARGIN_S, 1.0)),
    ]  # fmt: skip
    return children.start(name, argv, env=_hivemind_env()), None


def _start_hivemind_client(
    args: argparse.Namespace, children: ChildProcesses, work: Path, server: Child
) -> tuple[HivemindClient | None, str | None]:
    """Start the hivemind client, pass it the server's address once known, and wait until it is ready."""
    from cortex.bench._peers_rounds import HivemindClient

    argv = [
        str(_hivemind_venv(args).python), str(_hivemind_script()), "client",
        "--weights", str(work / "weights.pt"),
        "--inputs", str(work / "inputs.pt"),
        "--outputs", str(work / "hivemind-outputs.pt"),
        "--top-k", str(TOP_K),
        "--threads", str(TORCH_THREADS),
    ]  # fmt: skip
    child = children.start(f"{server.name}-client", argv, env=_hivemind_env())
    try:
        maddrs = server.read_json("maddrs", args.ready_timeout_s)["maddrs"]
    except ChildFailed as error:
        children.stop(child)
        return None, f"{SERVER_START_FAILED}: {error}"
    try:
        child.send_line(json.dumps({"peers": maddrs}))
        child.read_json("ready", args.ready_timeout_s)
    except (ChildFailed, BrokenPipeError) as error:
        return None, f"client failed to start: {error}"
    return HivemindClient(child, args.call_timeout_s), None


def _start_cortex_servers(args: argparse.Namespace, children: ChildProcesses, work: Path) -> list[Child]:
    servers = []
    for index in range(args.servers):
        experts = ",".join(str(expert) for expert in range(index, EXPERTS, args.servers))
        argv = [
            sys.executable, "-m", "cortex.bench._peers_cortex", "serve",
            "--weights", str(work / "weights.pt"),
            "--experts", experts,
            "--data-dir", str(work / f"cortex-server-{index}"),
            "--request-id", _request_id(work),
            "--threads", str(TORCH_THREADS),
            "--handler-timeout-s", str(args.call_timeout_s),
            "--max-lifetime-s", str(_server_lifetime_s(args)),
        ]  # fmt: skip
        servers.append(children.start(f"cortex-server-{index}", argv))
    return servers


def _server_lifetime_s(args: argparse.Namespace) -> float:
    """Return a time limit for servers that outlasts any bench run that keeps making progress.

    Servers stop when the bench closes their stdin, which also happens when the bench dies.
    The limit only covers a bench that hangs without dying.
    """
    calls = (args.repeats + args.warmup) * len(BATCH_SIZES)
    return 3 * args.ready_timeout_s + calls * args.call_timeout_s


def _request_id(work: Path) -> str:
    """Return the run's request id, the one id the expert servers accept."""
    path = work / "request-id"
    if not path.exists():
        path.write_text(secrets.token_hex(32), encoding="utf-8")
    return path.read_text(encoding="utf-8")


def _summarize(system: str, times_ms: dict[str, list[float]]) -> dict[str, float]:
    """Median and 90th percentile ms per batch size, and tokens/s at the median."""
    import statistics

    figures: dict[str, float] = {}
    for size in BATCH_SIZES:
        samples = sorted(times_ms[str(size)])
        median = statistics.median(samples)
        figures[f"{system}_batch_{size}_median_ms"] = median
        figures[f"{system}_batch_{size}_p90_ms"] = samples[min(len(samples) - 1, int(0.9 * len(samples)))]
        figures[f"{system}_batch_{size}_tokens_per_s"] = size * 1000.0 / median
    return figures


def _check_outputs(system: str, outputs: dict[str, Any], references: dict[str, Any]) -> float:
    """Return the largest absolute difference from the reference; raise PeersBenchError past tolerance."""
    import torch

    worst = 0.0
    for name, reference in references.items():
        output = outputs[name]
        if tuple(output.shape) != tuple(reference.shape):
            raise PeersBenchError(f"{system} output for {name} tokens has shape {tuple(output.shape)}, expected {tuple(reference.shape)}")
        difference = float((output - reference).abs().max())
        if not torch.allclose(output, reference, rtol=RTOL, atol=ATOL):
            raise PeersBenchError(
                f"{system} output for {name} tokens differs from the local computation by up to {difference:.3g} "
                f"(tolerance rtol={RTOL:g} atol={ATOL:g}); its timings are not comparable"
            )
        worst = max(worst, difference)
    return worst


def _hivemind_venv(args: argparse.Namespace) -> HivemindVenv:
    return HivemindVenv((args.cache_dir or default_cache_dir()) / "hivemind-venv")


def _hivemind_script() -> Path:
    return Path(__file__).with_name("_hivemind_side.py")


def _hivemind_env() -> dict[str, str]:
    env = clean_environment()
    env["HIVEMIND_LOGLEVEL"] = "WARNING"
    return env
