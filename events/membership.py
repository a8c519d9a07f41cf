"""Membership events: a peer joins the swarm, proves it is alive, and leaves.

Family `membership`. The Registry view projects them into the peer table and liveness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from events.model import event_type

MEMBERSHIP = "membership"


@event_type(version="1.0", family=MEMBERSHIP)
@dataclass(frozen=True, slots=True)
class PeerJoined:
    """A peer announced itself: where to reach it and what it runs on.

    `curve_public_key` (Z85, 40 characters) is what the author announces. It must equal
    `events.identity.curve_public_key_from_peer_id(author)`, and consumers use that derived
    key (`PeerRecord.curve_public_key` in the Registry), never the announced one.
    `protocol_version` is the schema version the node speaks, such as "1.0".
    """

    bus_addresses: tuple[str, ...]
    data_endpoint: str
    curve_public_key: str
    hardware: dict[str, int | str | bool]
    protocol_version: str
    software_version: str

    def __post_init__(self) -> None:
        if len(self.curve_public_key) != 40:
            raise ValueError(f"curve_public_key must be 40 Z85 characters, got {len(self.curve_public_key)}")


@event_type(version="1.0", family=MEMBERSHIP)
@dataclass(frozen=True, slots=True)
class PeerHeartbeat:
    """A peer is alive. `latest_seq` is the seq of the author's previous event (0 if none).

    A reader that stored fewer of the author's events than `latest_seq` has missed some and
    fetches them (see `LogStore.missing_ranges`).
    """

    latest_seq: int

    def __post_init__(self) -> None:
        if self.latest_seq < 0:
            raise ValueError(f"latest_seq must be >= 0, got {self.latest_seq}")


@event_type(version="1.0", family=MEMBERSHIP)
@dataclass(frozen=True, slots=True)
class PeerLeft:
    """A peer left the swarm on purpose; `reason` is free text for operators."""

    reason: str = field(default="")
