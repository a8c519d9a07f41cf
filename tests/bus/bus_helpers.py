"""Helpers shared by the bus tests."""

from __future__ import annotations

import threading

from cortex.bus.libp2p_transport import Libp2pConfig
from events.identity import Identity


def thread_names() -> set[str]:
    return {thread.name for thread in threading.enumerate()}


def libp2p_config(identity: Identity, quic: bool, bootstrap: list[str] | None = None) -> Libp2pConfig:
    if quic:
        return Libp2pConfig.for_quic(identity.to_libp2p_key_pair(), bootstrap=bootstrap or [])
    return Libp2pConfig(key_pair=identity.to_libp2p_key_pair(), bootstrap=bootstrap or [])
