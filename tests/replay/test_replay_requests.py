"""Request id prefixes in `cortex tail --request` and `cortex replay LOG timeline`."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import orjson
import pytest
from conftest import run_cli

from replay.errors import EventNotFound
from replay.reader import EventFilter, LogReader
from replay.requests import resolve_request_id


@pytest.fixture(scope="module")
def generated_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    pytest.importorskip("cortex.comm.records")
    from cortex.scheduler import request_id_for
    from replay.synthetic import generate_log

    folder = tmp_path_factory.mktemp("requests")
    generate_log(folder / "events.db", 400, peers=4)
    with LogReader(folder) as reader:
        submitted = next(reader.canonical(EventFilter(types=("RequestSubmitted",))))
    return folder, request_id_for(submitted.author, submitted.body.nonce)


def test_request_prefix_resolves_to_request_id(generated_log: tuple[Path, str]) -> None:
    folder, request_id = generated_log
    with LogReader(folder) as reader:
        assert resolve_request_id(reader, request_id[:8]) == request_id
        assert resolve_request_id(reader, request_id[:12].upper()) == request_id
        assert resolve_request_id(reader, request_id) == request_id


def test_request_prefix_in_timeline_and_tail(generated_log: tuple[Path, str]) -> None:
    folder, request_id = generated_log
    whole = run_cli("replay", str(folder), "timeline", request_id, "--json")
    short = run_cli("replay", str(folder), "timeline", request_id[:12], "--json")
    assert short.status == 0, short.stderr
    assert orjson.loads(short.stdout) == orjson.loads(whole.stdout)
    assert orjson.loads(short.stdout)["events"]

    tail_whole = run_cli("tail", "--data-dir", str(folder), "--all", "--json", "--request", request_id)
    tail_short = run_cli("tail", "--data-dir", str(folder), "--all", "--json", "--request", request_id[:8])
    assert tail_short.status == 0, tail_short.stderr
    assert tail_short.stdout == tail_whole.stdout
    assert tail_short.stdout.strip()


def test_unknown_request_prefix_is_an_error(generated_log: tuple[Path, str]) -> None:
    folder, request_id = generated_log
    unknown = "0123abcd" if not request_id.startswith("0123abcd") else "fedc9876"
    result = run_cli("replay", str(folder), "timeline", unknown)
    assert result.status == 2
    assert f"no event or request in {folder}" in result.stderr
    assert "whole 64-digit id" in result.stderr


def test_ambiguous_request_prefix_is_an_error(generated_log: tuple[Path, str], tmp_path: Path) -> None:
    folder, request_id = generated_log
    shutil.copy(folder / "events.db", tmp_path / "events.db")
    twin = bytes.fromhex(request_id[:8] + ("0" if request_id[8] != "0" else "1") * 56)
    connection = sqlite3.connect(tmp_path / "events.db")
    connection.execute("INSERT INTO refs (ref, event_rowid) VALUES (?, 1)", (twin,))
    connection.commit()
    connection.close()
    with LogReader(tmp_path) as reader, pytest.raises(EventNotFound, match="2 events or requests") as raised:
        resolve_request_id(reader, request_id[:8])
    assert "give more digits" in str(raised.value)
    with LogReader(tmp_path) as reader:
        assert resolve_request_id(reader, request_id[:12]) == request_id
