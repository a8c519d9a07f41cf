"""Fault modes: parsing, and the block_scale mode on block outputs and expert outputs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from cortex.node.faults import FaultInjector, FaultMode, FaultSpecError, parse_fault


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("block_scale=1.1", FaultMode("block_scale", 1.1)),
        ("block_scale=1.1,calls=2", FaultMode("block_scale", 1.1, 2)),
        ("scale=1.0001", FaultMode("scale", 1.0001)),
        ("nan", FaultMode("nan")),
    ],
)
def test_parse_fault_modes(text: str, mode: FaultMode) -> None:
    assert parse_fault(text) == mode


@pytest.mark.parametrize("text", ["block_scale", "block_scale=x", "blocks=1.1", "nan=2", "zeros,calls=0"])
def test_parse_fault_rejects_malformed(text: str) -> None:
    with pytest.raises(FaultSpecError):
        parse_fault(text)


def test_block_scale_scales_block_steps_only() -> None:
    injector = FaultInjector(parse_fault("block_scale=2,calls=2"))
    hidden = torch.ones(3, 4)
    output = torch.full((3, 4), 5.0)
    service: Any = None

    expert_outputs = asyncio.run(injector.apply(service, [(1, 0, hidden)], [output]))

    assert torch.equal(expert_outputs[0], output)
    assert torch.equal(injector.apply_block(hidden), hidden * 2)
    assert torch.equal(injector.apply_block(hidden), hidden * 2)
    assert torch.equal(injector.apply_block(hidden), hidden)  # past calls=2


def test_expert_modes_leave_block_steps() -> None:
    injector = FaultInjector(parse_fault("scale=1.1"))
    hidden = torch.ones(2, 4)

    assert torch.equal(injector.apply_block(hidden), hidden)


def test_fault_mode_warns_at_start(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="cortex.node.faults"):
        FaultInjector(parse_fault("scale=1.1,calls=3"))
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "fault mode scale=1.1 is on for the first 3 calls" in warnings[0].getMessage()
    assert "quorum.fault" in warnings[0].getMessage()


def test_no_fault_mode_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("DEBUG", logger="cortex.node.faults"):
        FaultInjector(None)
    assert caplog.records == []
