"""Fault modes for tests: a node that serves wrong, slow or drifting expert outputs, or votes falsely.

A node config's `fault:` key (test-only, see docs/quorum.md) names one mode, with an
optional `,calls=N` suffix that limits it to the first N expert calls the node serves:

    scale=F        multiply every expert output by F (1.10 is a fault, 1.0001 honest-looking drift)
    noise=S        add Gaussian noise of S times the output's standard deviation
    nan            return NaN everywhere
    other_expert   return another held expert's output for the same rows
    zeros          return zeros
    delay=S        wait S seconds before replying
    bfloat16       compute the expert under bfloat16 autocast and reply in bfloat16
    wrong_voter    serve honestly, but publish inverted quorum votes and decisions
    block_scale=F  serve experts honestly, but multiply the output of every block step by F

Faults act on the expert calls the node serves to other peers (`FaultInjector.apply`).
`block_scale` acts on the block steps it serves to other peers (`FaultInjector.apply_block`).
A node's calls to its own experts and blocks stay honest. With `,calls=N`, `block_scale` counts
block steps instead of expert calls. This module imports no torch at import time,
so config validation stays light.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from cortex.node.service import ModelService

logger = logging.getLogger(__name__)

VALUED = {"scale", "noise", "delay", "block_scale"}
PLAIN = {"nan", "other_expert", "zeros", "bfloat16", "wrong_voter"}
KINDS = tuple(sorted(VALUED | PLAIN))


class FaultSpecError(ValueError):
    """A `fault:` value that names no known mode or has a bad number."""


@dataclass(frozen=True)
class FaultMode:
    """A parsed fault: its kind, its number (scale, noise or delay), and how many calls it lasts."""

    kind: str
    value: float = 0.0
    calls: int | None = None  # None: every call

    @property
    def lying(self) -> bool:
        return self.kind == "wrong_voter"


def parse_fault(text: str) -> FaultMode:
    """Parse `KIND[=VALUE][,calls=N]`; raise FaultSpecError naming the problem and the known kinds."""
    head, _, suffix = text.strip().partition(",")
    kind, _, raw_value = head.partition("=")
    kind = kind.strip()
    if kind not in VALUED | PLAIN:
        raise FaultSpecError(f"fault {text!r} names no known mode; use one of {', '.join(KINDS)}")
    if (kind in VALUED) != bool(raw_value):
        form = f"{kind}=NUMBER" if kind in VALUED else kind
        raise FaultSpecError(f"fault {text!r} is malformed; write it as {form}")
    value = 0.0
    if raw_value:
        try:
            value = float(raw_value)
        except ValueError:
            raise FaultSpecError(f"fault {text!r}: {raw_value!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise FaultSpecError(f"fault {text!r}: the number must be finite and >= 0")
    calls = None
    if suffix:
        key, _, count = suffix.partition("=")
        if key.strip() != "calls" or not count.strip().isdigit() or int(count) < 1:
            raise FaultSpecError(f"fault {text!r}: the suffix must be ,calls=N with N >= 1")
        calls = int(count)
    return FaultMode(kind, value, calls)


class FaultInjector:
    """Applies a node's fault mode to the expert outputs it serves."""

    def __init__(self, mode: FaultMode | None) -> None:
        self.mode = mode
        self.served = 0
        self.served_blocks = 0
        if mode is not None:
            value = f"={mode.value:g}" if mode.kind in VALUED else ""
            lasting = "every call" if mode.calls is None else f"the first {mode.calls} calls"
            logger.warning(
                "fault mode %s%s is on for %s: this node deliberately serves faulty results to other peers "
                "(the test-only quorum.fault setting); remove it from the config outside tests",
                mode.kind, value, lasting,
            )

    @property
    def lying(self) -> bool:
        return self.mode is not None and self.mode.lying

    async def apply(
        self, service: ModelService, segments: Sequence[tuple[int, int, torch.Tensor]], outputs: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Return the outputs [N, D] to reply with for segments (layer, expert, rows [N, D])."""
        mode = self.mode
        self.served += 1
        if mode is None or mode.kind in ("wrong_voter", "block_scale") or (mode.calls is not None and self.served > mode.calls):
            return outputs
        logger.warning("fault mode %s: altering expert call %d", mode.kind, self.served)
        if mode.kind == "delay":
            await asyncio.sleep(mode.value)
            return outputs
        return [_altered(mode, service, layer, expert, rows, output, self.served) for (layer, expert, rows), output in zip(segments, outputs, strict=True)]

    def apply_block(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return the block output [T, D] to reply with for a block step served to another peer."""
        mode = self.mode
        if mode is None or mode.kind != "block_scale":
            return hidden
        self.served_blocks += 1
        if mode.calls is not None and self.served_blocks > mode.calls:
            return hidden
        logger.warning("fault mode block_scale: altering block step %d", self.served_blocks)
        return hidden * mode.value


def _altered(
    mode: FaultMode, service: ModelService, layer: int, expert: int, rows: torch.Tensor, output: torch.Tensor, call: int
) -> torch.Tensor:
    import torch

    if mode.kind == "scale":
        return output * mode.value
    if mode.kind == "noise":
        generator = torch.Generator().manual_seed(call)
        return output + mode.value * output.std() * torch.randn(output.shape, generator=generator, dtype=output.dtype)
    if mode.kind == "nan":
        return torch.full_like(output, math.nan)
    if mode.kind == "zeros":
        return torch.zeros_like(output)
    if mode.kind == "other_expert":
        others = sorted(index for index in service.experts.get(layer, {}) if index != expert)
        if not others:
            raise RuntimeError(f"fault other_expert needs a second expert of layer {layer} on this node, but it serves only expert {expert}; give it more experts")
        return service.run_expert(layer, others[0], rows)
    if mode.kind == "bfloat16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            computed = service.run_expert(layer, expert, rows)
        return computed.to(torch.bfloat16)
    raise AssertionError(f"unhandled fault mode {mode.kind}")
