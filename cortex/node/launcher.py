"""LocalSwarm: node processes on loopback, for `cortex demo`, the swarm tests and the bench.

Each node gets a data directory under `root`, a key made here (so its peer id is known in
advance), a config file, and runs `python -m cortex node start --config FILE` with stdout
and stderr in `<data_dir>/node.log`. libp2p nodes listen on free loopback ports and
bootstrap to every node started before them; with NATS, one `nats-server` is started here
and every node connects to it. `start()` waits until each node's status file says
`serving`; `stop()` sends SIGTERM and then SIGKILL to anything still running after
`STOP_TIMEOUT_S`, so no process outlives the swarm.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from cortex.node.config import BusSettings, DataPlaneSettings, ModelSettings, NodeConfig, config_to_yaml
from cortex.node.config_env import without_overrides
from cortex.node.lifecycle import STATUS_FILE_NAME, read_status
from events import Identity

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
JOIN_WAIT_S = 20.0


def demo_layout(num_layers: int, moe_layers: Sequence[int], num_experts: int, nodes: int, replicas: int = 2) -> list[list[str]]:
    """Return fragments per node: head and all blocks on node 0, experts over the others.

    Expert e of every MoE layer goes to `replicas` consecutive expert nodes starting at
    e modulo their count, so each expert node holds about replicas/count of the experts.
    A dense model, or a swarm of one node, puts everything on node 0.
    """
    layout: list[list[str]] = [["head", f"block[0:{num_layers}]"]] + [[] for _ in range(nodes - 1)]
    expert_nodes = nodes - 1
    if not moe_layers:
        return layout
    if expert_nodes == 0:
        layout[0] += [f"expert[{layer}][{index}]" for layer in moe_layers for index in range(num_experts)]
        return layout
    copies = min(replicas, expert_nodes)
    for layer in moe_layers:
        for index in range(num_experts):
            for copy in range(copies):
                layout[1 + (index + copy) % expert_nodes].append(f"expert[{layer}][{index}]")
    return layout


@dataclass
class SwarmNode:
    index: int
    data_dir: Path
    peer_id: str
    fragments: list[str]
    listen: str
    process: subprocess.Popen[bytes] | None = None
    status: dict[str, Any] | None = None

    @property
    def bootstrap_address(self) -> str:
        return f"{self.listen}/p2p/{self.peer_id}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "node.log"


class LocalSwarm:
    """Node processes for one model on loopback, started and stopped together."""

    def __init__(
        self,
        root: Path,
        model_dir: Path,
        layout: list[list[str]],
        backend: str = "libp2p",
        call_timeout_s: float = 10.0,
        log_level: str = "INFO",
        device: str = "cpu",
        dtype: str = "float32",
        kv_cache_budget_mb: float = 256.0,
    ) -> None:
        self.root = root
        self.model_dir = model_dir
        self.layout = layout
        self.backend = backend
        self.call_timeout_s = call_timeout_s
        self.log_level = log_level
        self.device = device
        self.dtype = dtype
        self.kv_cache_budget_mb = kv_cache_budget_mb
        self.nodes: list[SwarmNode] = []
        self.nats: Any = None

    async def start(self) -> None:
        """Start every node (node 0 first) and wait until all serve; stop them all on failure."""
        from cortex.bus.libp2p_transport import free_port_address

        self.root.mkdir(parents=True, exist_ok=True)
        if self.backend == "nats":
            from cortex.bus.nats_server import LocalNatsServer

            self.nats = LocalNatsServer(self.root / "nats")
            await self.nats.start()
        try:
            for index, fragments in enumerate(self.layout):
                data_dir = self.root / f"node{index}"
                identity = Identity.load_or_create(data_dir / "node.key")
                node = SwarmNode(index, data_dir, identity.peer_id, fragments, free_port_address(quic=False))
                self.nodes.append(node)
                self._spawn(node)
            for node in self.nodes:
                await self._wait_serving(node)
        except BaseException:
            await self.stop()
            raise

    def config_for(self, node: SwarmNode) -> NodeConfig:
        bus = BusSettings(
            backend=self.backend,
            listen=(node.listen,),
            bootstrap=tuple(other.bootstrap_address for other in self.nodes if other.index < node.index),
            nats_url=self.nats.url if self.nats is not None else None,
            # Nodes start together: every node but the first waits for a peer to sync with.
            join_wait_s=JOIN_WAIT_S if node.index else 0.0,
        )
        return NodeConfig(
            data_dir=node.data_dir,
            bus=bus,
            data_plane=DataPlaneSettings(call_timeout_s=self.call_timeout_s),
            models=(ModelSettings(path=self.model_dir, fragments=tuple(node.fragments)),),
            kv_cache_budget_mb=self.kv_cache_budget_mb,
            torch_threads=1,
            device=self.device,
            dtype=self.dtype,
            log_level=self.log_level,
        )

    def _spawn(self, node: SwarmNode) -> None:
        config_path = node.data_dir / "node.yaml"
        config_path.write_text(config_to_yaml(self.config_for(node)))
        (node.data_dir / STATUS_FILE_NAME).unlink(missing_ok=True)
        log = node.log_path.open("ab")
        # CORTEX_... config overrides are for the operator's own node, not for every node of this swarm.
        environment = {**without_overrides(os.environ), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        node.process = subprocess.Popen(
            [sys.executable, "-m", "cortex", "node", "start", "--config", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=environment,
        )
        log.close()

    async def _wait_serving(self, node: SwarmNode) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert node.process is not None
            if node.process.poll() is not None:
                tail = node.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"node {node.index} exited with status {node.process.returncode}; log tail:\n{tail}")
            status = read_status(node.data_dir)
            if status is not None and status.get("state") == "serving":
                node.status = status
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"node {node.index} did not serve within {START_TIMEOUT_S} s; see {node.log_path}")

    def kill(self, index: int) -> None:
        """SIGKILL node `index` (a crash: no PeerLeft, no drain)."""
        process = self.nodes[index].process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    async def stop(self) -> None:
        """SIGTERM every node, wait for each, SIGKILL stragglers, stop the NATS server."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for node in self.nodes:
            if node.process is None:
                continue
            while node.process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if node.process.poll() is None:
                logger.warning("node %d ignored SIGTERM for %s s; killing it", node.index, STOP_TIMEOUT_S)
                node.process.kill()
                node.process.wait()
        if self.nats is not None:
            await self.nats.stop()

    def client_transport_factory(self) -> Any:
        """Return a factory of bus transports for a SwarmClient that joins this swarm."""
        return transport_factory(self.backend, [node.bootstrap_address for node in self.nodes], self.nats.url if self.nats else None)


def transport_factory(backend: str, bootstrap: Sequence[str], nats_url: str | None) -> Any:
    """Return `factory(identity, data_dir) -> Transport` for a bus client."""

    def factory(identity: Identity, data_dir: Path) -> Any:
        if backend == "nats":
            from cortex.bus.nats_transport import NatsConfig, NatsTransport

            return NatsTransport(identity.peer_id, NatsConfig(url=nats_url, data_dir=data_dir / "nats"))
        from cortex.bus.libp2p_transport import Libp2pConfig, Libp2pTransport

        return Libp2pTransport(Libp2pConfig(key_pair=identity.to_libp2p_key_pair(), bootstrap=list(bootstrap)))

    return factory
