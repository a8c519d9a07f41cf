"""Event filters and time parsing: the SQL filter (log tail) and the Python one (bus tail) agree."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Author, NodeLog, Scenario
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events import Identity, PeerHeartbeat
from replay.errors import SelectionError
from replay.reader import EventFilter, LogReader
from replay.times import format_duration_ms, format_time_ms, parse_time_ms, parse_until

NOW = 1_800_000_000_000


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_filter_sql_matches_python(scenario_log: Path, scenario: Scenario, data: st.DataObject) -> None:
    events = scenario.events
    types = data.draw(st.lists(st.sampled_from(sorted({event.type for event in events})), max_size=2, unique=True))
    author = data.draw(st.none() | st.sampled_from([author.peer_id for author in scenario.authors]).flatmap(
        lambda peer: st.sampled_from([peer, peer[:16], peer[-8:]])))
    request = data.draw(st.none() | st.sampled_from([event.id for event in events]))
    since = data.draw(st.none() | st.sampled_from([event.time_ms for event in events]))
    until = data.draw(st.none() | st.sampled_from([event.time_ms for event in events]))
    event_filter = EventFilter(types=tuple(types), author=author, request=request, since_ms=since, until_ms=until)
    with LogReader(scenario_log) as reader:
        by_sql = [event.id for event in reader.canonical(event_filter)]
        by_python = [event.id for event in reader.canonical() if event_filter.matches(event)]
        assert by_sql == by_python
        assert reader.count(event_filter) == len(by_sql)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", NOW - 30_000),
        ("10m", NOW - 600_000),
        ("2h", NOW - 7_200_000),
        ("1d", NOW - 86_400_000),
        ("250ms", NOW - 250),
        ("@1764880270000", 1_764_880_270_000),
        ("2026-12-04T20:31:10Z", 1_796_416_270_000),
        ("2026-12-04 20:31:10", 1_796_416_270_000),
        ("2026-12-04T21:31:10+01:00", 1_796_416_270_000),
    ],
)
def test_parse_time_forms(text: str, expected: int) -> None:
    assert parse_time_ms(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "10 minutes", "-5m", "@", "2026-13-01"])
def test_parse_time_rejects_other_text(text: str) -> None:
    with pytest.raises(SelectionError, match="is not a time"):
        parse_time_ms(text, NOW)


def test_time_and_duration_formats() -> None:
    assert format_time_ms(1_796_416_270_005) == "2026-12-04 20:31:10.005"
    assert format_duration_ms(850) == "850 ms"
    assert format_duration_ms(12_400) == "12.4 s"
    assert format_duration_ms(185_000) == "3 m 05 s"
    assert format_duration_ms(-20) == "-20 ms"


def test_parse_until_forms(scenario_log: Path, scenario: Scenario) -> None:
    with LogReader(scenario_log) as reader:
        ordered = [event.id for event in reader.canonical()]
        assert parse_until("3", reader, NOW).index == 3
        assert parse_until("-2", reader, NOW).index == len(ordered) - 2
        assert parse_until(ordered[5][:12], reader, NOW).index == 5
        assert parse_until("@5", reader, NOW).time_ms == 5
        with pytest.raises(SelectionError, match="outside the log"):
            parse_until(str(len(ordered)), reader, NOW)
        with pytest.raises(SelectionError, match="no event with id"):
            parse_until("ab" * 32, reader, NOW)


def test_parse_until_digit_only_id_prefix(tmp_path: Path) -> None:
    # An id prefix made only of digits must select that event, not be read as an index.
    identity = Identity.load_or_create(tmp_path / "node.key")
    node = NodeLog(tmp_path / "events.db")
    author = Author(identity, [0])
    digit_prefix = ""
    for index in range(5_000):
        event = author.sign(PeerHeartbeat(latest_seq=author.seq))
        node.accept([event.wire])
        if event.id[:10].isdigit():
            digit_prefix = event.id[:10]
            break
    assert digit_prefix, "no event id in 5,000 started with 10 digits"
    node.close()

    with LogReader(tmp_path / "events.db") as reader:
        ordered = [event.id for event in reader.canonical()]
        until = parse_until(digit_prefix, reader, NOW)
        assert until.index == ordered.index(reader.resolve_id(digit_prefix))
        assert parse_until("0", reader, NOW).index == 0
