"""`cortex replay diff` of two nodes' logs, and step mode driven through stdin."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
from conftest import NodeLog, Scenario, run_cli


def node_with(path: Path, scenario: Scenario, skip: set[int]) -> Path:
    path.mkdir()
    node = NodeLog(path / "events.db")
    node.accept([event.wire for position, event in enumerate(scenario.events) if position not in skip])
    node.close()
    return path


def test_diff_identical_logs(tmp_path: Path, scenario_log: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(scenario_log / "events.db", copy / "events.db")
    result = run_cli("replay", "diff", str(scenario_log), str(copy), "--json")
    assert result.status == 0
    report = orjson.loads(result.stdout)
    assert report["same_events"] and report["same_views"]
    assert report["first_event_difference"] is None
    assert report["views"]["registry"]["first_index"] is None


def test_diff_reports_missing_events_and_first_view_difference(tmp_path: Path, scenario: Scenario) -> None:
    full = node_with(tmp_path / "full", scenario, set())
    # Node B missed event 7 (a ShardLoaded of expert[1][3]) and event 10 (its release).
    assert scenario.events[7].type == "ShardLoaded"
    assert scenario.events[10].type == "ShardReleased"
    partial = node_with(tmp_path / "partial", scenario, {7, 10})
    result = run_cli("replay", "diff", str(full), str(partial), "--json", "--view", "registry")
    assert result.status == 1
    report = orjson.loads(result.stdout)
    assert report["only_in_a_count"] == 2
    assert report["only_in_b_count"] == 0
    assert {item["id"] for item in report["only_in_a"]} == {scenario.events[7].id, scenario.events[10].id}
    assert [item["index"] for item in report["only_in_a"]] == [7, 10]
    assert report["first_event_difference"] == 7
    registry = report["views"]["registry"]
    assert registry["first_index"] == 7
    assert registry["event_a"] == scenario.events[7].id
    assert registry["final_digest_a"] != registry["final_digest_b"]
    human = run_cli("replay", "diff", str(full), str(partial), "--view", "registry")
    assert human.status == 1
    assert "only in A: 2" in human.stdout
    assert "first differs after index 7" in human.stdout


def test_diff_missing_heartbeat_changes_registry(tmp_path: Path, scenario: Scenario) -> None:
    full = node_with(tmp_path / "full", scenario, set())
    # Event 9 is the first author's heartbeat: without it that peer's last heartbeat time differs.
    assert scenario.events[9].type == "PeerHeartbeat"
    partial = node_with(tmp_path / "partial", scenario, {9})
    report = orjson.loads(run_cli("replay", "diff", str(full), str(partial), "--json").stdout)
    assert report["only_in_a_count"] == 1
    assert report["views"]["registry"]["first_index"] == 9


def test_step_mode_shows_changes(scenario_log: Path, scenario: Scenario) -> None:
    total = len(scenario.events)
    commands = "n\nn 2\nd\nu 7\nv registry\nbogus\nc\nq\n"
    result = run_cli("replay", str(scenario_log), "--step", "--view", "registry", stdin=commands)
    assert result.status == 0, result.stderr
    out = result.stdout
    assert f"step mode: {total} events" in out
    assert "     0  " in out
    assert "PeerJoined" in out
    assert "registry: 1 change(s)" in out
    assert "     2  " in out
    assert "at index 7 (5 events folded)" in out
    assert "unknown command 'bogus'" in out
    assert f"end of log after {total} events" in out
    assert "coverage" in out


def test_step_mode_in_a_subprocess_pipe(scenario_log: Path) -> None:
    """The real command with a piped stdin: commands run in order, the end of input stops it."""
    process = subprocess.run(
        [sys.executable, "-m", "cortex", "replay", str(scenario_log), "--step"],
        input="n\nd\n", capture_output=True, text=True, timeout=60,
    )
    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    assert any(line.startswith("registry: ") and len(line.split()[1]) == 64 for line in lines)
    assert "\x1b[" not in process.stdout


def test_step_mode_on_a_terminal(scenario_log: Path) -> None:
    """On a pseudo-terminal, step mode prompts with the position and colours its lines."""
    import os
    import pty
    import select

    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "cortex", "replay", str(scenario_log), "--step", "--view", "registry"],
        stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "160"},
    )
    os.close(terminal)
    output = b""

    def read_until(marker: bytes) -> None:
        nonlocal output
        while marker not in output:
            ready, _, _ = select.select([controller], [], [], 30)
            assert ready, f"no {marker!r} in {output[-500:]!r}"
            output += os.read(controller, 65536)

    try:
        read_until(b"[0]> ")
        os.write(controller, b"n\n")
        read_until(b"[1]> ")
        os.write(controller, b"q\n")
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        os.close(controller)
    assert b"PeerJoined" in output
    assert b"\x1b[" in output, "a terminal gets colour"
