"""Fixtures for event core tests: identities, a real SQLite log, an acceptor with the Registry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cortex.registry import RegistryReducer, RegistryView
from events import Acceptor, Identity, LogStore, Projection


@pytest.fixture(scope="session")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="session")
def bob() -> Identity:
    return Identity.generate()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LogStore]:
    log_store = LogStore(tmp_path / "events.db")
    yield log_store
    log_store.close()


@pytest.fixture
def registry() -> Projection[RegistryView]:
    return Projection(RegistryReducer())


@pytest.fixture
def acceptor(store: LogStore, registry: Projection[RegistryView]) -> Acceptor:
    return Acceptor(store, [registry])
