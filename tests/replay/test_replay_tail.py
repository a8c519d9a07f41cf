"""`cortex tail`: history, filters, JSON lines, and --follow against a node process writing its log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import START_MS, Scenario, run_cli

CHILD = Path(__file__).with_name("log_writer_child.py")


def json_lines(output: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in output.splitlines()]


def test_tail_prints_last_ten_plain(scenario_log: Path, scenario: Scenario) -> None:
    result = run_cli("tail", "--data-dir", str(scenario_log))
    assert result.status == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 10
    assert "\x1b[" not in result.stdout, "piped output must carry no colour codes"
    last = scenario.events[-1]
    assert lines[-1].split()[2] == last.author[-8:]
    assert "PeerHeartbeat" in lines[-1]
    assert "latest_seq=" in lines[-1]


def test_tail_count_all_and_zero(scenario_log: Path, scenario: Scenario) -> None:
    assert len(run_cli("tail", "--log", str(scenario_log / "events.db"), "-n", "3").stdout.splitlines()) == 3
    assert len(run_cli("tail", "--data-dir", str(scenario_log), "--all").stdout.splitlines()) == len(scenario.events)
    assert run_cli("tail", "--data-dir", str(scenario_log), "-n", "0").stdout == ""


def test_tail_json_is_signed_envelope(scenario_log: Path, scenario: Scenario) -> None:
    result = run_cli("tail", "--data-dir", str(scenario_log), "--all", "--json")
    records = json_lines(result.stdout)
    assert [record["id"] for record in records] == [event.id for event in scenario.events]
    first = records[0]
    assert set(first) == {"id", "author", "body", "lamport", "refs", "seq", "time_ms", "type", "version"}
    assert orjson.dumps({key: value for key, value in first.items() if key != "id"}, option=orjson.OPT_SORT_KEYS) == (
        scenario.events[0].payload
    )


def test_tail_filters_type_author_request(scenario_log: Path, scenario: Scenario) -> None:
    log = str(scenario_log)
    by_type = json_lines(run_cli("tail", "--data-dir", log, "--all", "--json", "--type", "ShardLoaded,PeerJoined").stdout)
    assert {record["type"] for record in by_type} == {"ShardLoaded", "PeerJoined"}
    assert len(by_type) == 6
    repeated = json_lines(run_cli("tail", "--data-dir", log, "--all", "--json", "--type", "ShardLoaded", "--type", "PeerJoined").stdout)
    assert repeated == by_type

    author = scenario.authors[2].peer_id
    for form in (author, author[:20], author[-8:]):
        records = json_lines(run_cli("tail", "--data-dir", log, "--all", "--json", "--author", form).stdout)
        assert {record["author"] for record in records} == {author}
        assert len(records) == scenario.authors[2].seq

    request = scenario.claim.id
    records = json_lines(run_cli("tail", "--data-dir", log, "--all", "--json", "--request", request[:10]).stdout)
    assert records[0]["id"] == request
    assert all(request in record["refs"] for record in records[1:])
    assert len(records) == 1 + sum(request in event.refs for event in scenario.events)


def test_tail_since_time_and_duration(scenario_log: Path, scenario: Scenario) -> None:
    cutoff = scenario.events[5].time_ms
    records = json_lines(run_cli("tail", "--data-dir", str(scenario_log), "--all", "--json", "--since", f"@{cutoff}").stdout)
    assert [record["id"] for record in records] == [event.id for event in scenario.events[5:]]
    # The scenario's clock is in the past, so "the last 10 minutes" selects nothing.
    assert run_cli("tail", "--data-dir", str(scenario_log), "--all", "--since", "10m").stdout == ""
    iso = run_cli("tail", "--data-dir", str(scenario_log), "--all", "--json", "--since", "2020-01-01T00:00:00Z")
    assert len(json_lines(iso.stdout)) == len(scenario.events)
    assert START_MS < cutoff


def test_tail_errors_exit_two(tmp_path: Path, scenario_log: Path) -> None:
    missing = run_cli("tail", "--data-dir", str(tmp_path / "none"))
    assert missing.status == 2
    assert "does not exist" in missing.stderr
    bad_since = run_cli("tail", "--data-dir", str(scenario_log), "--since", "yesterday")
    assert bad_since.status == 2
    assert "is not a time" in bad_since.stderr
    unknown_request = run_cli("tail", "--data-dir", str(scenario_log), "--request", "ffffffffffff")
    assert unknown_request.status == 2
    assert "no event" in unknown_request.stderr


def test_tail_data_dir_from_environment(scenario_log: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CORTEX_DATA_DIR", raising=False)
    # Without a log, tail falls back to the home config's data_dir, so point the home at an empty folder.
    monkeypatch.setenv("CORTEX_HOME", str(tmp_path / "no-home"))
    assert "no log given" in run_cli("tail").stderr
    monkeypatch.setenv("CORTEX_DATA_DIR", str(scenario_log))
    assert len(run_cli("tail", "-n", "2").stdout.splitlines()) == 2


def test_tail_follow_prints_new_events_until_interrupted(tmp_path: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, str(CHILD), str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    tail = None
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().startswith("ready")
        tail = subprocess.Popen(
            [sys.executable, "-m", "cortex", "tail", "--data-dir", str(tmp_path), "-n", "1", "--follow",
             "--interval", "0.05", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert tail.stdout is not None
        # The one past event (PeerJoined) shows that tail has opened the log.
        assert orjson.loads(tail.stdout.readline())["type"] == "PeerJoined"
        writer.stdin.write("write 40\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "wrote 41"
        seqs = [orjson.loads(tail.stdout.readline())["seq"] for _ in range(40)]
        assert seqs == list(range(2, 42))
        tail.send_signal(signal.SIGINT)
        assert tail.wait(20) == 0
        assert tail.stdout.read() == ""
    finally:
        if writer.stdin is not None:
            writer.stdin.close()
        writer.wait(30)
        if tail is not None and tail.poll() is None:
            tail.kill()
            tail.wait(10)


def test_tail_follow_duration_and_filter(tmp_path: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, str(CHILD), str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().startswith("ready")
        writer.stdin.write("write 30\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "wrote 31"
        env = dict(os.environ, CORTEX_DATA_DIR=str(tmp_path))
        tail = subprocess.run(
            [sys.executable, "-m", "cortex", "tail", "-n", "2", "--follow", "--duration", "0.5", "--type", "PeerHeartbeat"],
            capture_output=True, text=True, env=env, timeout=60,
        )
        assert tail.returncode == 0, tail.stderr
        lines = tail.stdout.splitlines()
        assert len(lines) == 2
        assert all("PeerHeartbeat" in line for line in lines)
        assert "#20" in lines[0]
        assert "#30" in lines[1]
    finally:
        if writer.stdin is not None:
            writer.stdin.close()
        writer.wait(30)


def test_tail_request_includes_submission(tmp_path: Path) -> None:
    from cortex.scheduler import request_id_for
    from replay.reader import EventFilter, LogReader
    from replay.synthetic import generate_log

    generate_log(tmp_path / "events.db", 400, peers=4)
    with LogReader(tmp_path) as reader:
        submitted = next(reader.canonical(EventFilter(types=("RequestSubmitted",))))
        other = [event for event in reader.canonical(EventFilter(types=("RequestSubmitted",)))][1]
    request_id = request_id_for(submitted.author, submitted.body.nonce)
    records = json_lines(run_cli("tail", "--data-dir", str(tmp_path), "--all", "--json", "--request", request_id).stdout)
    types = [record["type"] for record in records]
    assert types[0] == "RequestSubmitted"
    assert records[0]["id"] == submitted.id
    assert types[-1] == "RequestCompleted"
    assert other.id not in {record["id"] for record in records}
    timeline = orjson.loads(run_cli("replay", str(tmp_path), "timeline", request_id, "--json").stdout)
    assert [entry["id"] for entry in timeline["events"]] == [record["id"] for record in records]
    # The bus tail filters in Python: the same rule.
    event_filter = EventFilter(request=request_id)
    assert event_filter.matches(submitted)
    assert not event_filter.matches(other)
