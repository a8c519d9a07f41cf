"""Calls to a data-plane node running in another process, including after it is killed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from comm_helpers import EXPERT_FIELDS, REQUEST_ID, Node

from cortex.comm import ExpertInputSent, PeerTimeout

CHILD = Path(__file__).with_name("comm_server_child.py")


@pytest.fixture
def child(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    process = subprocess.Popen(
        [sys.executable, str(CHILD), str(tmp_path / "child")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=CHILD.parent,
    )
    try:
        assert process.stdout is not None
        peer_id, endpoint = process.stdout.readline().split()
        yield process, peer_id, endpoint
    finally:
        process.kill()
        process.wait(timeout=10)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


@pytest.mark.slow
async def test_call_to_killed_process_times_out(client: Node, child: tuple[subprocess.Popen[str], str, str]) -> None:
    process, peer_id, endpoint = child
    hidden = torch.randn(4, 64)

    async def call(timeout_s: float) -> torch.Tensor:
        reply = await client.dataplane.call(
            peer_id, endpoint, "expert", request_id=REQUEST_ID, record=ExpertInputSent,
            fields=EXPERT_FIELDS, tensors={"hidden": hidden}, timeout_s=timeout_s,
        )
        return reply.tensors["hidden"]

    assert torch.equal(await call(30.0), hidden)
    process.kill()
    await asyncio.to_thread(process.wait, 10)

    with pytest.raises(PeerTimeout):
        await call(0.5)
    assert client.dataplane.counters["call_timeouts"] == 1
