"""Replay rebuilds the views of live nodes: three node processes gossip over NATS, then stop.

Each node process (`python -m cortex.bus.testnode`) has its own log, Acceptor and Registry
view. After they converge, each one's live Registry digest (asked over its stdin) must equal
the digest that replaying its log file gives, and `cortex replay diff` finds their logs equal.
"""

from __future__ import annotations

import asyncio
import os
import selectors
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

    def __init__(self, data_dir: Path, nats_url: str) -> None:
        data_dir.mkdir(parents=True)
        self.data_dir = data_dir
        stderr = open(data_dir / "stderr.log", "wb")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cortex.bus.testnode", "--backend", "nats", "--nats-url", nats_url,
             "--data-dir", str(data_dir)],
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
    nodes = [Node(tmp_path / f"node{index}", nats_url) for index in range(NODES)]
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
