"""A bus node for tests and benches: log store, acceptance, Registry view and bus in one process.

`BusNode` wires the event core to a GossipBus over any transport. Run as
`python -m cortex.bus.testnode`, it is the node process of the multi-process
bus tests: it prints one JSON line when ready and then serves commands read
line by line from stdin, and replies to each with one JSON line on stdout:

    publish N         write and publish N events (a PeerJoined first, then shard
                      events with a heartbeat every 50); returns {"published": N}
    forge VICTIM      publish one event that claims VICTIM as author but is signed
                      with this node's key; returns {"forged": 1}
    status            returns counts, digests of the event-id set and the Registry view
    count             returns {"events": events in the log}
    repair            runs one repair pass now; returns {"repaired": accepted events}
    prewrite N        write N events to the log without publishing them (for benches)
    blast N           publish N prewritten events at once; returns {"started_ns": ...}
    pace N RATE       publish N prewritten events at RATE events/s; returns each one's
                      publish time in ns by event id
    wait_count N      returns {"reached_ns": ...} once the log holds N events
    accept_times      returns the time in ns each event from a peer was accepted, by id
                      (recorded only with --record-accept-times)
    stop              stops the bus and exits

stderr carries the log.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from cortex.bus.bus import BusConfig, GossipBus
from cortex.bus.frames import encode_events
from cortex.bus.transport import FaultInjector, Transport
from cortex.registry import RegistryReducer, RegistryView
from events import (
    Acceptor,
    Event,
    EventWriter,
    Identity,
    LogStore,
    PeerHeartbeat,
    PeerJoined,
    Projection,
    ShardClaimed,
    ShardLoaded,
    ShardReleased,
)

logger = logging.getLogger(__name__)

BACKENDS = ("memory", "libp2p-tcp", "libp2p-quic", "nats")
MODEL_ID = "b" * 64


class BusNode:
    """A node's log store, acceptance path, Registry view and writer around one GossipBus."""

    def __init__(self, data_dir: Path, transport: Transport, config: BusConfig, identity: Identity) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.identity = identity
        self.store = LogStore(data_dir / "events.db")
        self.registry: Projection[RegistryView] = Projection(RegistryReducer())
        self.acceptor = Acceptor(self.store, [self.registry], own_peer_id=identity.peer_id)
        self.writer = EventWriter(identity, self.acceptor)
        self.bus = GossipBus(transport, self.acceptor, config)
        self.prewritten: list[Event] = []
        self.accept_times: dict[str, int] | None = None
        self._count_waiters: list[tuple[int, asyncio.Future[int]]] = []
        self.bus.add_listener(self._on_accepted)

    def _on_accepted(self, events: list[Event]) -> None:
        now = time.time_ns()
        if self.accept_times is not None:
            for event in events:
                self.accept_times[event.id] = now
        if self._count_waiters:
            count = len(self.store)
            for target, future in list(self._count_waiters):
                if count >= target and not future.done():
                    future.set_result(now)
                    self._count_waiters.remove((target, future))

    async def wait_count(self, target: int) -> int:
        """Wait until the log contains `target` events; return that moment as time.time_ns()."""
        if len(self.store) >= target:
            return time.time_ns()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._count_waiters.append((target, future))
        return await future

    def prewrite(self, count: int) -> None:
        """Write `count` events to the log now and keep them for a later `blast` or `pace`."""
        for _ in range(count):
            self.prewritten.append(self.writer.write(self._next_body()))

    async def blast(self, count: int) -> None:
        events, self.prewritten = self.prewritten[:count], self.prewritten[count:]
        for event in events:
            await self.bus.publish(event)
        await self.bus.flush()

    async def pace(self, count: int, rate: float) -> dict[str, int]:
        events, self.prewritten = self.prewritten[:count], self.prewritten[count:]
        loop = asyncio.get_running_loop()
        started = loop.time()
        published: dict[str, int] = {}
        for index, event in enumerate(events):
            delay = started + index / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            published[event.id] = time.time_ns()
            await self.bus.publish(event)
        await self.bus.flush()
        return published

    async def start(self) -> None:
        await self.bus.start()
        if self.writer.skipped is not None:
            # After an unclean stop in an earlier boot the writer voided a seq range; tell peers.
            await self.bus.publish(self.writer.skipped)

    async def stop(self) -> None:
        await self.bus.stop()
        self.writer.close()
        self.store.close()

    async def emit(self, body: Any) -> Event:
        event = self.writer.write(body)
        await self.bus.publish(event)
        return event

    async def publish_many(self, count: int) -> None:
        """Write and publish `count` events that change the Registry view."""
        for _ in range(count):
            await self.emit(self._next_body())
            # Each write blocks the loop for an fsync; yield so received frames are processed too.
            await asyncio.sleep(0)

    def _next_body(self) -> Any:
        seq = self.writer.last_seq + 1
        if seq == 1:
            return PeerJoined(
                bus_addresses=tuple(getattr(self.bus.transport, "listen_addresses", [])),
                data_endpoint="tcp://127.0.0.1:1",
                curve_public_key=self.identity.curve_public_key.decode(),
                hardware={"cpus": 2},
                protocol_version="1.0",
                software_version="test",
            )
        if seq % 50 == 0:
            return PeerHeartbeat(latest_seq=seq - 1)
        fragment = f"expert[{seq % 7}][{seq % 13}]"
        if seq % 3 == 0:
            return ShardClaimed(model_id=MODEL_ID, fragment=fragment, memory_bytes=seq)
        if seq % 3 == 1:
            return ShardLoaded(model_id=MODEL_ID, fragment=fragment, memory_bytes=seq)
        return ShardReleased(model_id=MODEL_ID, fragment=fragment, reason="test")

    def forged_wire(self, victim: str) -> bytes:
        """Return an event that names `victim` as author but carries this node's signature."""
        payload = orjson.dumps(
            {"author": victim, "body": {"latest_seq": 999_999}, "lamport": 1, "refs": [], "seq": 1_000_000,
             "time_ms": 0, "type": "PeerHeartbeat", "version": "1.0"},
            option=orjson.OPT_SORT_KEYS,
        )
        return payload + self.identity.sign(payload)

    def status(self) -> dict[str, Any]:
        ids = sorted(event.id for event in self.store.events())
        return {
            "peer_id": self.identity.peer_id,
            "events": len(ids),
            "ids_digest": hashlib.blake2b("\n".join(ids).encode(), digest_size=16).hexdigest(),
            "registry_digest": self.registry.view.digest(),
            "heads": self.bus.local_heads(),
            "rejected": dict(self.acceptor.counters),
            "stats": self.bus.stats(),
        }


