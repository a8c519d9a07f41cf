"""Session fixtures: tiny test checkpoints and their transformers reference outputs, made once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from runtime_reference import Reference, reference_outputs

from cortex.runtime.testmodels import make_test_checkpoint, test_tokenizer

CheckpointFactory = Callable[..., Path]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the previous count.

    These models are tiny: on a shared 2-core machine, a second torch thread
    mostly waits for a busy core, and a test runs ~20 times slower with it.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


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
            with one_thread():
                made[key] = make_test_checkpoint(arch, out, seed=0, fused=fused, tokenizer=tokenizer)
        return made[key]

    return make


@pytest.fixture(scope="session")
def reference(checkpoint: CheckpointFactory) -> Callable[..., Reference]:
    """Return `get(arch)`, the transformers reference outputs of a test checkpoint, computed once."""
    computed: dict[str, Reference] = {}

    def get(arch: str) -> Reference:
        if arch not in computed:
            with one_thread():
                computed[arch] = reference_outputs(checkpoint(arch))
        return computed[arch]

    return get
