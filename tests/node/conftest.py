"""Fixtures of the node tests: tiny test checkpoints, written once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cortex.runtime.testmodels import make_test_checkpoint, test_tokenizer

CheckpointFactory = Callable[[str], Path]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """Return `make(arch)`, which writes each test checkpoint once per session."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("node-checkpoints")

    def make(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_test_checkpoint(arch, root / arch, seed=0, tokenizer=test_tokenizer())
        return made[arch]

    return make
