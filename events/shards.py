"""Shard events and the fragment spec they name.

Family `shards`. A peer claims a fragment of a model (it intends to serve it), reports it
loaded (it serves it now), and releases it. `memory_bytes` is the memory the fragment takes
on that peer: an estimate in ShardClaimed, the measured size in ShardLoaded.

Fragment specs, written without spaces:

    head            embeddings, final norm and LM head
    block[a:b]      decoder layers a to b-1, 0 <= a < b
    expert[l][e]    routed expert e of layer l
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from events.model import event_type

SHARDS = "shards"

_FRAGMENT_PATTERN = re.compile(r"head|block\[(0|[1-9][0-9]*):(0|[1-9][0-9]*)\]|expert\[(0|[1-9][0-9]*)\]\[(0|[1-9][0-9]*)\]")


@dataclass(frozen=True, slots=True)
class Fragment:
    """A parsed fragment spec. `kind` is "head", "block" or "expert"."""

    kind: str
    start: int = 0
    stop: int = 0
    layer: int = 0
    expert: int = 0

    def __str__(self) -> str:
        if self.kind == "block":
            return f"block[{self.start}:{self.stop}]"
        if self.kind == "expert":
            return f"expert[{self.layer}][{self.expert}]"
        return "head"

    @property
    def layers(self) -> range:
        """The decoder layers of a block (empty for head and experts)."""
        return range(self.start, self.stop) if self.kind == "block" else range(0)


def parse_fragment(spec: str) -> Fragment:
    """Parse `head`, `block[a:b]` or `expert[l][e]`; raise ValueError on anything else."""
    match = _FRAGMENT_PATTERN.fullmatch(spec)
    if match is None:
        raise ValueError(f"fragment {spec!r} is not one of head, block[a:b], expert[l][e]")
    if spec == "head":
        return Fragment("head")
    if match.group(1) is not None:
        start, stop = int(match.group(1)), int(match.group(2))
        if start >= stop:
            raise ValueError(f"fragment {spec!r} is an empty block: start {start} must be below stop {stop}")
        return Fragment("block", start=start, stop=stop)
    return Fragment("expert", layer=int(match.group(3)), expert=int(match.group(4)))


def _check_shard(model_id: str, fragment: str, memory_bytes: int) -> None:
    if not model_id:
        raise ValueError("model_id must not be empty")
    parse_fragment(fragment)
    if memory_bytes < 0:
        raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")


@event_type(version="1.0", family=SHARDS)
@dataclass(frozen=True, slots=True)
class ShardClaimed:
    """The author intends to serve `fragment` of `model_id`, needing about `memory_bytes`."""

    model_id: str
    fragment: str
    memory_bytes: int

    def __post_init__(self) -> None:
        _check_shard(self.model_id, self.fragment, self.memory_bytes)


@event_type(version="1.0", family=SHARDS)
@dataclass(frozen=True, slots=True)
class ShardLoaded:
    """The author has loaded `fragment` of `model_id` and serves it; it takes `memory_bytes`."""

    model_id: str
    fragment: str
    memory_bytes: int

    def __post_init__(self) -> None:
        _check_shard(self.model_id, self.fragment, self.memory_bytes)


@event_type(version="1.0", family=SHARDS)
@dataclass(frozen=True, slots=True)
class ShardReleased:
    """The author no longer serves or claims `fragment` of `model_id`."""

    model_id: str
    fragment: str
    reason: str = field(default="")

    def __post_init__(self) -> None:
        _check_shard(self.model_id, self.fragment, 0)
