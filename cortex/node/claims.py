"""Automatic fragment claims: fill coverage gaps first, then add expert replicas, within a budget.

A node configured with `fragments: auto` looks at the Registry's coverage of the model
and picks, in this order, until its memory budget is spent:

1. fragments nobody holds: the head, then the blocks, then experts by (layer, expert);
2. expert replicas, fewest holders first, ties by (layer, expert).

Sizes are the bytes of each fragment's tensors in the checkpoint (at the checkpoint's
dtype). Blocks are claimed whole (all decoder layers in one `block[0:L]`).

NOTE: nodes that start at the same moment read the same coverage and may pick the same
gaps. A claim is published as `ShardClaimed` before loading, so a node that starts later
skips it, but simultaneous starts can still overlap until a rebalancer exists.
"""

from __future__ import annotations

from collections.abc import Mapping

from cortex.runtime.loader import Loader


def fragment_sizes(loader: Loader) -> dict[str, int]:
    """Return the checkpoint bytes of `head`, `block[0:L]` and every `expert[l][e]`."""
    layers = loader.num_layers
    sizes: dict[str, int] = {"head": 0, f"block[0:{layers}]": 0}
    experts = {(layer, index) for layer in loader.moe_layers for index in range(loader.num_experts)}
    for (layer, index) in experts:
        sizes[f"expert[{layer}][{index}]"] = 0
    for name in loader.checkpoint.weight_map:
        nbytes = loader.checkpoint.info(name).nbytes
        parts = name.split(".")
        if len(parts) > 3 and parts[1] == "layers":
            layer = int(parts[2])
            if "experts" in parts:
                position = parts.index("experts")
                if parts[position + 1].isdigit():
                    sizes[f"expert[{layer}][{int(parts[position + 1])}]"] += nbytes
                else:  # fused: one tensor holds every expert of the layer
                    for index in range(loader.num_experts):
                        sizes[f"expert[{layer}][{index}]"] += nbytes // max(loader.num_experts, 1)
                continue
            sizes[f"block[0:{layers}]"] += nbytes
        else:
            sizes["head"] += nbytes
    return sizes


def choose_fragments(sizes: Mapping[str, int], holders: Mapping[str, int], budget_bytes: int) -> list[str]:
    """Pick fragments to claim: gaps (0 holders) first, then replicas with fewest holders."""
    def order(fragment: str) -> tuple[int, int, tuple[int, ...]]:
        kind = 0 if fragment == "head" else 1 if fragment.startswith("block") else 2
        numbers = tuple(int(part) for part in fragment.replace("]", "[").replace(":", "[").split("[") if part.isdigit())
        return (holders.get(fragment, 0), kind, numbers)

    chosen: list[str] = []
    spent = 0
    for fragment in sorted(sizes, key=order):
        is_gap = holders.get(fragment, 0) == 0
        if not is_gap and not fragment.startswith("expert"):
            continue
        if spent + sizes[fragment] <= budget_bytes:
            chosen.append(fragment)
            spent += sizes[fragment]
    return chosen
