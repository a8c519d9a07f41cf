"""Automatic claims: gaps first, then expert replicas with the fewest holders, within the budget."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cortex.node.claims import choose_fragments, fragment_sizes
from cortex.node.launcher import demo_layout
from cortex.runtime.loader import Loader

SIZES = {"head": 100, "block[0:3]": 300, "expert[1][0]": 10, "expert[1][1]": 10, "expert[2][0]": 10}


def test_claims_fill_gaps_first() -> None:
    chosen = choose_fragments(SIZES, holders={}, budget_bytes=1000)

    assert chosen == ["head", "block[0:3]", "expert[1][0]", "expert[1][1]", "expert[2][0]"]


def test_claims_skip_covered_head_and_blocks() -> None:
    holders = {"head": 1, "block[0:3]": 1, "expert[1][0]": 2, "expert[1][1]": 1}

    chosen = choose_fragments(SIZES, holders, budget_bytes=1000)

    assert chosen == ["expert[2][0]", "expert[1][1]", "expert[1][0]"]


def test_claims_respect_budget() -> None:
    chosen = choose_fragments(SIZES, holders={"head": 1}, budget_bytes=25)

    assert chosen == ["expert[1][0]", "expert[1][1]"]


def test_fragment_sizes_sum_to_checkpoint(checkpoint: Callable[[str], Path]) -> None:
    loader = Loader(checkpoint("deepseek_v3"), device="cpu")
    sizes = fragment_sizes(loader)
    total = sum(loader.checkpoint.info(name).nbytes for name in loader.checkpoint.weight_map)

    assert sum(sizes.values()) == total
    assert len([f for f in sizes if f.startswith("expert")]) == len(loader.moe_layers) * loader.num_experts


def test_demo_layout_two_replicas_per_expert() -> None:
    layout = demo_layout(num_layers=3, moe_layers=[1, 2], num_experts=16, nodes=4)

    assert layout[0] == ["head", "block[0:3]"]
    for layer in (1, 2):
        for expert in range(16):
            holders = [i for i, fragments in enumerate(layout) if f"expert[{layer}][{expert}]" in fragments]
            assert len(holders) == 2
            assert 0 not in holders
