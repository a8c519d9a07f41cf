"""A cluster of `python -m cortex.bus.testnode` processes on loopback, driven over stdin/stdout.

Used by the multi-process bus tests and by `cortex bench bus`. Every process
is killed by `Cluster.close()`, whatever state it is in.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from cortex.bus.libp2p_transport import free_port_address
from events import Identity

REPLY_TIMEOUT_S = 120.0


class NodeProcess:
    """One test node process: start it, send it commands, stop or kill it."""

    def __init__(self, name: str, data_dir: Path, arguments: list[str]) -> None:
        self.name = name
        self.data_dir = data_dir
        self.arguments = arguments
        self.process: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self._buffer = b""

    def start(self) -> dict[str, Any]:
        self.spawn()
        return self.wait_ready()

    def spawn(self) -> None:
        stderr = open(self.data_dir / "stderr.log", "ab")  # noqa: SIM115 - the child owns it
        command = [sys.executable, "-m", "cortex.bus.testnode", "--data-dir", str(self.data_dir), *self.arguments]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        stderr.close()
        self._buffer = b""

    def wait_ready(self) -> dict[str, Any]:
        self.ready = self.read_reply(60.0)
        assert self.ready.get("ready"), f"{self.name} did not start: {self.ready} ({self.stderr_tail()})"
        return self.ready

    def send(self, line: str) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def command(self, line: str, timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        self.send(line)
        return self.read_reply(timeout)

    def read_reply(self, timeout: float) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        stdout = self.process.stdout
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise TimeoutError(f"{self.name}: no reply within {timeout} s ({self.stderr_tail()})")
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    raise EOFError(f"{self.name} exited with {self.process.poll()} ({self.stderr_tail()})")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply: dict[str, Any] = orjson.loads(line)
        return reply

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        reply = self.command("stop", timeout)
        assert self.process is not None
        self.process.wait(timeout)
        return reply

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stderr_tail(self) -> str:
        path = self.data_dir / "stderr.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


class Cluster:
    """Node processes of one backend; every libp2p node dials every other (and redials)."""

    def __init__(
        self,
        backend: str,
        root: Path,
        size: int,
        drop: float,
        nats_url: str | None = None,
        extra_arguments: tuple[str, ...] = ("--log-level", "INFO"),
    ) -> None:
        self.backend = backend
        self.nodes: list[NodeProcess] = []
        peer_ids: list[str] = []
        addresses: list[str] = []
        for index in range(size):
            data_dir = root / f"node{index}"
            data_dir.mkdir(parents=True)
            peer_ids.append(Identity.load_or_create(data_dir / "node.key").peer_id)
            addresses.append(free_port_address(quic=backend == "libp2p-quic"))
        for index in range(size):
            arguments = ["--backend", backend, "--drop", str(drop), *extra_arguments]
            if backend.startswith("libp2p"):
                arguments += ["--listen", addresses[index]]
                for other in range(size):
                    if other != index:
                        arguments += ["--bootstrap", f"{addresses[other]}/p2p/{peer_ids[other]}"]
            else:
                assert nats_url is not None
                arguments += ["--nats-url", nats_url]
            self.nodes.append(NodeProcess(f"node{index}", root / f"node{index}", arguments))
        self.peer_ids = peer_ids
        self.addresses = [f"{address}/p2p/{peer_id}" for address, peer_id in zip(addresses, peer_ids)]

    def start_all(self, nodes: list[NodeProcess]) -> None:
        """Start processes in parallel, since each spends seconds importing libp2p."""
        for node in nodes:
            node.spawn()
        for node in nodes:
            node.wait_ready()

    def publish_all(self, nodes: list[NodeProcess], count: int) -> None:
        for node in nodes:
            node.send(f"publish {count}")
        for node in nodes:
            reply = node.read_reply(REPLY_TIMEOUT_S)
            assert reply == {"published": count}, reply

    def wait_converged(self, nodes: list[NodeProcess], expected: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            statuses = [node.command("status") for node in nodes]
            if all(status["events"] == expected for status in statuses):
                return statuses
            if time.monotonic() > deadline:
                counts = {node.name: status["events"] for node, status in zip(nodes, statuses)}
                raise TimeoutError(f"not converged on {expected} events within {timeout} s: {counts}")
            time.sleep(0.5)

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
