"""Fixtures of the degraded-mode tests: one DeepSeek-V3 test checkpoint per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from degraded_helpers import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def degraded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("degraded-checkpoint"))
