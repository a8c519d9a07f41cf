"""`cortex bench bus`: events/s accepted on every node of a swarm, and publish-to-accepted latency.

A swarm of `--nodes` node processes (`python -m cortex.bus.testnode`) runs on
loopback over the chosen backend with the settings a node uses. That means
libp2p with Noise (or NATS with a JetStream stream), Ed25519 verification of
every event, and SQLite logs in WAL mode with fsynced own events.

1. Ceiling: this process times the event core's accept path (decode, verify,
   append, fold into the Registry view) on one core, batch by batch, on 3,000
   pre-signed events, once before each throughput window. The best round counts.
2. Throughput: each node writes its own events (EventWriter, one fsync each)
   before the timed windows. In each of `--rounds` windows every node publishes
   `--events` of them at once, and the window ends when every node stores every
   node's events. The shortest window counts; nothing may be missing.
3. Latency: each node publishes `--latency-events` more at `--latency-rate`
   events/s; an event's latency runs from its publish call to its acceptance
   on the last other node.

Own events are written before the windows so that the windows measure the bus
(gossip, verification and acceptance on every node), not the writer's disk
syncs. `own_write_events_per_s` reports the writer's rate from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cortex.bench._common import BenchReport, Goal, add_common_arguments, emit

logger = logging.getLogger(__name__)

GOAL_RATIO = {"libp2p": 0.25, "nats": 0.50}
TRANSPORT_SECURITY = {"libp2p": "noise", "libp2p-quic": "tls 1.3 (quic)", "nats": "none (nats on loopback)"}
BACKEND_PROCESS = {"libp2p": "libp2p-tcp", "libp2p-quic": "libp2p-quic", "nats": "nats"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bus",
        help="events/s accepted on every node of a local swarm, latency p50/p99, vs the accept-path ceiling",
        description=(
            "Start a swarm of node processes on loopback, publish signed events and measure the rate "
            "at which every node accepts all of them, and publish-to-accepted-everywhere latency. The "
            "single-core accept-path rate of the event core, measured in the same run, is the ceiling. "
            "Goals: libp2p >= 25% of the ceiling, NATS >= 50%."
        ),
    )
    add_common_arguments(parser)
    parser.add_argument("--backend", choices=sorted(BACKEND_PROCESS), default="libp2p", help="bus backend (default: libp2p, TCP with Noise)")
    parser.add_argument("--nodes", type=int, default=3, help="node processes (default: 3)")
    parser.add_argument("--events", type=int, default=1500, help="events each node publishes in the throughput window (default: 1500)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput windows; the best one counts (default: 3)")
    parser.add_argument("--latency-events", type=int, default=200, help="events each node publishes in the latency phase (default: 200)")
    parser.add_argument("--latency-rate", type=float, default=20.0, help="events/s per node in the latency phase (default: 20)")
    parser.add_argument("--drop", type=float, default=0.0, help="share of inbound frames each node drops (default: 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.events = min(args.events, 400)
        args.latency_events = min(args.latency_events, 60)
        args.rounds = 1
    if args.nodes < 2 or min(args.events, args.latency_events, args.rounds) < 1 or args.latency_rate <= 0:
        raise SystemExit("--nodes must be at least 2; --events, --rounds, --latency-events and --latency-rate positive")
    report = BenchReport("bus")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cortex-bench-bus-") as directory:
        swarm = run_swarm(args, Path(directory))
    ceiling = swarm.pop("ceiling_accept_events_per_s")
    report.results.update(
        {
            "backend": args.backend,
            "transport_security": TRANSPORT_SECURITY[args.backend],
            "nodes": args.nodes,
            "events_per_node": args.events,
            **swarm,
            "ceiling_accept_events_per_s": ceiling,
            # Other processes on the machine slow the swarm and the ceiling alike, but not equally.
            "load_average_1m_before": load_before,
            "load_average_1m_after": os.getloadavg()[0],
        }
    )
    target = GOAL_RATIO["nats" if args.backend == "nats" else "libp2p"]
    if swarm["lost_events"] == 0:
        report.goals.append(Goal(f"{args.backend} swarm rate vs accept-path ceiling", swarm["swarm_events_per_s"] / ceiling, target))
    else:
        logger.error("%d events were still missing after repair; the rate goal is not reported", swarm["lost_events"])
    return emit(report, args.json)


def measure_accept_ceiling(count: int) -> float:
    """Time the event core's accept path on pre-signed events; return events/s on one core."""
    from cortex.registry import RegistryReducer
    from events import Acceptor, Identity, LogStore, PeerHeartbeat, Projection, ShardClaimed, sign_event

    authors = [Identity.generate() for _ in range(3)]
    wires = []
    for index in range(count):
        author = authors[index % len(authors)]
        seq = index // len(authors) + 1
        body = ShardClaimed(model_id="b" * 64, fragment=f"expert[{seq % 7}][{seq % 13}]", memory_bytes=seq) if seq % 2 else PeerHeartbeat(latest_seq=seq - 1)
        wires.append(sign_event(author, body, seq=seq, lamport=index + 1, time_ms=1_700_000_000_000 + index).wire)
    with tempfile.TemporaryDirectory(prefix="cortex-bench-ceiling-") as directory, LogStore(Path(directory) / "events.db") as store:
        acceptor = Acceptor(store, [Projection(RegistryReducer())])
        started = time.perf_counter()
        for start in range(0, count, 256):
            acceptor.accept_many(wires[start : start + 256])
        elapsed = time.perf_counter() - started
        if len(store) != count:
            raise RuntimeError(f"ceiling run accepted {len(store)} of {count} events")
    return count / elapsed