def build_transport(args: argparse.Namespace, identity: Identity, faults: FaultInjector | None) -> Transport:
    if args.backend.startswith("libp2p"):
        from cortex.bus.libp2p_transport import Libp2pConfig, Libp2pTransport

        quic = args.backend == "libp2p-quic"
        listen = [args.listen] if args.listen else None
        key_pair = identity.to_libp2p_key_pair()
        config = Libp2pConfig.for_quic(key_pair) if quic else Libp2pConfig(key_pair=key_pair)
        if listen:
            config.listen = listen
        config.bootstrap = list(args.bootstrap)
        return Libp2pTransport(config, faults)
    if args.backend == "nats":
        from cortex.bus.nats_transport import NatsConfig, NatsTransport

        return NatsTransport(identity.peer_id, NatsConfig(url=args.nats_url, data_dir=args.data_dir), faults)
    raise SystemExit(f"backend {args.backend!r} cannot run in a separate process; use one of {BACKENDS[1:]}")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cortex.bus.testnode", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS[1:], required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--listen", help="libp2p listen multiaddr (default: a free loopback port)")
    parser.add_argument("--bootstrap", action="append", default=[], help="libp2p multiaddr with /p2p/ID to dial")
    parser.add_argument("--nats-url", help="NATS server URL (default: start a local nats-server)")
    parser.add_argument("--drop", type=float, default=0.0, help="share of inbound gossip frames to drop")
    parser.add_argument(
        "--join-mode", choices=["full", "live"], default="full",
        help="join sync at start (default: full, so every node ends with the same event set)",
    )
    parser.add_argument("--rate-per-s", type=float, default=BusConfig.rate_per_s)
    parser.add_argument("--record-accept-times", action="store_true", help="record when each peer event was accepted")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    identity = Identity.load_or_create(args.data_dir / "node.key")
    faults = FaultInjector(drop_rate=args.drop) if args.drop else None
    config = BusConfig(join_mode=args.join_mode, rate_per_s=args.rate_per_s, state_path=args.data_dir / "bus-state.json")
    node = BusNode(args.data_dir, build_transport(args, identity, faults), config, identity)
    if args.record_accept_times:
        node.accept_times = {}
    await node.start()
    reply({"ready": True, "peer_id": identity.peer_id, "addresses": getattr(node.bus.transport, "listen_addresses", [])})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        command, _, argument = line.partition(" ")
        if command == "stop":
            break
        reply(await run_command(node, command, argument))
    await node.stop()
    reply({"stopped": True, "threads": sorted(thread.name for thread in threading.enumerate())})


async def run_command(node: BusNode, command: str, argument: str) -> dict[str, Any]:
    if command == "publish":
        await node.publish_many(int(argument))
        await node.bus.flush()
        return {"published": int(argument)}
    if command == "forge":
        await node.bus.transport.publish(node.bus.config.topic, encode_events([node.forged_wire(argument)]))
        return {"forged": 1}
    if command == "status":
        return node.status()
    if command == "count":
        return {"events": len(node.store)}
    if command == "repair":
        return {"repaired": await node.bus.repair()}
    if command == "prewrite":
        started = time.perf_counter()
        node.prewrite(int(argument))
        return {"prewritten": int(argument), "seconds": time.perf_counter() - started}
    if command == "blast":
        started_ns = time.time_ns()
        await node.blast(int(argument))
        return {"started_ns": started_ns}
    if command == "pace":
        count, rate = argument.split()
        return {"published_ns": await node.pace(int(count), float(rate))}
    if command == "wait_count":
        return {"reached_ns": await node.wait_count(int(argument))}
    if command == "accept_times":
        return {"accept_ns": node.accept_times or {}}
    return {"error": f"unknown command {command!r}"}


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(message).decode() + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
