"""Fragment specs: the strings that name a part of a model a node can hold.

- `head`: token embeddings, final norm and LM head.
- `block[a:b]`: decoder layers a to b-1 (half-open, like a Python slice).
- `expert[l][e]`: routed expert e of MoE layer l.

`parse_fragment_spec` checks the syntax; `check_fragment_spec` checks a parsed
spec against a model's layer count, MoE layers and experts per layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from cortex.runtime.errors import FragmentSpecError

_BLOCK = re.compile(r"block\[(\d+):(\d+)\]")
_EXPERT = re.compile(r"expert\[(\d+)\]\[(\d+)\]")
SYNTAX = "'head', 'block[a:b]' (layers a to b-1) or 'expert[l][e]' (expert e of layer l)"


@dataclass(frozen=True)
class HeadSpec:
    """The head fragment: embeddings, final norm, LM head."""

    def __str__(self) -> str:
        return "head"


@dataclass(frozen=True)
class BlockSpec:
    """Decoder layers `start` to `stop - 1`."""

    start: int
    stop: int

    def __str__(self) -> str:
        return f"block[{self.start}:{self.stop}]"


@dataclass(frozen=True)
class ExpertSpec:
    """Routed expert `expert` of layer `layer`."""

    layer: int
    expert: int

    def __str__(self) -> str:
        return f"expert[{self.layer}][{self.expert}]"


FragmentSpec = HeadSpec | BlockSpec | ExpertSpec


def parse_fragment_spec(text: str) -> FragmentSpec:
    """Parse `head`, `block[a:b]` or `expert[l][e]`; raise `FragmentSpecError` on anything else."""
    cleaned = text.strip()
    if cleaned == "head":
        return HeadSpec()
    block = _BLOCK.fullmatch(cleaned)
    if block is not None:
        start, stop = int(block.group(1)), int(block.group(2))
        if start >= stop:
            raise FragmentSpecError(
                f"fragment spec {text!r} is an empty block: layers {start} to {stop - 1}; write block[a:b] with a < b"
            )
        return BlockSpec(start, stop)
    expert = _EXPERT.fullmatch(cleaned)
    if expert is not None:
        return ExpertSpec(int(expert.group(1)), int(expert.group(2)))
    raise FragmentSpecError(f"invalid fragment spec {text!r}; expected {SYNTAX}")


def check_fragment_spec(
    spec: FragmentSpec, num_layers: int, is_moe_layer: Callable[[int], bool], num_experts: int
) -> None:
    """Raise `FragmentSpecError` if `spec` names layers or experts the model does not have."""
    if isinstance(spec, BlockSpec) and spec.stop > num_layers:
        raise FragmentSpecError(
            f"{spec} ends after the last layer: the model has {num_layers} layers (0 to {num_layers - 1}), "
            f"so the largest block is block[0:{num_layers}]"
        )
    if isinstance(spec, ExpertSpec):
        if spec.layer >= num_layers:
            raise FragmentSpecError(
                f"{spec} names layer {spec.layer}, but the model has {num_layers} layers (0 to {num_layers - 1})"
            )
        if not is_moe_layer(spec.layer):
            moe = [layer for layer in range(num_layers) if is_moe_layer(layer)]
            raise FragmentSpecError(
                f"{spec} names layer {spec.layer}, which is a dense layer without routed experts; "
                f"MoE layers of this model: {moe if moe else 'none'}"
            )
        if spec.expert >= num_experts:
            raise FragmentSpecError(
                f"{spec} names expert {spec.expert}, but each MoE layer has {num_experts} experts "
                f"(0 to {num_experts - 1})"
            )
