"""`cortex bench events --quick --json`: the JSON shape, recorded settings and a computed goal."""

from __future__ import annotations

import subprocess
import sys

import orjson


def test_bench_events_json() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "cortex", "bench", "events", "--quick", "--json", "--events", "300", "--rounds", "1"],
        capture_output=True,
        timeout=120,
        check=True,
    )
    report = orjson.loads(completed.stdout)
    results = report["results"]
    goal = report["goals"][0]

    assert report["bench"] == "events"
    assert results["sqlite_journal_mode"] == "wal"
    assert results["sqlite_synchronous_peer_events"] == "NORMAL"
    assert results["sqlite_synchronous_own_events"] == "NORMAL"
    assert results["sqlite_synchronous_seq_reservations"] == "FULL"
    assert results["seq_reservation_block"] == 1024
    for key in ("sign_events_per_s", "raw_verify_per_s", "accept_events_per_s", "accept_single_events_per_s", "own_write_events_per_s"):
        assert results[key] > 0, key
    assert goal["target"] == 0.4
    assert goal["value"] == round(results["accept_events_per_s"] / results["raw_verify_per_s"], 4)
    assert b"accept path vs raw verify" in completed.stderr
