"""Fixtures for data-plane tests: nodes started on loopback and closed after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from comm_helpers import Node, NodeFactory, echo_expert, make_node


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """Build nodes on demand (the test starts them) and close every one after the test."""
    built: list[Node] = []

    def build(**options: object) -> Node:
        node = make_node(tmp_path / f"node{len(built)}", **options)  # type: ignore[arg-type]
        built.append(node)
        return node

    yield build
    for node in built:
        await node.dataplane.close()
        node.store.close()


@pytest.fixture
async def server(nodes: NodeFactory) -> Node:
    """A started node serving the echo expert handler on 127.0.0.1."""
    node = nodes()
    node.dataplane.register_handler("expert", echo_expert)
    await node.dataplane.start()
    return node


@pytest.fixture
async def client(nodes: NodeFactory) -> Node:
    """A started node used as the caller."""
    node = nodes()
    await node.dataplane.start()
    return node
