"""`cortex bench peers`: JSON shape, the left-out goal, output checks, venv cache and child cleanup."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import torch

from cortex.bench._hivemind_venv import MARKER_NAME, HivemindUnavailable, HivemindVenv, default_cache_dir
from cortex.bench._peers_cortex import expert_forward, reference_layer, route
from cortex.bench._subprocesses import ChildFailed, ChildProcesses
from cortex.bench.peers import (
    ATOL,
    _start_hivemind_server,
    BATCH_SIZES,
    EXPERTS,
    GOAL_NAME,
    HIDDEN_SIZE,
    PeersBenchError,
    _check_outputs,
    _summarize,
    make_inputs,
    make_weights,
)

BATCH_KEYS = [f"batch_{size}_{figure}" for size in BATCH_SIZES for figure in ("median_ms", "p90_ms", "tokens_per_s")]


def run_bench(*arguments: str, timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "cortex", "bench", "peers", "--json", *arguments],
        capture_output=True,
        timeout=timeout_s,
        check=False,
    )


def test_bench_peers_cortex_only_json() -> None:
    completed = run_bench("--skip-hivemind", "--quick", "--repeats", "3", "--warmup", "1", "--servers", "1", timeout_s=120)
    assert completed.returncode == 0, completed.stderr.decode()[-3000:]
    report = orjson.loads(completed.stdout)
    results = report["results"]

    assert report["bench"] == "peers"
    assert report["goals"] == []
    assert results["hivemind_status"] == "not measured: hivemind was skipped (--skip-hivemind)"
    assert f"goal '{GOAL_NAME}' left out" in completed.stderr.decode()
    for key in BATCH_KEYS:
        assert results[f"cortex_{key}"] > 0, key
        assert f"hivemind_{key}" not in results, key
    assert results["cortex_batch_16_data_plane_calls"] >= 1
    assert 0 <= results["cortex_max_abs_error"] <= ATOL * 10
    assert results["timed_calls_per_batch"] == 3
    assert results["cortex_expert_servers"] == 1
    assert results["load_average_1min_before"] >= 0
    assert results["experts"] == EXPERTS
    assert results["top_k"] == 2
    assert "CurveZMQ" in results["cortex_settings"]


@pytest.mark.slow
def test_bench_peers_against_hivemind() -> None:
    venv = HivemindVenv(default_cache_dir() / "hivemind-venv")
    if venv.cached() is None:
        pytest.skip(f"the hivemind venv is not cached at {venv.path}; run `cortex bench peers` once to build it")
    completed = run_bench("--quick", timeout_s=300)
    assert completed.returncode == 0, completed.stderr.decode()[-3000:]
    report = orjson.loads(completed.stdout)
    results = report["results"]
    assert results["hivemind_status"] == "measured", completed.stderr.decode()[-3000:]
    goal = report["goals"][0]

    for key in BATCH_KEYS:
        assert results[f"cortex_{key}"] > 0, key
        assert results[f"hivemind_{key}"] > 0, key
    assert results["hivemind_max_abs_error"] <= ATOL * 10
    assert goal["name"] == GOAL_NAME
    assert goal["target"] == 10.0
    assert goal["value"] == round(results["hivemind_batch_16_median_ms"] / results["cortex_batch_16_median_ms"], 4)


@pytest.mark.slow
def test_bench_peers_restarts_a_hung_hivemind_server(tmp_path: Path) -> None:
    real = HivemindVenv(default_cache_dir() / "hivemind-venv")
    if real.cached() is None:
        pytest.skip(f"the hivemind venv is not cached at {real.path}; run `cortex bench peers` once to build it")
    # A venv whose python hangs at the first server start and runs the real one afterwards.
    fake = HivemindVenv(tmp_path / "hivemind-venv")
    fake.python.parent.mkdir(parents=True)
    fake.marker.write_text(real.marker.read_text())
    hung = tmp_path / "hung-once"
    fake.python.write_text(
        f'#!/bin/bash\nif [[ "$2" == serve && ! -e {hung} ]]; then touch {hung}; exec sleep 600; fi\nexec {real.python} "$@"\n'
    )
    fake.python.chmod(0o755)

    completed = run_bench(
        "--quick", "--repeats", "2", "--warmup", "1", "--cache-dir", str(tmp_path), "--ready-timeout-s", "20", timeout_s=300
    )

    assert completed.returncode == 0, completed.stderr.decode()[-3000:]
    results = orjson.loads(completed.stdout)["results"]
    assert hung.exists()
    assert results["hivemind_status"] == "measured", completed.stderr.decode()[-3000:]
    assert "starting a new hivemind server once" in completed.stderr.decode()


def test_reference_layer_matches_token_loop() -> None:
    weights = make_weights(0)
    tokens = make_inputs(0)["16"]
    routing = route(weights["router"], tokens, 2)
    expected = torch.zeros_like(tokens)
    for token in range(tokens.shape[0]):
        for slot in range(2):
            expert = int(routing.expert_ids[token, slot])
            expected[token] += routing.weights[token, slot] * expert_forward(weights, expert, tokens[token : token + 1])[0]

    actual = reference_layer(weights, tokens, 2)

    assert actual.shape == (16, HIDDEN_SIZE)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_routing_picks_distinct_experts_with_unit_weights() -> None:
    weights = make_weights(0)
    tokens = make_inputs(0)["16"]

    routing = route(weights["router"], tokens, 2)

    assert routing.expert_ids.shape == (16, 2)
    assert bool((routing.expert_ids[:, 0] != routing.expert_ids[:, 1]).all())
    torch.testing.assert_close(routing.weights.sum(dim=-1), torch.ones(16))
    assert len(set(routing.expert_ids.flatten().tolist())) > 2


def test_weights_repeat_for_one_seed() -> None:
    first, second, other = make_weights(3), make_weights(3), make_weights(4)

    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["router"], other["router"])


def test_check_outputs_rejects_mismatch() -> None:
    reference = {"16": torch.ones(16, HIDDEN_SIZE)}
    off = {"16": torch.ones(16, HIDDEN_SIZE) + 1e-3}
    close = {"16": torch.ones(16, HIDDEN_SIZE) + 1e-7}

    with pytest.raises(PeersBenchError, match="differs from the local computation"):
        _check_outputs("Cortex", off, reference)
    assert _check_outputs("Cortex", close, reference) < 1e-6


def test_check_outputs_rejects_wrong_shape() -> None:
    with pytest.raises(PeersBenchError, match="shape"):
        _check_outputs("hivemind", {"16": torch.ones(8, HIDDEN_SIZE)}, {"16": torch.ones(16, HIDDEN_SIZE)})


def test_summarize_median_p90_and_rate() -> None:
    times = {"1": [float(value) for value in range(1, 11)], "16": [4.0, 2.0, 8.0]}

    figures = _summarize("cortex", times)

    assert figures["cortex_batch_1_median_ms"] == 5.5
    assert figures["cortex_batch_1_p90_ms"] == 10.0
    assert figures["cortex_batch_16_median_ms"] == 4.0
    assert figures["cortex_batch_16_tokens_per_s"] == 4000.0


def test_venv_cached_only_with_marker(tmp_path: Path) -> None:
    venv = HivemindVenv(tmp_path / "venv")
    (venv.path / "bin").mkdir(parents=True)
    venv.python.write_text("")

    assert venv.cached() is None
    venv.marker.write_text('{"hivemind": "1.1.12", "torch": "2.13.0+cpu"}')
    assert venv.cached() == {"hivemind": "1.1.12", "torch": "2.13.0+cpu"}
    assert venv.marker.name == MARKER_NAME


def test_venv_build_rejects_non_venv_directory(tmp_path: Path) -> None:
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "notes.txt").write_text("not a venv")

    with pytest.raises(HivemindUnavailable, match="is not a virtualenv"):
        HivemindVenv(tmp_path / "venv").ensure()
    assert (tmp_path / "venv" / "notes.txt").exists()


def test_uninstallable_hivemind_gives_reason(tmp_path: Path) -> None:
    (tmp_path / "hivemind-venv").mkdir()
    (tmp_path / "hivemind-venv" / "notes.txt").write_text("not a venv")
    args = argparse.Namespace(cache_dir=tmp_path, hivemind_handlers=1, repeats=1, warmup=0, call_timeout_s=1.0)

    with ChildProcesses(tmp_path) as children:
        server, reason = _start_hivemind_server(args, children, tmp_path)

    assert server is None
    assert reason is not None
    assert reason.startswith("could not be installed: ")
    assert "is not a virtualenv" in reason


def _alive(pid: int) -> bool:
    """Return whether `pid` runs; a zombie waiting for its parent to reap it counts as stopped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_children_stop_kills_stubborn_group(tmp_path: Path) -> None:
    # The child ignores stdin and SIGTERM and forks a grandchild that sleeps: both must go.
    script = (
        "import json, os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(json.dumps({'grandchild': grandchild.pid}), flush=True)\n"
        "time.sleep(120)\n"
    )
    with ChildProcesses(tmp_path, graceful_stop_s=0.5) as children:
        child = children.start("stubborn", [sys.executable, "-c", script])
        grandchild = child.read_json("grandchild", timeout_s=30)["grandchild"]
        assert _alive(grandchild)
        children.stop_all()

    assert child.process.returncode == -9
    for _ in range(100):
        if not _alive(grandchild):
            break
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_child_exit_before_report_raises(tmp_path: Path) -> None:
    script = "import sys; print('not json'); sys.stderr.write('boom\\n'); sys.exit(3)"
    with ChildProcesses(tmp_path) as children:
        child = children.start("failing", [sys.executable, "-c", script])
        with pytest.raises(ChildFailed, match="exited with status 3") as raised:
            child.read_json("ready", timeout_s=30)

    assert "boom" in str(raised.value)
