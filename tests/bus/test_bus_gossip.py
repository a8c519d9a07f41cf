"""GossipBus over the in-memory transport: batching, repair, admission and join."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cortex.bus.admission import Admission
from cortex.bus.bus import BusConfig, peek_author
from cortex.bus.memory import MemoryNetwork, MemoryTransport
from cortex.bus.testnode import BusNode
from cortex.bus.transport import FaultInjector
from events import Identity, PeerHeartbeat, sign_event

pytestmark = pytest.mark.timeout(120)

# Full joins, so that every node ends with the same event set; the live join has its own test.
FAST = {"heads_interval_s": 0.1, "repair_interval_s": 0.1, "join_wait_s": 0.5, "join_mode": "full"}


def make_node(
    network: MemoryNetwork, root: Path, name: str, drop: float = 0.0, **settings: object
) -> BusNode:
    identity = Identity.load_or_create(root / name / "node.key") if (root / name).exists() else None
    if identity is None:
        (root / name).mkdir(parents=True)
        identity = Identity.load_or_create(root / name / "node.key")
    faults = FaultInjector(drop_rate=drop, seed=len(name)) if drop else None
    config = BusConfig(**{**FAST, "state_path": root / name / "bus-state.json", **settings})  # type: ignore[arg-type]
    return BusNode(root / name, MemoryTransport(network, identity.peer_id, faults), config, identity)


async def converge(nodes: list[BusNode], expected_events: int, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while True:
            statuses = [node.status() for node in nodes]
            if all(status["events"] == expected_events for status in statuses):
                return
            await asyncio.sleep(0.1)


async def test_nodes_converge_despite_drops(tmp_path: Path) -> None:
    network = MemoryNetwork()
    nodes = [make_node(network, tmp_path, f"n{index}", drop=0.2) for index in range(3)]
    for node in nodes:
        await node.start()
    await asyncio.gather(*(node.publish_many(300) for node in nodes))
    await converge(nodes, 900)
    statuses = [node.status() for node in nodes]
    assert len({status["ids_digest"] for status in statuses}) == 1
    assert len({status["registry_digest"] for status in statuses}) == 1
    assert sum(node.bus.counters["repaired_events"] for node in nodes) > 0
    for node in nodes:
        await node.stop()


async def test_events_batched_into_frames(tmp_path: Path) -> None:
    network = MemoryNetwork()
    sender, receiver = make_node(network, tmp_path, "sender"), make_node(network, tmp_path, "receiver")
    await sender.start()
    await receiver.start()
    sender.prewrite(200)
    await sender.blast(200)
    await converge([receiver], 200)
    # 200 events of about 400 bytes fit in one frame of at most 256 KiB.
    assert sender.bus.counters["published_frames"] == 1
    assert receiver.bus.counters["received_frames"] >= 1
    await sender.stop()
    await receiver.stop()


async def test_late_joiner_catches_up(tmp_path: Path) -> None:
    network = MemoryNetwork()
    first = make_node(network, tmp_path, "first")
    await first.start()
    await first.publish_many(250)
    late = make_node(network, tmp_path, "late", join_mode="full")
    await late.start()
    # The join sync ran inside start(), before any new gossip.
    assert late.status()["events"] == 250
    assert late.status()["registry_digest"] == first.status()["registry_digest"]
    await first.stop()
    await late.stop()


async def test_live_join_skips_old_heartbeats(tmp_path: Path) -> None:
    network = MemoryNetwork()
    first = make_node(network, tmp_path, "first")
    await first.start()
    await first.publish_many(250)  # heartbeats at seq 50, 100, ..., 250
    late = make_node(network, tmp_path, "late", join_mode="live")
    await late.start()
    heartbeats = [event for event in late.store.events() if isinstance(event.body, PeerHeartbeat)]
    assert [event.seq for event in heartbeats] == [250]
    assert late.status()["events"] == 250 - 4
    assert late.status()["registry_digest"] == first.status()["registry_digest"]
    # The floor keeps repair from chasing the skipped heartbeats.
    assert late.bus.missing() == {}
    assert await late.bus.repair() == 0
    await first.stop()
    await late.stop()


async def test_restarted_node_catches_up(tmp_path: Path) -> None:
    network = MemoryNetwork()
    stable = make_node(network, tmp_path, "stable")
    restarted = make_node(network, tmp_path, "restarted")
    await stable.start()
    await restarted.start()
    await restarted.publish_many(40)
    await converge([stable], 40)
    await restarted.stop()
    await stable.publish_many(60)
    restarted = make_node(network, tmp_path, "restarted")
    await restarted.start()
    assert restarted.writer.last_seq == 40
    await converge([restarted, stable], 100)
    assert restarted.status()["ids_digest"] == stable.status()["ids_digest"]
    await stable.stop()
    await restarted.stop()


async def test_forged_event_rejected_others_accepted(tmp_path: Path) -> None:
    network = MemoryNetwork()
    honest, forger, receiver = (make_node(network, tmp_path, name) for name in ("honest", "forger", "receiver"))
    for node in (honest, forger, receiver):
        await node.start()
    await honest.publish_many(10)
    from cortex.bus.frames import encode_events

    await forger.bus.transport.publish("events", encode_events([forger.forged_wire(honest.identity.peer_id)]))
    await honest.publish_many(10)
    await converge([receiver], 20)
    assert receiver.acceptor.counters["bad_signature"] == 1
    assert receiver.bus.rejected_by_sender == {forger.identity.peer_id: 1}
    assert receiver.bus.local_heads() == {honest.identity.peer_id: 20}
    for node in (honest, forger, receiver):
        await node.stop()


async def test_flooder_throttled_others_unaffected(tmp_path: Path) -> None:
    network = MemoryNetwork()
    settings = {"rate_per_s": 50.0, "rate_burst": 100.0, "repair_interval_s": 10.0}
    flooder = make_node(network, tmp_path, "flooder", **settings)
    quiet = make_node(network, tmp_path, "quiet", **settings)
    receiver = make_node(network, tmp_path, "receiver", **settings)
    # A frozen clock: no refill, so the receiver admits exactly the burst of each author.
    receiver.bus.admission = Admission(50.0, 100.0, clock=lambda: 0.0)
    for node in (flooder, quiet, receiver):
        await node.start()
    await flooder.publish_many(1000)
    await quiet.publish_many(30)
    await flooder.bus.flush()
    await quiet.bus.flush()
    async with asyncio.timeout(10):
        while receiver.bus.local_heads().get(quiet.identity.peer_id) != 30:
            await asyncio.sleep(0.05)
    flooder_accepted = len(list(receiver.store.wires(author=flooder.identity.peer_id)))
    assert flooder_accepted == 100
    assert receiver.bus.admission.throttled[flooder.identity.peer_id] > 0
    assert receiver.bus.admission.throttled[quiet.identity.peer_id] == 0
    for node in (flooder, quiet, receiver):
        await node.stop()


async def test_allowlist_rejects_outsiders(tmp_path: Path) -> None:
    network = MemoryNetwork()
    (tmp_path / "member").mkdir()
    (tmp_path / "outsider").mkdir()
    member_id = Identity.load_or_create(tmp_path / "member" / "node.key").peer_id
    outsider = make_node(network, tmp_path, "outsider")
    member = make_node(network, tmp_path, "member")
    guarded = make_node(network, tmp_path, "guarded", allowlist=frozenset({member_id}))
    for node in (outsider, member, guarded):
        await node.start()
    await outsider.publish_many(5)
    await member.publish_many(5)
    await converge([guarded], 5)
    assert guarded.bus.local_heads() == {member_id: 5}
    assert guarded.bus.admission.not_allowed[outsider.identity.peer_id] == 5
    from cortex.bus.errors import SyncError
    from cortex.bus.sync import SyncClient

    with pytest.raises(SyncError, match="not_allowed"):
        await SyncClient(outsider.bus.transport, 5).heads(guarded.identity.peer_id)
    for node in (outsider, member, guarded):
        await node.stop()


def test_peek_author_reads_first_key() -> None:
    identity = Identity.generate()
    from events import sign_event

    event = sign_event(identity, PeerHeartbeat(latest_seq=0), seq=1, lamport=1, time_ms=0)
    assert peek_author(event.wire) == identity.peer_id
    assert peek_author(b'{"body":{}}') is None


async def test_lacks_events_of_gap_author(tmp_path: Path) -> None:
    receiver = make_node(MemoryNetwork(), tmp_path, "receiver")
    author, other = Identity.generate(), Identity.generate()
    events = [sign_event(author, PeerHeartbeat(seq - 1), seq=seq, lamport=seq, time_ms=1_000 + seq) for seq in range(1, 4)]

    receiver.bus.ingest([events[0].wire, events[2].wire], author.peer_id)

    assert receiver.bus.lacks_events_of(author.peer_id)
    assert not receiver.bus.lacks_events_of(other.peer_id)
    receiver.bus.ingest([events[1].wire], author.peer_id)
    assert not receiver.bus.lacks_events_of(author.peer_id)
