"""`cortex submit --config` reaches the running node of that config, also a swarm's first node."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

DEMO_MODEL = Path(__file__).resolve().parents[2] / "cortex" / "demo_model"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _cortex(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cortex", *args], capture_output=True, text=True, timeout=timeout)


def _wait_serving(status_path: Path, node: subprocess.Popen[bytes], limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert node.poll() is None, "the node exited before it served"
        if status_path.exists() and json.loads(status_path.read_text()).get("state") == "serving":
            return
        time.sleep(0.2)
    raise AssertionError(f"the node did not serve within {limit_s} s")


@pytest.mark.parametrize("backend", ["nats", "libp2p"])
def test_submit_config_reaches_first_node(tmp_path: Path, backend: str) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(
        f"data_dir: ./data\nbus:\n  backend: {backend}\n"
        f"models:\n  - path: {DEMO_MODEL}\n    name: demo\n    fragments: auto\n"
    )
    node = subprocess.Popen(
        [sys.executable, "-m", "cortex", "node", "start", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_serving(tmp_path / "data" / "node.status.json", node)
        result = _cortex("submit", "--config", str(config), "--model", "demo", "--max-tokens", "6", "--json", "Return the")
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert len(answer["token_ids"]) == 6
    finally:
        stop = _cortex("node", "stop", "--config", str(config))
        assert stop.returncode == 0, stop.stderr
        assert node.wait(60) == 0

    stopped = _cortex("submit", "--config", str(config), "--model", "demo", "x")
    assert stopped.returncode == 2
    assert "is not serving" in stopped.stderr
