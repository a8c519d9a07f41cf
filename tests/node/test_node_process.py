"""`cortex node start|stop` as real processes: join, stop, and the refusals at start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import cortex.scheduler  # noqa: F401 - registers the request event types
from cortex.bus.libp2p_transport import free_port_address
from cortex.node.claims import fragment_sizes
from cortex.node.config import BusSettings, ModelSettings, NodeConfig, config_to_yaml
from cortex.runtime.loader import Loader
from events import Identity, LogStore

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 90.0
MIB = 1024 * 1024


def _write_config(data_dir: Path, listen: str, bootstrap: tuple[str, ...] = (), identity: Path | None = None) -> Path:
    config = NodeConfig(data_dir=data_dir, identity=identity, bus=BusSettings(listen=(listen,), bootstrap=bootstrap, join_wait_s=10.0))
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "node.yaml"
    path.write_text(config_to_yaml(config))
    return path


def _start(config: Path, environment: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log = (config.parent / "node.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "cortex", "node", "start", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(environment or {})},
    )


def _wait_serving(data_dir: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    status = data_dir / "node.status.json"
    while time.monotonic() < deadline:
        assert process.poll() is None, (data_dir / "node.log").read_text()[-2000:]
        if status.exists() and orjson.loads(status.read_bytes())["state"] == "serving":
            return
        time.sleep(0.1)
    raise AssertionError(f"node in {data_dir} did not serve within {START_TIMEOUT_S} s")


@pytest.fixture
def first_node(tmp_path: Path) -> Iterator[tuple[Path, str, subprocess.Popen[bytes]]]:
    data_dir = tmp_path / "first"
    listen = free_port_address(quic=False)
    peer_id = Identity.load_or_create(data_dir / "node.key").peer_id
    process = _start(_write_config(data_dir, listen))
    try:
        _wait_serving(data_dir, process)
        yield data_dir, f"{listen}/p2p/{peer_id}", process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_node_stop_drains_and_leaves(first_node: tuple[Path, str, subprocess.Popen[bytes]]) -> None:
    data_dir, _, process = first_node

    stop = subprocess.run(
        [sys.executable, "-m", "cortex", "node", "stop", "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60
    )

    assert stop.returncode == 0, stop.stderr
    assert process.wait(timeout=60) == 0
    assert not (data_dir / "node.pid").exists()
    store = LogStore(data_dir / "events.db")
    try:
        types = [event.type for event in store.events()]
    finally:
        store.close()
    assert types[0] == "PeerJoined"
    assert types[-1] == "PeerLeft"


def test_second_node_same_data_dir_rejected(first_node: tuple[Path, str, subprocess.Popen[bytes]]) -> None:
    data_dir, _, _ = first_node

    second = subprocess.run(
        [sys.executable, "-m", "cortex", "node", "start", "--config", str(data_dir / "node.yaml")],
        capture_output=True, text=True, timeout=120,
    )

    assert second.returncode == 1
    assert "already runs from" in second.stderr


def test_copied_identity_rejected(first_node: tuple[Path, str, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    data_dir, bootstrap, first = first_node
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy2(data_dir / "node.key", twin / "node.key")
    config = _write_config(twin, free_port_address(quic=False), (bootstrap,))

    result = subprocess.run(
        [sys.executable, "-m", "cortex", "node", "start", "--config", str(config)], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 1
    assert "another live node signs with this node's key" in result.stderr
    assert first.poll() is None


def test_incompatible_protocol_rejected(first_node: tuple[Path, str, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    _, bootstrap, first = first_node
    newcomer = tmp_path / "newcomer"
    config = _write_config(newcomer, free_port_address(quic=False), (bootstrap,))

    result = subprocess.run(
        [sys.executable, "-m", "cortex", "node", "start", "--config", str(config)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "CORTEX_PROTOCOL_VERSION": "2.0"},
    )

    assert result.returncode == 1
    assert "speaks protocol 1.0, this node speaks 2.0" in result.stderr
    assert first.poll() is None


def test_auto_claims_fill_gaps_first(checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    folder = checkpoint("deepseek_v3")
    sizes = fragment_sizes(Loader(folder, device="cpu"))
    experts = sorted((f for f in sizes if f.startswith("expert")), key=lambda f: [int(n) for n in f[7:-1].split("][")])
    # The first node has room for the head, the blocks and half of the experts (in layer and
    # index order), the second for the other half: it must take exactly the gaps.
    half = len(experts) // 2
    first_budget = (sizes["head"] + sizes["block[0:3]"] + sum(sizes[e] for e in experts[:half])) / MIB
    second_budget = sum(sizes[e] for e in experts[half:]) / MIB
    processes = []
    try:
        first_dir = tmp_path / "first"
        first_listen = free_port_address(quic=False)
        first_id = Identity.load_or_create(first_dir / "node.key").peer_id
        processes.append(_start(_write_auto_config(first_dir, first_listen, (), folder, first_budget)))
        _wait_serving(first_dir, processes[0])
        second_dir = tmp_path / "second"
        bootstrap = (f"{first_listen}/p2p/{first_id}",)
        processes.append(_start(_write_auto_config(second_dir, free_port_address(quic=False), bootstrap, folder, second_budget)))
        _wait_serving(second_dir, processes[1])
        first = set(next(iter(_status(first_dir)["models"].values())))
        second = set(next(iter(_status(second_dir)["models"].values())))
    finally:
        for process in processes:
            process.kill()
            process.wait()

    assert first == {"head", "block[0:3]", *experts[:half]}
    assert second == set(experts[half:])


def _write_auto_config(data_dir: Path, listen: str, bootstrap: tuple[str, ...], model: Path, budget_mb: float) -> Path:
    config = NodeConfig(
        data_dir=data_dir,
        bus=BusSettings(listen=(listen,), bootstrap=bootstrap, join_wait_s=10.0),
        models=(ModelSettings(path=model, memory_budget_mb=budget_mb),),
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "node.yaml"
    path.write_text(config_to_yaml(config))
    return path


def _status(data_dir: Path) -> dict[str, Any]:
    status: dict[str, Any] = orjson.loads((data_dir / "node.status.json").read_bytes())
    return status
