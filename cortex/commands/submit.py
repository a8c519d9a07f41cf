"""`cortex submit`: send a prompt to a running swarm and stream the answer."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from cortex.commands.demo import add_sampling_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="send a prompt to a running swarm and stream the answer",
        description=(
            "Join the swarm's bus as a client (a fresh identity), publish a RequestSubmitted with the prompt sealed "
            "to the model's head holders, and stream the TokenGenerated text. Give the bus with --config (a node "
            "config whose bus settings are used), --bootstrap or --nats-url; with none of them, the node of "
            "$CORTEX_HOME/config.yaml (default ~/.cortex/config.yaml) is used. CORTEX_... environment variables "
            "override the config's keys, as for `cortex node start`."
        ),
    )
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--model", required=True, help="model name or id announced in the swarm, or a checkpoint folder")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--config", type=Path,
        help="a node config file: its bus backend and addresses are used (default: $CORTEX_HOME/config.yaml, "
        "else ~/.cortex/config.yaml, when neither --bootstrap nor --nats-url is given)",
    )
    where.add_argument("--bootstrap", action="append", help="libp2p multiaddr with /p2p/<peer id> of a swarm node; repeatable")
    where.add_argument("--nats-url", help="URL of the swarm's NATS server")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the request to finish (default: 300)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with token ids, text, route and timings")
    parser.add_argument(
        "--deadline", type=deadline_seconds, default=0.0, metavar="SECONDS",
        help="let the driver generate with its fallback model (degraded) if no token arrives within this time; "
        "0 means no deadline, and a positive value is rounded to whole milliseconds, at least 1 (default: none)",
    )
    parser.add_argument(
        "--redundancy", type=int, default=1, choices=range(1, 9), metavar="R",
        help="send each expert call to R replicas (1 to 8) and use the output a strict majority agrees on (default: 1)",
    )
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)


def deadline_seconds(text: str) -> float:
    """Parse --deadline: a finite number of seconds, 0 (no deadline) or positive."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid deadline {text!r}: give a number of seconds, such as 2.5") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(
            f"invalid deadline {text!r}: give 0 for no deadline or a positive number of seconds, such as 2.5"
        )
    return seconds


def deadline_ms(seconds: float) -> int:
    """Convert a --deadline in seconds to the event's milliseconds, where 0 means no deadline.

    A positive deadline below half a millisecond would round to 0 and so silently mean no
    deadline, so every positive deadline becomes at least 1 ms.
    """
    if seconds <= 0:
        return 0
    return max(1, round(seconds * 1000))


def run(args: argparse.Namespace) -> int:
    import asyncio
    import os
    import tempfile

    from cortex.node.client import ClientError, SwarmClient
    from cortex.node.config import ConfigError, load_config
    from cortex.node.launcher import transport_factory

    config = None
    if args.config is None and not args.bootstrap and not args.nats_url:
        from cortex.node.home import default_config_path

        args.config = default_config_path()
        if not args.config.is_file():
            print(
                f"error: no --config, --bootstrap or --nats-url given and {args.config} does not exist; run "
                "`cortex init` and start a node, or pass --bootstrap or --nats-url",
                file=sys.stderr,
            )
            return 2
    if args.config is not None:
        try:
            config = load_config(args.config, environ=os.environ)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        from cortex.node.lifecycle import read_status

        status = read_status(config.data_dir)
        if status is not None and status.get("state") == "bus_failed" and config.fallback_model is not None:
            return _answer_locally(args, config.fallback_model, f"bus_unavailable: the node's bus could not start ({status.get('bus_error')})")
        settings = _bus_of_node(config, args.config)
        if isinstance(settings, str):
            print(f"error: {settings}", file=sys.stderr)
            return 2
        factory = transport_factory(*settings)
    elif args.nats_url:
        factory = transport_factory("nats", [], args.nats_url)
    else:
        factory = transport_factory("libp2p", list(args.bootstrap), None)

    async def submit() -> int:
        with tempfile.TemporaryDirectory(prefix="cortex-submit-") as folder:
            client = SwarmClient(Path(folder), factory)
            await client.start()
            try:
                model_id = await _wait_for_model(client, args.model)
                request_id = await client.submit(
                    model_id, args.prompt, args.max_tokens, args.temperature, args.top_p, args.seed, args.stop,
                    deadline_ms=deadline_ms(args.deadline), redundancy=args.redundancy,
                )
                print(f"request {request_id}", file=sys.stderr, flush=True)
                on_text = None if args.json else _write
                result = await client.run(request_id, args.timeout, on_text)
            finally:
                await client.stop()
            quorum = quorum_summary(Path(folder), request_id) if args.json else None
        return _report(result, args.json, quorum)

    from cortex.bus.errors import BusError
    from events.errors import IdentityError

    try:
        return asyncio.run(submit())
    except BusError as error:
        if config is not None and config.fallback_model is not None:
            return _answer_locally(args, config.fallback_model, f"bus_unavailable: this client's bus could not start ({error})")
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ClientError, IdentityError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the request may still run in the swarm", file=sys.stderr)
        return 130


