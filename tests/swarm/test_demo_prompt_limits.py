"""`cortex demo` rejects a prompt the swarm could not take before it starts any process."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.cli import main
from cortex.node.launcher import LocalSwarm
from cortex.runtime.testmodels import make_test_checkpoint
from cortex.runtime.testmodels import test_tokenizer as tokenizer_for_tests


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=0, tokenizer=tokenizer_for_tests())


@pytest.fixture
def no_swarm(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fail_start(self: LocalSwarm) -> None:
        raise AssertionError("the demo started its swarm for a prompt it should have rejected")

    monkeypatch.setattr(LocalSwarm, "start", fail_start)


def test_demo_rejects_oversized_prompt(llama: Path, no_swarm: None, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["demo", "--model", str(llama), "--prompt", "word " * 20_000])
    error = capsys.readouterr().err
    assert status == 2
    assert "the prompt has 100000 bytes" in error
    assert "at most 48000 characters" in error
    assert "shorten --prompt" in error


def test_demo_rejects_prompt_past_context(llama: Path, no_swarm: None, capsys: pytest.CaptureFixture[str]) -> None:
    # The llama test model has 512 positions.
    status = main(["demo", "--model", str(llama), "--prompt", "hello there", "--max-tokens", "600"])
    error = capsys.readouterr().err
    assert status == 2
    assert "but the model has 512" in error
    assert "--max-tokens" in error
