"""PeerPenalized for rejected tensor frames: who is penalized, with what, and how often.

The rate limits run on a fake clock. The last test starts two real `cortex node start`
processes (no model) on loopback and sends bad frames to one of them with the other's key.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
import zmq
import zmq.asyncio
from comm_helpers import RecordSigner, build_call, expert_input

from cortex.bus.libp2p_transport import free_port_address
from cortex.comm import FrameReason, Rejection
from cortex.comm.frames import encode_header
from cortex.comm.penalties import BAD_FRAME, FramePenalties
from cortex.comm.sockets import configure_client
from cortex.comm.validation import curve_key_text
from cortex.node.config import BusSettings, NodeConfig, config_to_yaml
from cortex.quorum.events import PeerPenalized
from events import Identity

START_TIMEOUT_S = 90.0
# 48 bytes: 12 float32 values, read as 6 float64 ones, a dtype the data plane does not allow.
WRONG_DTYPE_BYTES = torch.arange(12.0).numpy().tobytes()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def peers() -> list[str]:
    return [Identity.generate().peer_id for _ in range(3)]


def _penalties(peers: list[str], clock: FakeClock, published: list[PeerPenalized], **limits: Any) -> FramePenalties:
    async def publish(body: PeerPenalized) -> None:
        published.append(body)

    return FramePenalties(peers[0], publish, lambda: peers, clock=clock, **limits)


async def test_identified_sender_is_penalized_with_evidence(peers: list[str]) -> None:
    published: list[PeerPenalized] = []
    penalties = _penalties(peers, FakeClock(), published)
    record_id = "cd" * 32

    penalties(Rejection(FrameReason.BAD_DIGEST, "digest differs", peers[1], curve_key_text(peers[1]), (record_id,)))
    # Identified by its CurveZMQ key alone, as a frame rejected before its records are read.
    penalties(Rejection(FrameReason.SHAPE_MISMATCH, "shape (4, 4) needs 64 bytes", None, curve_key_text(peers[2])))
    await penalties.wait_sent()

    assert [(body.peer, body.reason, body.evidence) for body in published] == [
        (peers[1], BAD_FRAME, (record_id,)),
        (peers[2], BAD_FRAME, ()),
    ]
    assert published[0].detail == "bad_digest: digest differs"
    assert published[1].detail.startswith("shape_mismatch: ")


async def test_unidentified_or_excused_rejections_are_only_counted(peers: list[str]) -> None:
    published: list[PeerPenalized] = []
    penalties = _penalties(peers, FakeClock(), published)
    stranger_key = Identity.generate().curve_public_key.decode()

    penalties(Rejection(FrameReason.TRUNCATED, "message has no header part", None, None))
    penalties(Rejection(FrameReason.MALFORMED, "bad header", None, stranger_key))
    penalties(Rejection(FrameReason.MALFORMED, "own frame", peers[0], curve_key_text(peers[0])))
    penalties(Rejection(FrameReason.UNKNOWN_REQUEST, "not known yet", peers[1], curve_key_text(peers[1])))
    await penalties.wait_sent()

    assert published == []
    assert penalties.counters == {"unidentified": 3, "not_published": 1}


async def test_flood_is_rate_limited(peers: list[str]) -> None:
    published: list[PeerPenalized] = []
    clock = FakeClock()
    penalties = _penalties(peers, clock, published, per_peer_interval_s=60.0, interval_s=60.0, max_per_interval=3)
    flood = Rejection(FrameReason.SHAPE_MISMATCH, "shape", peers[1], None)

    for _ in range(100):
        penalties(flood)
    penalties(Rejection(FrameReason.BAD_DTYPE, "float64", peers[1], None))
    penalties(Rejection(FrameReason.BAD_DTYPE, "float64", peers[2], None))
    penalties(Rejection(FrameReason.OVERSIZED, "4 GiB", peers[2], None))  # over the limit of 3 in all
    clock.now += 61.0
    penalties(flood)
    await penalties.wait_sent()

    assert [(body.peer, body.detail.split(":")[0]) for body in published] == [
        (peers[1], "shape_mismatch"),
        (peers[1], "bad_dtype"),
        (peers[2], "bad_dtype"),
        (peers[1], "shape_mismatch"),
    ]
    assert penalties.counters["suppressed"] == 100


async def test_failing_publish_is_counted(peers: list[str]) -> None:
    async def publish(body: PeerPenalized) -> None:
        raise RuntimeError("bus stopped")

    penalties = FramePenalties(peers[0], publish, lambda: peers)
    penalties(Rejection(FrameReason.BAD_DTYPE, "float64", peers[1], None))
    await penalties.wait_sent()

    assert penalties.counters["publish_failed"] == 1


# --- a real node ------------------------------------------------------------------


def _start_node(data_dir: Path, listen: str, bootstrap: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    # The first node has no peer to wait for; the second one joins as soon as it reaches the first.
    join_wait_s = 10.0 if bootstrap else 0.5
    config = NodeConfig(data_dir=data_dir, bus=BusSettings(listen=(listen,), bootstrap=bootstrap, join_wait_s=join_wait_s))
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "node.yaml").write_text(config_to_yaml(config))
    log = (data_dir / "node.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "cortex", "node", "start", "--config", str(data_dir / "node.yaml")],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
    )


def _wait_for(check: Any, description: str, process: subprocess.Popen[bytes], log: Path) -> Any:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{description} did not happen within {START_TIMEOUT_S} s; log tail: {log.read_text()[-2000:]}")


def _status(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / "node.status.json"
    status = orjson.loads(path.read_bytes()) if path.exists() else None
    return status if status and status["state"] == "serving" else None


def _log_rows(data_dir: Path, query: str, *parameters: Any) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(f"file:{data_dir / 'events.db'}?mode=ro", uri=True)
    try:
        return connection.execute(query, parameters).fetchall()
    except sqlite3.OperationalError:
        return []  # the node has not created its tables yet
    finally:
        connection.close()


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """Node A, and node B joined to it; yields A's and B's data dirs and A's process."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        listen_a = free_port_address(quic=False)
        peer_a = Identity.load_or_create(tmp_path / "a" / "node.key").peer_id
        processes.append(_start_node(tmp_path / "a", listen_a))
        _wait_for(lambda: _status(tmp_path / "a"), "node A serving", processes[0], tmp_path / "a" / "node.log")
        processes.append(_start_node(tmp_path / "b", free_port_address(quic=False), (f"{listen_a}/p2p/{peer_a}",)))
        peer_b = Identity.load_or_create(tmp_path / "b" / "node.key").peer_id
        _wait_for(
            lambda: _log_rows(tmp_path / "a", "SELECT 1 FROM events WHERE type = 'PeerJoined' AND author = ?", peer_b),
            "node B's PeerJoined in A's log",
            processes[0],
            tmp_path / "a" / "node.log",
        )
        yield tmp_path / "a", tmp_path / "b", processes[0]
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _send_bad_frames(endpoint: str, server_key: bytes, sender: Identity) -> None:
    """Send 40 frames whose shape does not match their bytes, 1 with a bad dtype, 1 truncated; read the replies."""
    signer = RecordSigner(sender)
    hidden = torch.arange(12.0).reshape(3, 4)
    wrong_dtype_body = expert_input("hidden", WRONG_DTYPE_BYTES, "float64", (3, 2))
    messages = [build_call(signer, call_id, {"hidden": hidden}, shape=(4, 4)) for call_id in range(40)]
    messages.append([encode_header("call", 40, kind="expert", chunks=[1]), signer.sign(wrong_dtype_body).wire, WRONG_DTYPE_BYTES])
    messages.append(build_call(signer, 41, {"hidden": hidden}, chunk_bytes=16)[:-1])
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.DEALER)
    configure_client(socket, sender, server_key)
    socket.connect(endpoint)
    try:
        for parts in messages:
            await socket.send_multipart(parts)
        async with asyncio.timeout(30):
            for _ in messages:
                await socket.recv_multipart()  # every bad call gets an error reply
    finally:
        socket.close(linger=0)
        context.term()