def _bus_of_node(config: Any, config_path: Path) -> tuple[str, list[str], str | None] | str:
    """Return (backend, bootstrap, NATS URL) to reach the node of `config`, or the problem.

    The config's bootstrap list names the node's peers, not the node, and a node with its own
    NATS server has no URL in its config, so the running node's status file supplies both.
    """
    from cortex.node.lifecycle import STATUS_FILE_NAME, read_status

    bus = config.bus
    bootstrap = list(bus.bootstrap)
    nats_url = bus.nats_url
    status_path = config.data_dir / STATUS_FILE_NAME
    status = read_status(config.data_dir)
    if status is None or status.get("state") != "serving":
        if (bus.backend == "nats" and nats_url) or (bus.backend == "libp2p" and bootstrap):
            return bus.backend, bootstrap, nats_url
        return (
            f"the node of {config_path} is not serving ({status_path} is missing or not 'serving'); "
            "start it with `cortex node start --config` or pass --bootstrap or --nats-url"
        )
    if bus.backend == "libp2p":
        for address in status.get("bus_addresses", []):
            peer = f"/p2p/{status['peer_id']}"
            bootstrap.append(address if address.endswith(peer) else address + peer)
    elif nats_url is None:
        nats_url = status.get("nats_url")
    return bus.backend, bootstrap, nats_url


async def _wait_for_model(client: object, model: str) -> str:
    """Resolve `model` and wait for a head holder; with none, go on if a fallback driver is live."""
    import asyncio
    import time

    from cortex.driver.takeover import request_drivers
    from cortex.node.client import ClientError, SwarmClient
    from events import wall_clock_ms

    assert isinstance(client, SwarmClient)
    deadline = time.monotonic() + 30.0
    model_id: str | None = None
    while True:
        try:
            model_id = client.resolve_model(model)
            await client.wait_for_model(model_id, {"head"}, min(max(deadline - time.monotonic(), 0.1), 5.0))
            return model_id
        except ClientError:
            # A request id only reorders drivers, so any id shows whether some peer can drive the request.
            if model_id is not None and request_drivers(client.registry.view, model_id, "0" * 64, wall_clock_ms()):
                return model_id
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def quorum_summary(client_dir: Path, request_id: str) -> dict[str, Any] | None:
    """Summarize the `QuorumDecided` events of a request that the client's log received, or None.

    Quorum events are gossiped to the whole swarm, so the client's log contains those that
    arrived before it stopped, and decisions published after that are missing from the counts.
    """
    # Importing cortex.quorum registers its event types, so stored decisions decode to QuorumDecided.
    from cortex.quorum import QuorumDecided
    from replay.reader import EventFilter, LogReader

    with LogReader(client_dir) as reader:
        bodies = [event.body for event in reader.canonical(EventFilter(types=("QuorumDecided",), request=request_id))]
    decisions = [body for body in bodies if isinstance(body, QuorumDecided) and body.request_id == request_id]
    if not decisions:
        return None
    quorums = sorted({body.quorum for body in decisions})
    return {
        "decisions": len(decisions),
        "quorums_used": quorums,
        "no_quorum": sum(body.outcome == "no_quorum" for body in decisions),
        "dissenting_peers": sorted({peer for body in decisions for peer in body.dissenting}),
    }


def _report(result: object, as_json: bool, quorum: dict[str, Any] | None = None) -> int:
    import orjson

    from cortex.node.client import RequestResult

    assert isinstance(result, RequestResult)
    if as_json:
        record = {
            "request_id": result.request_id,
            "driver": result.driver,
            "route": result.route,
            "token_ids": result.token_ids,
            "text": result.text,
            "completed": None if result.completed is None else {
                "finish_reason": result.completed.finish_reason,
                "timings_ms": result.completed.timings_ms,
                "degraded": result.completed.degraded,
                "degraded_reason": result.completed.degraded_reason,
            },
            "failed": None if result.failed is None else {"reason": result.failed.reason_code, "message": result.failed.message},
            "quorum": quorum,
        }
        sys.stdout.write(orjson.dumps(record).decode() + "\n")
    else:
        sys.stdout.write("\n")
    # The same stderr line in text and --json mode, as for the bus_unavailable path below.
    if result.completed is not None and result.completed.degraded:
        print(
            f"degraded: the swarm could not serve this request, so node {result.driver[-8:]} answered with its "
            f"fallback model ({result.completed.degraded_reason})",
            file=sys.stderr,
        )
    if result.failed is not None:
        print(f"error: request failed ({result.failed.reason_code}): {result.failed.message}", file=sys.stderr)
        return 1
    return 0


def _answer_locally(args: argparse.Namespace, fallback: Path, reason: str) -> int:
    """Generate the reply with the config's fallback model in this process, marked degraded, because the swarm cannot be reached."""
    import orjson

    from cortex.driver.fallback import answer_locally
    from cortex.runtime.generation import SamplingSettings

    print(f"degraded: the swarm cannot be reached, so the fallback model {fallback} generates the reply in this process ({reason})", file=sys.stderr)
    settings = SamplingSettings(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    result = answer_locally(fallback, args.prompt, args.max_tokens, settings, args.stop, None if args.json else _write)
    if args.json:
        record = {
            "request_id": None,
            "driver": "local",
            "route": {},
            "token_ids": result.generated_ids,
            "text": result.text,
            "completed": {
                "finish_reason": {"eos": "eos", "stop": "stop"}.get(result.stop_reason, "length"),
                "timings_ms": {},
                "degraded": True,
                "degraded_reason": reason,
            },
            "failed": None,
            "quorum": None,
        }
        sys.stdout.write(orjson.dumps(record).decode() + "\n")
    else:
        sys.stdout.write("\n")
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
