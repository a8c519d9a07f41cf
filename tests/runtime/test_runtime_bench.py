"""`cortex bench local`: side-by-side figures, and a failure when the tokens differ."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from conftest import CheckpointFactory

import cortex.runtime.generation as generation
from cortex.cli import main


@pytest.mark.slow
def test_bench_reports_both_runtimes(checkpoint: CheckpointFactory, capsys: pytest.CaptureFixture[str]) -> None:
    folder = checkpoint("deepseek_v3")
    assert main(["bench", "local", "--json", "--model", str(folder), "--tokens", "6", "--runs", "1"]) == 0
    record = json.loads(capsys.readouterr().out)
    results = record["results"]
    assert results["deepseek_v3_tokens_identical"] is True
    assert results["deepseek_v3_cortex_tokens_per_s"] > 0
    assert results["deepseek_v3_transformers_tokens_per_s"] > 0
    (goal,) = record["goals"]
    assert goal["target"] == 1.0
    expected = results["deepseek_v3_cortex_tokens_per_s"] / results["deepseek_v3_transformers_tokens_per_s"]
    assert goal["value"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_bench_fails_on_different_tokens(
    checkpoint: CheckpointFactory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = generation.generate_tokens

    def off_by_one(*args: object, **kwargs: object) -> Iterator[int]:
        for token in real(*args, **kwargs):  # type: ignore[arg-type]
            yield token + 1

    monkeypatch.setattr(generation, "generate_tokens", off_by_one)
    folder = checkpoint("deepseek_v3")
    assert main(["bench", "local", "--json", "--model", str(folder), "--tokens", "4", "--runs", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "generated different tokens (first difference at new token 0" in captured.err