@pytest.mark.slow
def test_node_publishes_one_penalty_per_offence(two_nodes: tuple[Path, Path, subprocess.Popen[bytes]]) -> None:
    dir_a, dir_b, process_a = two_nodes
    status = _status(dir_a)
    assert status is not None
    node_a, node_b = Identity.load_or_create(dir_a / "node.key"), Identity.load_or_create(dir_b / "node.key")

    asyncio.run(_send_bad_frames(status["data_endpoint"], node_a.curve_public_key, node_b))

    query = "SELECT wire FROM events WHERE type = 'PeerPenalized' AND author = ?"
    _wait_for(lambda: len(_log_rows(dir_a, query, node_a.peer_id)) >= 3, "3 penalties in A's log", process_a, dir_a / "node.log")
    time.sleep(1.0)  # room for any extra penalty that should not come
    from events import parse_event

    bodies = [parse_event(wire).body for (wire,) in _log_rows(dir_a, query, node_a.peer_id)]
    assert sorted(body.detail.split(":")[0] for body in bodies) == ["bad_dtype", "shape_mismatch", "truncated"]
    assert {(body.peer, body.reason, body.evidence) for body in bodies} == {(node_b.peer_id, BAD_FRAME, ())}
    assert process_a.poll() is None  # the node kept serving through the flood
    # Node B heard the penalties over the bus, as every node does.
    _wait_for(lambda: len(_log_rows(dir_b, query, node_a.peer_id)) == 3, "penalties in B's log", process_a, dir_a / "node.log")
