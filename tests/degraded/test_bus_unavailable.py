"""A node whose bus cannot start: `cortex submit --config` still answers, with the fallback model, degraded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cortex.commands.generate import DEMO_MODEL_DIR

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROMPT = "Return the number of items in the"


def _cortex(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cortex", *args], capture_output=True, text=True, timeout=120)


def test_submit_answers_locally_when_the_nodes_bus_could_not_start(tmp_path: Path) -> None:
    from socket import socket

    with socket() as probe:  # a loopback port with nothing listening: the NATS server is unreachable
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "node.yaml"
    config.write_text(
        f"data_dir: ./data\nbus:\n  backend: nats\n  nats_url: nats://127.0.0.1:{port}\n"
        f"models:\n  - path: {DEMO_MODEL_DIR}\n    name: demo\n    fragments: auto\n"
    )
    started = _cortex("node", "start", "--config", str(config))
    assert started.returncode == 1
    status = json.loads((tmp_path / "data" / "node.status.json").read_text())
    assert status["state"] == "bus_failed"
    assert "NATS" in status["bus_error"]

    answered = _cortex("submit", "--config", str(config), "--model", "demo", "--max-tokens", "8", "--json", PROMPT)
    assert answered.returncode == 0, answered.stderr
    result = json.loads(answered.stdout)
    assert result["completed"]["degraded"] is True
    assert result["completed"]["degraded_reason"].startswith("bus_unavailable:")
    assert "degraded" in answered.stderr

    local = _cortex("generate", "--max-tokens", "8", "--json", PROMPT)
    assert local.returncode == 0, local.stderr
    assert result["token_ids"] == json.loads(local.stdout)["generated_token_ids"]
