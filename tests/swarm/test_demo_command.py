"""`cortex demo` as a user runs it: NATS bus, JSON summary, every process stopped after."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.slow


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_json_matches_local_generation(checkpoint: object) -> None:
    folder: Path = checkpoint("deepseek_v3")  # type: ignore[operator]
    prompt = "Open the file"
    demo = subprocess.run(
        [sys.executable, "-m", "cortex", "demo", "--model", str(folder), "--bus", "nats", "--nodes", "3",
         "--max-tokens", "10", "--prompt", prompt, "--json"],
        capture_output=True, text=True, timeout=300,
    )
    local = subprocess.run(
        [sys.executable, "-m", "cortex", "generate", "--model", str(folder), "--max-tokens", "10", "--json", prompt],
        capture_output=True, text=True, timeout=300,
    )

    assert demo.returncode == 0, demo.stderr[-3000:]
    summary = orjson.loads(demo.stdout)
    expected = orjson.loads(local.stdout)
    assert summary["token_ids"] == expected["generated_token_ids"]
    assert summary["failed"] is None
    assert summary["degraded"] is False
    assert [node["node"] for node in summary["nodes"]] == [0, 1, 2]
    assert summary["nodes"][0]["driver"] is True
    # With 3 nodes both expert nodes hold every expert, so the router may send every layer to
    # the one it ranks first: the expert rows come from the expert nodes, none from the driver.
    assert summary["nodes"][0]["expert_rows_served"] == 0
    assert sum(node["expert_rows_served"] for node in summary["nodes"][1:]) > 0
    assert {"swarm_start_ms", "prefill", "decode", "total"} <= set(summary["timings_ms"])
    assert not any(_is_running(node["pid"]) for node in summary["nodes"])
