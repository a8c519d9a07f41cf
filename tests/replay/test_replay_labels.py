"""Step-mode labels for positional view records, and how empty lists print in tail lines."""

from __future__ import annotations

import pytest

from replay.labels import POSITIONAL_FIELDS, label_change
from replay.render import format_value


def test_label_change_names_a_router_position() -> None:
    path, old, new = label_change("router", "peers.12D3KooW[3]", 10, 20)
    assert path == "peers.12D3KooW.last_heartbeat_ms"
    assert (old, new) == (10, 20)


def test_label_change_names_a_whole_record() -> None:
    path, old, new = label_change("router", "requests.abcd", None, [3, False, ["peer"]])
    assert path == "requests.abcd"
    assert old is None
    assert new == {"redundancy": 3, "ended": False, "served_by": ["peer"]}


def test_label_change_leaves_other_paths() -> None:
    assert label_change("router", "inputs", 1, 2) == ("inputs", 1, 2)
    assert label_change("registry", "peers.x[3]", 1, 2) == ("peers.x[3]", 1, 2)
    assert label_change("router", "peers.x[9]", 1, 2) == ("peers.x[9]", 1, 2)


def test_positional_fields_match_router_json() -> None:
    view = pytest.importorskip("cortex.router.view")
    presence = view.Presence(joined=True, present=False, presence_stamp=(1, "a", 2), last_heartbeat_ms=77,
                             equivocated_from_seq=5).to_json()
    stats = view.ReplicaStats(expert_outputs=1, rows=2, latency_total_ms=3, latency_samples=4, last_output_ms=5,
                              open_requests=6).to_json()
    routing = view.RequestRouting(redundancy=3, ended=True, served_by={"p"}).to_json()
    for key, record in (("peers", presence), ("stats", stats), ("requests", routing)):
        assert len(POSITIONAL_FIELDS[("router", key)]) == len(record), key
    assert dict(zip(POSITIONAL_FIELDS[("router", "peers")], presence, strict=True))["last_heartbeat_ms"] == 77
    assert dict(zip(POSITIONAL_FIELDS[("router", "stats")], stats, strict=True))["open_requests"] == 6
    assert dict(zip(POSITIONAL_FIELDS[("router", "requests")], routing, strict=True))["redundancy"] == 3


def test_empty_and_filled_lists_print_alike() -> None:
    assert format_value(["ab", "cd"]) == "ab,cd"
    assert format_value([]) == "(empty)"
    assert format_value({}) == "(empty)"
