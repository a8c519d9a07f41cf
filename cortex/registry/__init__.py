"""Registry: the view of peers, their shards and each model's coverage (see `view.py`)."""

from cortex.registry.view import (
    CLAIMED,
    LIVENESS_TIMEOUT_MS,
    LOADED,
    RELEASED,
    FragmentCoverage,
    PeerRecord,
    RegistryReducer,
    RegistryView,
    ShardRecord,
)

__all__ = [
    "CLAIMED",
    "LIVENESS_TIMEOUT_MS",
    "LOADED",
    "RELEASED",
    "FragmentCoverage",
    "PeerRecord",
    "RegistryReducer",
    "RegistryView",
    "ShardRecord",
]
