"""`cortex bench swarm`: the JSON report of a quick run on each bus, with the demo model and 4 node processes on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

pytestmark = pytest.mark.slow

GOAL_NAMES = ["swarm vs local tokens/s", "dispatch overhead vs raw ZeroMQ round trip"]


@pytest.mark.parametrize("bus", ["libp2p", "nats"])
def test_bench_swarm_quick_json(bus: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "cortex", "bench", "swarm", "--quick", "--json", "--bus", bus],
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr.decode()[-3000:]
    report = orjson.loads(completed.stdout)
    results = report["results"]

    assert report["bench"] == "swarm"
    assert results["settings"].startswith(f"{bus} bus")
    assert results["nodes"] == 4
    assert results["generated_tokens"] == 8
    assert results["tokens_identical"] is True
    assert results["moe_layers"] == 3
    for key in (
        "local_tokens_per_s", "swarm_tokens_per_s", "swarm_dispatch_per_moe_layer_ms", "raw_zmq_round_trip_median_ms",
        "signed_round_trip_median_ms", "local_call_median_ms",
    ):  # fmt: skip
        assert results[key] > 0, key
    # The driver serves no expert, so every MoE layer makes at least one call, and a call lasts
    # longer than its serving on the expert node.
    assert results["swarm_calls_per_moe_layer"] >= 1
    assert 0 < results["swarm_serve_ms"] < results["swarm_call_ms"]
    assert results["dispatch_overhead_per_moe_layer_ms"] == pytest.approx(
        results["swarm_dispatch_per_moe_layer_ms"] - results["local_dispatch_per_moe_layer_ms"]
    )
    assert [goal["name"] for goal in report["goals"]] == GOAL_NAMES
    assert all(goal["value"] > 0 for goal in report["goals"])
