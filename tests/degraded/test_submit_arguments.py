"""Unit tests of `cortex submit` argument parsing: --deadline in seconds."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cortex.commands.submit import deadline_ms, deadline_seconds


@pytest.mark.parametrize(
    ("seconds", "expected_ms"),
    [(0.0, 0), (0.0004, 1), (0.0000001, 1), (0.0015, 2), (2.5, 2500)],
)
def test_deadline_ms_keeps_positive_deadlines(seconds: float, expected_ms: int) -> None:
    assert deadline_ms(seconds) == expected_ms


@pytest.mark.parametrize("text", ["-1", "-0.001", "nan", "inf", "soon"])
def test_deadline_seconds_rejects_invalid(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="seconds"):
        deadline_seconds(text)


def test_negative_deadline_exits_2_in_seconds() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "submit", "hello", "--model", "m", "--deadline", "-1"],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 2
    assert "invalid deadline '-1'" in completed.stderr
    assert "-1000" not in completed.stderr


@pytest.mark.parametrize("as_json", [False, True])
def test_degraded_answer_prints_stderr_line_and_exits_0(as_json: bool, capsys: pytest.CaptureFixture[str]) -> None:
    import orjson

    from cortex.commands.submit import _report
    from cortex.node.client import RequestResult
    from cortex.scheduler import RequestCompleted

    completed = RequestCompleted(
        request_id="ab" * 32, prompt_tokens=0, completion_tokens=2, finish_reason="length", timings_ms={},
        records_digest="f" * 64, records_count=0, degraded=True, degraded_reason="no_route",
    )
    result = RequestResult("ab" * 32, token_ids=[1, 2], text="hi", driver="cd" * 32, completed=completed)

    status = _report(result, as_json)

    output = capsys.readouterr()
    assert status == 0
    assert output.err.startswith("degraded: the swarm could not serve this request")
    assert "(no_route)" in output.err
    if as_json:
        assert orjson.loads(output.out)["completed"]["degraded"] is True