def run_swarm(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from cortex.bus.cluster import Cluster
    from cortex.bus.nats_server import LocalNatsServer

    server = None
    url = None
    if args.backend == "nats":
        server = LocalNatsServer(root / "nats")
        asyncio.run(server.start())
        url = server.url
    cluster = Cluster(
        BACKEND_PROCESS[args.backend], root / "swarm", args.nodes, args.drop, url,
        extra_arguments=("--record-accept-times", "--log-level", "WARNING"),
    )
    try:
        cluster.start_all(cluster.nodes)
        return _measure(cluster, args)
    finally:
        cluster.close()
        if server is not None:
            asyncio.run(server.stop())


def _measure(cluster: Any, args: argparse.Namespace) -> dict[str, Any]:
    nodes = cluster.nodes
    own_events = args.rounds * args.events + args.latency_events
    total_events = args.nodes * own_events
    write_seconds = _broadcast(nodes, f"prewrite {own_events}", "seconds")
    own_write_rate = own_events / max(write_seconds)

    # Best of several windows, each right after a ceiling round of the same length, so that
    # both figures see similar load from other processes on a shared machine.
    windows_s = []
    ceilings = []
    for round_index in range(1, args.rounds + 1):
        ceilings.append(measure_accept_ceiling(3000))
        started = min(_broadcast(nodes, f"blast {args.events}", "started_ns"))
        for node in nodes:
            # A node's log already contains all its own events, so count the peers' events on top.
            node.send(f"wait_count {own_events + round_index * (args.nodes - 1) * args.events}")
        reached = [node.read_reply(600.0)["reached_ns"] for node in nodes]
        windows_s.append((max(reached) - started) / 1e9)
    window_s = min(windows_s)

    published: dict[str, tuple[int, int]] = {}
    for index, node in enumerate(nodes):
        node.send(f"pace {args.latency_events} {args.latency_rate}")
    for index, node in enumerate(nodes):
        for event_id, ns in node.read_reply(600.0)["published_ns"].items():
            published[event_id] = (index, ns)
    for node in nodes:
        node.send(f"wait_count {total_events}")
    for node in nodes:
        node.read_reply(120.0)
    accepted = [node.command("accept_times")["accept_ns"] for node in nodes]
    latencies = _latencies_ms(published, accepted)

    statuses = [node.command("status") for node in nodes]
    lost = sum(total_events - status["events"] for status in statuses)
    digests = {status["ids_digest"] for status in statuses}
    stats = [status["stats"] for status in statuses]
    return {
        "swarm_events_per_s": args.nodes * args.events / window_s,
        "throughput_window_s": window_s,
        "throughput_rounds": args.rounds,
        "ceiling_accept_events_per_s": max(ceilings),
        "lost_events": lost if len(digests) == 1 else max(lost, 1),
        "latency_rate_per_node_events_per_s": args.latency_rate,
        "latency_p50_ms": statistics.quantiles(latencies, n=100)[49],
        "latency_p99_ms": statistics.quantiles(latencies, n=100)[98],
        "latency_samples": len(latencies),
        "own_write_events_per_s": own_write_rate,
        "frames_published": sum(stat.get("published_frames", 0) for stat in stats),
        "repaired_events": sum(stat.get("repaired_events", 0) for stat in stats),
        "drop_rate": args.drop,
    }


def _broadcast(nodes: list[Any], command: str, key: str) -> list[Any]:
    for node in nodes:
        node.send(command)
    return [node.read_reply(600.0)[key] for node in nodes]


def _latencies_ms(published: dict[str, tuple[int, int]], accepted: list[dict[str, int]]) -> list[float]:
    latencies = []
    for event_id, (publisher, published_ns) in published.items():
        times = [accept_ns[event_id] for index, accept_ns in enumerate(accepted) if index != publisher]
        if len(times) == len(accepted) - 1:
            latencies.append((max(times) - published_ns) / 1e6)
    return latencies
