"""Session fixtures: tiny test checkpoints and their transformers reference outputs, made once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runtime_reference import Reference, reference_outputs

from cortex.runtime.testmodels import make_test_checkpoint, test_tokenizer

CheckpointFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return test_tokenizer()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> CheckpointFactory:
    """Return `make(arch, fused=False)`, which writes each test checkpoint once per session."""
    made: dict[tuple[str, bool], Path] = {}
    root = tmp_path_factory.mktemp("checkpoints")

    def make(arch: str, fused: bool = False) -> Path:
        key = (arch, fused)
        if key not in made:
            out = root / f"{arch}{'-fused' if fused else ''}"
            made[key] = make_test_checkpoint(arch, out, seed=0, fused=fused, tokenizer=tokenizer)
        return made[key]

    return make


@pytest.fixture(scope="session")
def reference(checkpoint: CheckpointFactory) -> Callable[..., Reference]:
    """Return `get(arch)`, the transformers reference outputs of a test checkpoint, computed once."""
    computed: dict[str, Reference] = {}

    def get(arch: str) -> Reference:
        if arch not in computed:
            computed[arch] = reference_outputs(checkpoint(arch))
        return computed[arch]

    return get
