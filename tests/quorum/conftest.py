"""Fixtures of the quorum tests: the DeepSeek-V3 test checkpoint, written once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cortex.runtime.testmodels import make_test_checkpoint, test_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def quorum_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_checkpoint("deepseek_v3", tmp_path_factory.mktemp("quorum-checkpoint") / "deepseek_v3", seed=0, tokenizer=test_tokenizer())
