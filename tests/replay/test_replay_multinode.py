"""Replay and tail against real node processes on a bus.

Replay rebuilds the views of live nodes: three node processes gossip over NATS, then stop.
Each node process (`python -m cortex.bus.testnode`) has its own log, Acceptor and Registry
view. After they converge, each one's live Registry digest (asked over its stdin) must equal
the digest that replaying its log file gives, and `cortex replay diff` finds their logs equal.
`cortex tail --bus` prints what a node publishes, over NATS and over libp2p gossipsub.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import run_cli

from replay.fold import Folder
from replay.reader import LogReader
from replay.views import load_view, view_digest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

EVENTS_PER_NODE = 60
NODES = 3


class Node:
    """One test node process driven line by line."""

    def __init__(self, data_dir: Path, arguments: list[str]) -> None:
        data_dir.mkdir(parents=True)
        self.data_dir = data_dir
        stderr = open(data_dir / "stderr.log", "wb")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cortex.bus.testnode", "--data-dir", str(data_dir), *arguments],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        )
        stderr.close()
        self._buffer = b""

    def command(self, line: str | None, timeout: float = 60.0) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        if line is not None:
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise TimeoutError(f"no reply to {line!r}: {(self.data_dir / 'stderr.log').read_text()[-2000:]}")
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    raise EOFError(f"node exited: {(self.data_dir / 'stderr.log').read_text()[-2000:]}")
                self._buffer += chunk
        reply, self._buffer = self._buffer.split(b"\n", 1)
        return orjson.loads(reply)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    from cortex.bus.nats_server import LocalNatsServer

    server = LocalNatsServer(tmp_path / "nats")
    asyncio.run(server.start())
    try:
        yield server.url
    finally:
        asyncio.run(server.stop())


def test_replayed_digests_equal_live_node_views(tmp_path: Path, nats_url: str) -> None:
    nodes = [Node(tmp_path / f"node{index}", ["--backend", "nats", "--nats-url", nats_url]) for index in range(NODES)]
    try:
        for node in nodes:
            assert node.command(None)["ready"]
        for node in nodes:
            assert node.command(f"publish {EVENTS_PER_NODE}") == {"published": EVENTS_PER_NODE}
        deadline = time.monotonic() + 90
        while True:
            statuses = [node.command("status") for node in nodes]
            if all(status["events"] == NODES * EVENTS_PER_NODE for status in statuses):
                break
            assert time.monotonic() < deadline, [status["events"] for status in statuses]
            time.sleep(0.5)
        for node in nodes:
            assert node.command("stop")["stopped"]
            assert node.process.wait(30) == 0
    finally:
        for node in nodes:
            node.kill()

    registry = load_view("registry")
    for node, status in zip(nodes, statuses):
        with LogReader(node.data_dir) as reader:
            folder = Folder(reader, [registry])
            assert folder.run() == NODES * EVENTS_PER_NODE
            assert view_digest(folder.view("registry")) == status["registry_digest"], node.data_dir
    assert len({status["registry_digest"] for status in statuses}) == 1
    diff = run_cli("replay", "diff", str(nodes[0].data_dir), str(nodes[2].data_dir), "--json")
    assert diff.status == 0, diff.stdout
    verify = run_cli("replay", str(nodes[1].data_dir), "--verify", "--json")
    assert verify.status == 0, verify.stdout[:2000]


def test_tail_bus_prints_live_events(tmp_path: Path, nats_url: str) -> None:
    node = Node(tmp_path / "node", ["--backend", "nats", "--nats-url", nats_url])
    tail = None
    try:
        assert node.command(None)["ready"]
        tail = subprocess.Popen(
            [sys.executable, "-m", "cortex", "tail", "--bus", nats_url, "--json", "--duration", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert tail.stderr is not None and tail.stdout is not None
        expect_following(tail)
        assert node.command("publish 25") == {"published": 25}
        received = [orjson.loads(tail.stdout.readline()) for _ in range(25)]
        tail.send_signal(signal.SIGINT)
        assert tail.wait(30) == 0
        assert node.command("stop")["stopped"]
        assert node.process.wait(30) == 0
    finally:
        node.kill()
        if tail is not None and tail.poll() is None:
            tail.kill()
            tail.wait(10)
    with LogReader(node.data_dir) as reader:
        stored = {event.id: event.seq for event in reader.canonical()}
    assert [record["seq"] for record in received] == list(range(1, 26))
    assert all(stored[record["id"]] == record["seq"] for record in received)
    assert received[0]["type"] == "PeerJoined"


def expect_following(tail: subprocess.Popen[str]) -> None:
    """Wait for the tail's ready line on stderr; on anything else, fail with its whole stderr."""
    assert tail.stderr is not None
    line = tail.stderr.readline()
    if not line.startswith("following the bus at"):
        tail.kill()
        raise AssertionError(line + tail.stderr.read())


class LineReader:
    """Lines of a child's stdout pipe with a timeout (select on the raw fd, no hidden buffer)."""

    def __init__(self, stream: Any) -> None:
        self._fd = stream.fileno()
        self._buffer = b""

    def read_line(self, timeout: float) -> str | None:
        """Return the next line, or None if none completes within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self._fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    return None
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    return None
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


def test_tail_bus_over_libp2p(tmp_path: Path) -> None:
    from cortex.bus.libp2p_transport import free_port_address

    address = free_port_address(quic=False)
    node = Node(tmp_path / "node", ["--backend", "libp2p-tcp", "--listen", address])
    tail = None
    try:
        ready = node.command(None)
        tail = subprocess.Popen(
            [sys.executable, "-m", "cortex", "tail", "--bus", f"{address}/p2p/{ready['peer_id']}", "--json",
             "--duration", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert tail.stderr is not None and tail.stdout is not None
        expect_following(tail)
        lines = LineReader(tail.stdout)
        # Gossipsub adds the listener to its mesh within a heartbeat: publish until it hears one.
        published = 0
        heard = None
        while heard is None and published < 60:
            assert node.command("publish 1") == {"published": 1}
            published += 1
            heard = lines.read_line(1.0)
        assert heard, f"the tail heard nothing in {published} publishes"
        assert node.command("publish 10") == {"published": 10}
        # In normal operation the bus loses no frame, so all ten reach the listener.
        expected = set(range(published + 1, published + 11))
        seen = {orjson.loads(heard)["seq"]}
        while not expected <= seen:
            line = lines.read_line(30.0)
            assert line, f"missing seqs {sorted(expected - seen)}"
            seen.add(orjson.loads(line)["seq"])
        assert seen <= set(range(1, published + 11))
        tail.send_signal(signal.SIGINT)
        assert tail.wait(30) == 0
    finally:
        if tail is not None and tail.poll() is None:
            tail.kill()
            tail.wait(10)
        node.kill()
