"""`cortex replay --verify`: a clean log passes; each kind of damage is found and fails the run."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import MODEL, Author, NodeLog, Scenario, run_cli

from events import Acceptor, Identity, LogStore, PeerHeartbeat, ShardClaimed, sign_event
from replay.fold import Folder
from replay.reader import EventFilter, LogReader
from replay.views import load_view
from replay.verify import verify_log


def verify_json(path: Path) -> tuple[int, dict[str, Any]]:
    result = run_cli("replay", str(path), "--verify", "--json")
    return result.status, orjson.loads(result.stdout)


def damaged_copy(source: Path, target: Path, statement: str, parameters: tuple[Any, ...] = ()) -> Path:
    target.mkdir()
    shutil.copy(source / "events.db", target / "events.db")
    connection = sqlite3.connect(target / "events.db")
    connection.execute(statement, parameters)
    connection.commit()
    connection.close()
    return target


def test_verify_clean_log_passes(scenario_log: Path, scenario: Scenario) -> None:
    status, report = verify_json(scenario_log)
    assert status == 0
    assert report["ok"] is True
    assert report["events"] == len(scenario.events)
    assert report["signatures_checked"] == len(scenario.events)
    assert report["authors"] == 3
    assert report["problems"] == []
    human = run_cli("replay", str(scenario_log), "verify")
    assert human.status == 0
    assert "OK" in human.stdout


def test_verify_finds_bad_signature(tmp_path: Path, scenario_log: Path, scenario: Scenario) -> None:
    target = scenario.events[3]
    flipped = target.wire[:-1] + bytes([target.wire[-1] ^ 1])
    damaged = damaged_copy(scenario_log, tmp_path / "bad", "UPDATE events SET wire = ? WHERE id = ?",
                           (flipped, bytes.fromhex(target.id)))
    status, report = verify_json(damaged)
    assert status == 1
    assert report["counts"] == {"bad_signature": 1}
    assert report["problems"][0]["event_id"] == target.id


def test_verify_finds_id_and_column_mismatch(tmp_path: Path, scenario_log: Path, scenario: Scenario) -> None:
    target = scenario.events[2]
    damaged = damaged_copy(scenario_log, tmp_path / "ids", "UPDATE events SET id = ?, lamport = lamport + 100 WHERE id = ?",
                           (bytes(32), bytes.fromhex(target.id)))
    status, report = verify_json(damaged)
    assert status == 1
    assert report["counts"]["id_mismatch"] == 1
    assert report["counts"]["column_mismatch"] == 1
    assert "lamport" in next(p["message"] for p in report["problems"] if p["kind"] == "column_mismatch")


def test_verify_finds_gap_and_refs_mismatch(tmp_path: Path, scenario_log: Path, scenario: Scenario) -> None:
    first = scenario.authors[0]
    middle = next(event for event in scenario.events if event.author == first.peer_id and event.seq == 2)
    damaged = damaged_copy(scenario_log, tmp_path / "gap", "DELETE FROM events WHERE id = ?", (bytes.fromhex(middle.id),))
    status, report = verify_json(damaged)
    assert status == 1
    gap = next(problem for problem in report["problems"] if problem["kind"] == "sequence_gap")
    assert gap["author"] == first.peer_id
    assert gap["seq"] == 2
    assert "seq 2 missing" in gap["message"]
    # The deleted event's refs rows stay behind, and events that referenced it now dangle.
    assert report["counts"]["dangling_ref"] >= 1
    assert report["warnings"]


def test_verify_finds_equivocation(tmp_path: Path, scenario_log: Path, scenario: Scenario) -> None:
    author = scenario.authors[2]
    twin = Author(author.identity, [scenario.events[-1].lamport])
    conflicting = twin.sign(ShardClaimed(model_id=MODEL, fragment="head", memory_bytes=1), seq=2)
    with LogStore(scenario_log / "events.db") as store:
        result = Acceptor(store).accept_many([conflicting.wire])
    assert result.equivocations
    status, report = verify_json(scenario_log)
    assert status == 1
    assert report["counts"] == {"equivocation": 1}
    assert report["problems"][0]["author"] == author.peer_id
    assert report["problems"][0]["seq"] == 2


def test_verify_finds_unrecorded_equivocation_and_lamport_order(tmp_path: Path, scenario_log: Path, scenario: Scenario) -> None:
    author = scenario.authors[1]
    twin = Author(author.identity, [0])
    conflicting = twin.sign(ShardClaimed(model_id=MODEL, fragment="head", memory_bytes=1), seq=3, refs=(scenario.claim.id,))
    target = tmp_path / "raw"
    target.mkdir()
    shutil.copy(scenario_log / "events.db", target / "events.db")
    connection = sqlite3.connect(target / "events.db")
    cursor = connection.execute(
        "INSERT INTO events (id, author, seq, lamport, time_ms, type, wire) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (bytes.fromhex(conflicting.id), conflicting.author, 3, conflicting.lamport, conflicting.time_ms,
         conflicting.type, conflicting.wire),
    )
    connection.execute("INSERT INTO refs VALUES (?, ?)", (bytes.fromhex(scenario.claim.id), cursor.lastrowid))
    connection.commit()
    connection.close()
    with LogReader(target) as reader:
        report = verify_log(reader)
    assert not report.ok
    assert report.counts["equivocation"] == 1
    assert report.counts["unrecorded_equivocation"] == 1
    # Lamport 1 is not above the Lamport clock of the claim it refs.
    assert report.counts["lamport_order"] == 1
    lamport = next(finding for finding in report.problems if finding.kind == "lamport_order")
    assert lamport.event_id == conflicting.id
    assert "referenced event" in lamport.message


@pytest.mark.parametrize("damage", ["undecodable"])
def test_verify_finds_undecodable_rows(tmp_path: Path, scenario_log: Path, scenario: Scenario, damage: str) -> None:
    target = scenario.events[0]
    damaged = damaged_copy(scenario_log, tmp_path / damage, "UPDATE events SET wire = ? WHERE id = ?",
                           (b"not json" + bytes(64), bytes.fromhex(target.id)))
    status, report = verify_json(damaged)
    assert status == 1
    assert report["counts"]["undecodable"] == 1
    human = run_cli("replay", str(damaged), "--verify")
    assert human.status == 1
    assert "PROBLEMS FOUND" in human.stdout
    assert "undecodable" in human.stdout


def test_verify_honours_voided_seqs(tmp_path: Path, identities: list[Identity]) -> None:
    """Seqs an author voided with SequenceSkipped are a warning, not a gap."""
    author = identities[0]
    wires = [sign_event(author, PeerHeartbeat(latest_seq=seq - 1), seq=seq, lamport=seq, time_ms=seq).wire for seq in (1, 4)]
    envelope = {
        "author": author.peer_id, "body": {"first": 2, "last": 3}, "lamport": 5, "refs": [], "seq": 5,
        "time_ms": 5, "type": "SequenceSkipped", "version": "1.0",
    }
    payload = orjson.dumps(envelope, option=orjson.OPT_SORT_KEYS)
    wires.append(payload + author.sign(payload))
    wires.append(sign_event(author, PeerHeartbeat(latest_seq=6), seq=7, lamport=7, time_ms=7).wire)
    with LogStore(tmp_path / "events.db") as store:
        result = Acceptor(store).accept_many(wires)
    assert not result.rejected
    status, report = verify_json(tmp_path)
    assert status == 1
    assert report["counts"] == {"voided_seqs": 1, "sequence_gap": 1}
    assert report["warnings"][0]["message"] == "seqs 2 to 3 declared void by the author"
    assert report["problems"][0]["seq"] == 6


def test_record_seqs_are_not_equivocations(tmp_path: Path, scenario: Scenario) -> None:
    from cortex.comm.records import ExpertOutputProduced

    author = scenario.authors[0]
    request_id = "cd" * 32
    # Request-scoped records number their own sequence, so seq 1 and 2 are taken twice.
    records = [
        author.sign(ExpertOutputProduced(MODEL, 0, 1, expert, "out", "float32", (1, 4), "ee" * 32, 16), refs=(request_id,), seq=seq)
        for seq, expert in ((1, 0), (2, 1))
    ]
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    node = NodeLog(data_dir / "events.db")
    node.accept([event.wire for event in [*scenario.events, *records]])
    node.close()
    verify = run_cli("replay", str(data_dir), "--verify", "--json")
    assert verify.status == 0, verify.stdout
    with LogReader(data_dir) as reader:
        assert reader.disputed_keys() == set()
        folder = Folder(reader, [load_view("router")])
        folder.run()
    assert folder.excluded == {}
    assert folder.view("router").replica_stats(author.peer_id).expert_outputs == 2


def test_verify_resolves_refs_to_submitted_requests(tmp_path: Path) -> None:
    pytest.importorskip("cortex.comm.records")
    from cortex.scheduler import request_id_for
    from replay.synthetic import generate_log

    generate_log(tmp_path / "events.db", 800, peers=4)
    status, report = verify_json(tmp_path)
    assert status == 0
    assert "dangling_ref" not in report["counts"]

    with LogReader(tmp_path) as reader:
        submitted = next(reader.canonical(EventFilter(types=("RequestSubmitted",))))
    without_submission = damaged_copy(tmp_path, tmp_path / "cut", "DELETE FROM events WHERE id = ?",
                                      (bytes.fromhex(submitted.id),))
    _status, cut_report = verify_json(without_submission)
    assert cut_report["counts"]["dangling_ref"] >= 1
    request_id = request_id_for(submitted.author, submitted.body.nonce)
    dangling_messages = [warning["message"] for warning in cut_report["warnings"] if warning["kind"] == "dangling_ref"]
    assert any(request_id in message for message in dangling_messages)


def test_verify_lamport_order_ignores_request_scoped_seqs(tmp_path: Path) -> None:
    records = pytest.importorskip("cortex.comm.records")
    identity = Identity.generate()
    swarm = [sign_event(identity, PeerHeartbeat(latest_seq=seq - 1), seq=seq, lamport=lamport, time_ms=1_000 + lamport)
             for seq, lamport in ((1, 10), (2, 11), (4, 13))]  # seq 3 never reached this node
    tensor = {"model_id": MODEL, "step": 0, "dtype": "bfloat16", "shape": (1, 4), "nbytes": 8}
    request_scoped = [
        sign_event(identity, records.ExpertOutputProduced(layer=1, expert=seq, name="output", digest="d" * 64, **tensor),
                   seq=seq, lamport=lamport, time_ms=1_000 + lamport)
        for seq, lamport in ((1, 20), (2, 21), (3, 22))
    ]
    with LogStore(tmp_path / "events.db") as store:
        result = Acceptor(store).accept_many([event.wire for event in swarm + request_scoped])
    assert not result.rejected

    status, report = verify_json(tmp_path)

    assert status == 1
    assert report["counts"] == {"sequence_gap": 1}


def test_verify_gap_below_sync_floor_is_a_warning(tmp_path: Path, scenario_log: Path, scenario: Scenario) -> None:
    first = scenario.authors[0]
    middle = next(event for event in scenario.events if event.author == first.peer_id and event.seq == 2)
    damaged = damaged_copy(scenario_log, tmp_path / "joined", "DELETE FROM events WHERE id = ?", (bytes.fromhex(middle.id),))

    (damaged / "bus-state.json").write_bytes(orjson.dumps({"floors": {first.peer_id: 2}}))
    _status, report = verify_json(damaged)
    assert "sequence_gap" not in report["counts"]
    assert report["counts"]["skipped_at_join"] == 1
    skipped = next(warning for warning in report["warnings"] if warning["kind"] == "skipped_at_join")
    assert skipped["author"] == first.peer_id
    assert skipped["seq"] == 2

    (damaged / "bus-state.json").write_bytes(orjson.dumps({"floors": {first.peer_id: 1}}))
    status, report = verify_json(damaged)
    assert status == 1
    assert report["counts"]["sequence_gap"] == 1
    assert "skipped_at_join" not in report["counts"]
