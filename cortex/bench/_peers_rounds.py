"""Timing of `cortex bench peers`: the two systems in alternating rounds of layer calls.

Other processes on a shared machine slow every process wake-up, and their load changes
from second to second. So the bench does not time one system after the other: for each
batch size it warms both up, then alternates rounds of `ROUND_CALLS` timed calls, Cortex
first, until each system has `repeats` samples. Load changes then hit both systems alike,
and the ratio of their medians stays comparable. All servers of both systems run the whole
time, idle while the other system is timed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cortex.bench._peers_cortex import CortexMoeLayer
from cortex.bench._subprocesses import Child, ChildFailed

logger = logging.getLogger(__name__)

ROUND_CALLS = 5
REPORT_TIMEOUT_S = 120.0


class HivemindClient:
    """The hivemind client process, driven by JSON commands; `failure` is set once it fails."""

    def __init__(self, child: Child, call_timeout_s: float) -> None:
        self.child = child
        self.call_timeout_s = call_timeout_s
        self.failure: str | None = None

    def run(self, batch: str, calls: int) -> list[float]:
        """Run `calls` layer calls on `batch` and return their times in ms; [] once the client failed."""
        if self.failure is not None:
            return []
        try:
            self.child.send_line(json.dumps({"batch": batch, "calls": calls}))
            times: list[float] = self.child.read_json("times_ms", REPORT_TIMEOUT_S + calls * self.call_timeout_s)["times_ms"]
        except (ChildFailed, BrokenPipeError) as error:
            self.failure = f"client failed: {error}"
            logger.error("hivemind %s", self.failure)
            return []
        return times

    def finish(self, outputs_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Stop the client's command loop; return its settings and each batch's last output."""
        self.child.send_line(json.dumps({"done": True}))
        settings: dict[str, Any] = self.child.read_json("settings", REPORT_TIMEOUT_S)["settings"]
        outputs: dict[str, torch.Tensor] = torch.load(outputs_path, weights_only=True)
        return settings, outputs


@dataclass
class Measurement:
    """Times per batch name of each system, Cortex's last outputs, and its calls per layer."""

    cortex_times_ms: dict[str, list[float]] = field(default_factory=dict)
    hivemind_times_ms: dict[str, list[float]] = field(default_factory=dict)
    cortex_outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    cortex_calls_per_layer: dict[str, float] = field(default_factory=dict)


async def measure_alternating(
    layer: CortexMoeLayer,
    hivemind: HivemindClient | None,
    inputs: dict[str, torch.Tensor],
    top_k: int,
    repeats: int,
    warmup: int,
) -> Measurement:
    """Time both systems on each batch in alternating rounds; hivemind is skipped if None or failed."""
    measurement = Measurement()
    for name, batch in inputs.items():
        await _cortex_calls(layer, batch, top_k, warmup)
        if hivemind is not None and warmup:
            await asyncio.to_thread(hivemind.run, name, warmup)
        calls_before = layer.counters.get("calls_sent", 0)
        cortex_samples: list[float] = []
        hivemind_samples: list[float] = []
        while len(cortex_samples) < repeats:
            count = min(ROUND_CALLS, repeats - len(cortex_samples))
            cortex_samples += await _cortex_calls(layer, batch, top_k, count, measurement.cortex_outputs, name)
            if hivemind is not None:
                hivemind_samples += await asyncio.to_thread(hivemind.run, name, count)
        measurement.cortex_times_ms[name] = cortex_samples
        measurement.hivemind_times_ms[name] = hivemind_samples
        measurement.cortex_calls_per_layer[name] = (layer.counters.get("calls_sent", 0) - calls_before) / repeats
    return measurement


async def _cortex_calls(
    layer: CortexMoeLayer,
    batch: torch.Tensor,
    top_k: int,
    count: int,
    outputs: dict[str, torch.Tensor] | None = None,
    name: str = "",
) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        output = await layer.forward(batch, top_k)
        samples.append((time.perf_counter() - started) * 1000.0)
        if outputs is not None:
            outputs[name] = output
    return samples
