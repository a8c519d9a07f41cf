"""Membership events: a peer joins the swarm, proves it is alive, leaves, or voids seqs.

Family `membership`. The Registry view projects them into the peer table and liveness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from events.identity import curve_public_key_from_peer_id
from events.model import event_type

MEMBERSHIP = "membership"


@event_type(version="1.0", family=MEMBERSHIP)
@dataclass(frozen=True, slots=True)
class PeerJoined:
    """A peer announced itself: where to reach it and what it runs on.

    `curve_public_key` (Z85, 40 characters) must equal
    `events.identity.curve_public_key_from_peer_id(author)`; an event where it does not is
    rejected as malformed. It is carried so that readers of the log need no conversion.
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

    def check_envelope(self, author: str, seq: int) -> None:
        expected = curve_public_key_from_peer_id(author).decode()
        if self.curve_public_key != expected:
            raise ValueError(
                f"curve_public_key {self.curve_public_key!r} is not the CurveZMQ key of {author} ({expected!r})"
            )


@event_type(version="1.0", family=MEMBERSHIP)
@dataclass(frozen=True, slots=True)
class PeerHeartbeat:
    """A peer is alive. `latest_seq` is the seq of the author's previous event: seq - 1.

    A reader that stored fewer of the author's events than `latest_seq` has missed some and
    fetches them (see `LogStore.missing_ranges`).
    """

    latest_seq: int

    def __post_init__(self) -> None:
        if self.latest_seq < 0:
            raise ValueError(f"latest_seq must be >= 0, got {self.latest_seq}")

    def check_envelope(self, author: str, seq: int) -> None:
        if self.latest_seq != seq - 1:
            raise ValueError(f"latest_seq is {self.latest_seq}, but a heartbeat with seq {seq} must carry {seq - 1}")


@event_type(version="1.0", family=MEMBERSHIP)
@dataclass(frozen=True, slots=True)
class PeerLeft:
    """A peer left the swarm on purpose; `reason` is free text for operators."""

    reason: str = field(default="")


@event_type(version="1.0", family=MEMBERSHIP)
@dataclass(frozen=True, slots=True)
class SequenceSkipped:
    """The author declares its seqs `first` to `last` (inclusive) void: it will never sign them.

    `EventWriter` writes this after an unclean stop in an earlier OS boot (power loss or an
    OS crash), when events with seqs in that range may have been signed and published but
    are missing from the author's log. The writer resumes above the range, so no seq is
    reused. Peers that hold events from the range keep them as ordinary events, and
    `LogStore.missing_ranges` stops reporting the range, so peers stop requesting the rest.
    The range must end below the event's own seq.
    """

    first: int
    last: int

    def __post_init__(self) -> None:
        if self.first < 1:
            raise ValueError(f"first must be >= 1, got {self.first}")
        if self.last < self.first:
            raise ValueError(f"last must be >= first, got first {self.first} and last {self.last}")

    def check_envelope(self, author: str, seq: int) -> None:
        if self.last >= seq:
            raise ValueError(f"last is {self.last}, but a SequenceSkipped with seq {seq} may void only seqs below {seq}")
