"""`cortex status`: peers, coverage and gaps, requests in flight, --watch; and the bench command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import MODEL, Author, NodeLog, Scenario, run_cli

from cortex.quorum import PeerPenalized
from events import Acceptor, LogStore, ShardClaimed
from replay.fold import Folder
from replay.live import LiveViews
from replay.reader import LogReader
from replay.render import short_peer_id
from replay.synthetic import generate_log
from replay.views import available_views, view_digest


def status_json(*arguments: str) -> dict[str, Any]:
    result = run_cli("status", *arguments)
    assert result.status == 0, result.stderr
    return orjson.loads(result.stdout.splitlines()[-1])


def test_status_peers_and_coverage(scenario_log: Path, scenario: Scenario) -> None:
    last_ms = scenario.events[-1].time_ms
    status = status_json("--data-dir", str(scenario_log), "--at", f"@{last_ms}")
    assert status["now_ms"] == last_ms
    assert status["live_peers"] == 3
    peers = {peer["peer_id"]: peer for peer in status["peers"]}
    first = peers[scenario.authors[0].peer_id]
    assert first["data_endpoint"] == "tcp://127.0.0.1:5001"
    assert first["hardware"] == {"cpu_cores": 4, "gpu": False}
    assert first["liveness"].startswith("live")
    assert first["load"]["fragments_loaded"] == 1
    assert first["load"]["memory_bytes"] == 1024
    model = status["models"][0]
    assert model["model_id"] == MODEL
    assert {item["fragment"]: item["loaded"] for item in model["fragments"]} == {"head": 1, "block[0:4]": 1}
    assert model["gaps"] == []


def test_status_gaps_when_peers_go_silent(scenario_log: Path, scenario: Scenario) -> None:
    later = scenario.events[-1].time_ms + 60_000
    status = status_json("--data-dir", str(scenario_log), "--at", f"@{later}", "--json")
    assert status["live_peers"] == 0
    assert all(peer["liveness"].startswith("silent for") for peer in status["peers"])
    gaps = status["models"][0]["gaps"]
    assert "head: no live replica" in gaps
    assert "block[0:4]: no live replica" in gaps
    assert "layers 0-3: no live block" in gaps


def test_status_table_output(scenario_log: Path, scenario: Scenario) -> None:
    result = run_cli("status", "--data-dir", str(scenario_log), "--table", "--at", f"@{scenario.events[-1].time_ms}")
    assert result.status == 0
    assert "3 of 3 peers live" in result.stdout
    assert "coverage" in result.stdout
    assert scenario.authors[0].peer_id[-8:] in result.stdout
    assert "trust" in result.stdout
    assert "1000" in result.stdout, "every peer starts at full trust"
    assert "excluded" not in result.stdout


def test_status_highlights_excluded_peer(tmp_path: Path, scenario: Scenario) -> None:
    reporter, suspect = scenario.authors[0], scenario.authors[2]
    clock = [scenario.events[-1].lamport]
    signer = Author(reporter.identity, clock)
    signer.seq = reporter.seq
    # Each (reporter, peer, reason) costs REPORT_PENALTY once: six reasons take 1000 below 500.
    reasons = ["bad_frame", "not_finite", "timed_out", "slow_reply", "bad_shape", "bad_digest"]
    penalties = [signer.sign(PeerPenalized(suspect.peer_id, reason, ())) for reason in reasons]
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    node = NodeLog(data_dir / "events.db")
    node.accept([event.wire for event in [*scenario.events, *penalties]])
    node.close()
    at = f"@{scenario.events[-1].time_ms}"
    status = status_json("--data-dir", str(data_dir), "--at", at)
    peers = {peer["peer_id"]: peer for peer in status["peers"]}
    assert status["excluded_peers"] == [suspect.peer_id]
    assert peers[suspect.peer_id]["excluded"] is True
    assert peers[suspect.peer_id]["trust"] == 400
    assert peers[reporter.peer_id]["excluded"] is False
    table = run_cli("status", "--data-dir", str(data_dir), "--table", "--at", at)
    assert "400 excluded" in table.stdout
    assert f"excluded by the quorum: {short_peer_id(suspect.peer_id)}" in table.stdout


def test_status_watch_prints_each_refresh(scenario_log: Path) -> None:
    result = run_cli("status", "--data-dir", str(scenario_log), "--watch", "--count", "2", "--interval", "0.01")
    assert result.status == 0
    assert len(result.stdout.splitlines()) == 2
    assert run_cli("status", "--data-dir", str(scenario_log), "--count", "0").status == 2


def test_live_views_follow_appends_and_equivocation(scenario_log: Path, scenario: Scenario) -> None:
    reader = LogReader(scenario_log)
    live = LiveViews(reader, available_views())
    assert live.refresh() == 0
    author = scenario.authors[0]
    extra = Author(author.identity, [scenario.events[-1].lamport])
    extra.seq = author.seq
    with LogStore(scenario_log / "events.db") as store:
        Acceptor(store).accept_many([extra.sign(ShardClaimed(model_id=MODEL, fragment="block[4:8]", memory_bytes=9)).wire])
    assert live.refresh() == 1
    assert live.rebuilds == 1

    def replayed() -> list[str]:
        folder = Folder(reader, available_views())
        folder.run()
        return [view_digest(view) for view in folder.views.values()]

    assert [view_digest(view) for view in live.views.values()] == replayed()
    conflicting = extra.sign(ShardClaimed(model_id=MODEL, fragment="head", memory_bytes=1), seq=2)
    with LogStore(scenario_log / "events.db") as store:
        Acceptor(store).accept_many([conflicting.wire])
    assert live.refresh() == 1
    assert live.rebuilds == 2
    assert [view_digest(view) for view in live.views.values()] == replayed()
    assert live.views["registry"].peers[author.peer_id].equivocated_from_seq == 2
    reader.close()


def test_status_requests_in_flight(tmp_path: Path) -> None:
    pytest.importorskip("cortex.scheduler")
    generate_log(tmp_path / "events.db", 700, peers=4)
    status = status_json("--data-dir", str(tmp_path), "--at", "@1764800002000")
    in_flight = status["requests_in_flight"]
    assert isinstance(in_flight, list)
    with LogReader(tmp_path) as reader:
        folder = Folder(reader, available_views())
        folder.run()
        expected = {record.request_id for record in folder.view("scheduler").in_flight()}
    assert {request["request_id"] for request in in_flight} == expected
    assert expected, "the log ends inside a request, so one is in flight"
    routed = sum(peer["load"]["requests_in_flight_routed"] for peer in status["peers"])
    assert routed == sum(len(request["holders"]) for request in in_flight)
    table = run_cli("status", "--data-dir", str(tmp_path), "--at", "@1764800002000", "--table")
    assert "requests in flight:" in table.stdout
    assert "requests: " not in table.stdout


def test_status_missing_log(tmp_path: Path) -> None:
    result = run_cli("status", "--data-dir", str(tmp_path))
    assert result.status == 2
    assert "does not exist" in result.stderr


def test_bench_replay_small_log(tmp_path: Path) -> None:
    arguments = ("bench", "replay", "--events", "2000", "--rounds", "1", "--cache-dir", str(tmp_path), "--json")
    first = run_cli(*arguments)
    assert first.status == 0, first.stderr
    report = orjson.loads(first.stdout)
    results = report["results"]
    assert results["events"] == 2000
    assert results["log_generated_this_run"] is True
    assert sum(value for key, value in results.items() if key.startswith("mix_") and key.endswith("_events")) == 2000
    goal = report["goals"][0]
    assert goal["value"] == round(results["fold_events_per_s"] / results["decode_events_per_s"], 4)
    assert goal["target"] == 0.5
    again = orjson.loads(run_cli(*arguments).stdout)
    assert again["results"]["log_generated_this_run"] is False
    assert again["results"]["log_path"] == results["log_path"]


def test_generated_log_verifies(tmp_path: Path) -> None:
    counts = generate_log(tmp_path / "events.db", 1500, peers=4)
    assert sum(counts.values()) == 1500
    assert counts["PeerJoined"] == 4
    result = run_cli("replay", str(tmp_path), "--verify", "--json")
    assert result.status == 0, result.stdout[:2000]
    node = NodeLog(tmp_path / "copy.db")
    with LogReader(tmp_path) as reader:
        node.accept(list(reader.canonical_wires()))
    node.close()
