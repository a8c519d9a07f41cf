"""Registry view: who is in the swarm, what each peer serves, and how well each model is covered.

The view is a fold of the `membership` and `shards` event families. Every register in it is
last-writer-wins by the stamp (lamport, author, seq) of the event that set it, and every
counter is a max, so the view is the same for every delivery order of one set of events.
Released shards stay as tombstones for the same reason.

An author caught equivocating is marked (`PeerRecord.equivocated_from_seq`). It is never
live, so it serves no fragments, and the Acceptor stops applying its events from the
disputed seq on.

Liveness is a query against a `now_ms` that the caller passes, never stored state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from events.codec import Event
from events.identity import curve_public_key_from_peer_id
from events.membership import MEMBERSHIP, PeerHeartbeat, PeerJoined, PeerLeft, SequenceSkipped
from events.shards import SHARDS, ShardClaimed, ShardLoaded, ShardReleased
from events.views import Dispatcher

LIVENESS_TIMEOUT_MS = 15_000

Stamp = tuple[int, str, int]
_NO_STAMP: Stamp = (0, "", 0)

CLAIMED = "claimed"
LOADED = "loaded"
RELEASED = "released"


def _stamp(event: Event) -> Stamp:
    return (event.lamport, event.author, event.seq)


@dataclass
class PeerRecord:
    """The state of one peer. `announcement` is None until its PeerJoined arrives."""

    peer_id: str
    announcement: PeerJoined | None = None
    announcement_stamp: Stamp = _NO_STAMP
    present: bool = False
    presence_stamp: Stamp = _NO_STAMP
    last_heartbeat_ms: int = -1
    latest_seq: int = 0
    equivocated_from_seq: int | None = None

    @property
    def curve_public_key(self) -> bytes:
        """The peer's CurveZMQ public key (Z85), derived from its peer id."""
        return curve_public_key_from_peer_id(self.peer_id)

    def to_json(self) -> dict[str, Any]:
        announcement = self.announcement
        return {
            "announcement": None
            if announcement is None
            else {
                "bus_addresses": list(announcement.bus_addresses),
                "data_endpoint": announcement.data_endpoint,
                "curve_public_key": announcement.curve_public_key,
                "hardware": announcement.hardware,
                "protocol_version": announcement.protocol_version,
                "software_version": announcement.software_version,
            },
            "announcement_stamp": list(self.announcement_stamp),
            "present": self.present,
            "presence_stamp": list(self.presence_stamp),
            "last_heartbeat_ms": self.last_heartbeat_ms,
            "latest_seq": self.latest_seq,
            "equivocated_from_seq": self.equivocated_from_seq,
        }


@dataclass
class ShardRecord:
    """One peer's state for one fragment of one model: claimed, loaded or released."""

    holder: str
    model_id: str
    fragment: str
    state: str
    memory_bytes: int
    stamp: Stamp

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "memory_bytes": self.memory_bytes, "stamp": list(self.stamp)}


@dataclass(frozen=True)
class FragmentCoverage:
    """Live holders of one fragment: peers that loaded it and peers that only claimed it."""

    loaded: tuple[str, ...]
    claimed: tuple[str, ...]


@dataclass
class RegistryView:
    """Peers and shard states, folded from membership and shard events."""

    peers: dict[str, PeerRecord] = field(default_factory=dict)
    shards: dict[tuple[str, str, str], ShardRecord] = field(default_factory=dict)

    def peer(self, peer_id: str) -> PeerRecord:
        record = self.peers.get(peer_id)
        if record is None:
            record = self.peers[peer_id] = PeerRecord(peer_id)
        return record

    def is_live(self, peer_id: str, now_ms: int, timeout_ms: int = LIVENESS_TIMEOUT_MS) -> bool:
        """Return whether the peer joined, has not left, is not equivocating, and was heard from recently.

        "Recently" means its last heartbeat (or PeerJoined) time is within `timeout_ms` of
        `now_ms`. Times are the author's clock, so clock skew between peers shifts liveness.
        """
        record = self.peers.get(peer_id)
        if record is None or record.announcement is None or not record.present:
            return False
        if record.equivocated_from_seq is not None:
            return False
        return now_ms - record.last_heartbeat_ms <= timeout_ms

    def live_peers(self, now_ms: int, timeout_ms: int = LIVENESS_TIMEOUT_MS) -> list[str]:
        """Return the ids of live peers, sorted."""
        return sorted(peer_id for peer_id in self.peers if self.is_live(peer_id, now_ms, timeout_ms))

    def shards_of(self, peer_id: str) -> list[ShardRecord]:
        """Return the peer's claimed and loaded shards (not released), sorted by model and fragment."""
        records = [
            record for (holder, _model, _fragment), record in self.shards.items() if holder == peer_id and record.state != RELEASED
        ]
        return sorted(records, key=lambda record: (record.model_id, record.fragment))

    def models(self) -> list[str]:
        """Return the ids of models with at least one claimed or loaded fragment, sorted."""
        return sorted({record.model_id for record in self.shards.values() if record.state != RELEASED})

    def holders(
        self, model_id: str, fragment: str, now_ms: int, *, loaded_only: bool = True, timeout_ms: int = LIVENESS_TIMEOUT_MS
    ) -> list[str]:
        """Return the live peers that loaded (or, without `loaded_only`, also claimed) a fragment."""
        states = (LOADED,) if loaded_only else (LOADED, CLAIMED)
        return sorted(
            record.holder
            for record in self.shards.values()
            if record.model_id == model_id
            and record.fragment == fragment
            and record.state in states
            and self.is_live(record.holder, now_ms, timeout_ms)
        )

    def coverage(self, model_id: str, now_ms: int, timeout_ms: int = LIVENESS_TIMEOUT_MS) -> dict[str, FragmentCoverage]:
        """Map each fragment of `model_id` that anyone claimed or loaded to its live holders.

        A fragment whose holders all died stays in the map with empty tuples, so callers can
        see what lost coverage.
        """
        loaded: dict[str, list[str]] = {}
        claimed: dict[str, list[str]] = {}
        for record in self.shards.values():
            if record.model_id != model_id or record.state == RELEASED:
                continue
            loaded.setdefault(record.fragment, [])
            claimed.setdefault(record.fragment, [])
            if self.is_live(record.holder, now_ms, timeout_ms):
                (loaded if record.state == LOADED else claimed)[record.fragment].append(record.holder)
        return {
            fragment: FragmentCoverage(tuple(sorted(loaded[fragment])), tuple(sorted(claimed[fragment])))
            for fragment in sorted(loaded)
        }

    def to_json(self) -> dict[str, Any]:
        """Return the whole state as JSON-ready data with a canonical order."""
        return {
            "peers": {peer_id: self.peers[peer_id].to_json() for peer_id in sorted(self.peers)},
            "shards": [
                [holder, model_id, fragment, self.shards[(holder, model_id, fragment)].to_json()]
                for holder, model_id, fragment in sorted(self.shards)
            ],
        }

    def digest(self) -> str:
        """Return a BLAKE2b-256 hex digest of the canonical state; equal views give equal digests."""
        return hashlib.blake2b(orjson.dumps(self.to_json(), option=orjson.OPT_SORT_KEYS), digest_size=32).hexdigest()


def _apply_peer_joined(view: RegistryView, event: Event) -> RegistryView:
    record = view.peer(event.author)
    stamp = _stamp(event)
    if stamp > record.announcement_stamp:
        record.announcement = event.body
        record.announcement_stamp = stamp
    if stamp > record.presence_stamp:
        record.present = True
        record.presence_stamp = stamp
    record.last_heartbeat_ms = max(record.last_heartbeat_ms, event.time_ms)
    record.latest_seq = max(record.latest_seq, event.seq)
    return view


def _apply_peer_heartbeat(view: RegistryView, event: Event) -> RegistryView:
    body: PeerHeartbeat = event.body
    record = view.peer(event.author)
    record.last_heartbeat_ms = max(record.last_heartbeat_ms, event.time_ms)
    record.latest_seq = max(record.latest_seq, event.seq, body.latest_seq)
    return view


def _apply_peer_left(view: RegistryView, event: Event) -> RegistryView:
    record = view.peer(event.author)
    stamp = _stamp(event)
    if stamp > record.presence_stamp:
        record.present = False
        record.presence_stamp = stamp
    record.latest_seq = max(record.latest_seq, event.seq)
    return view


def _apply_sequence_skipped(view: RegistryView, event: Event) -> RegistryView:
    # The view keeps no per-seq state, so the voided range changes nothing. The event is the
    # author's latest like any other, so only latest_seq follows it. A skip does not count as
    # a heartbeat: the node that writes it is starting, and its PeerJoined proves liveness.
    record = view.peer(event.author)
    record.latest_seq = max(record.latest_seq, event.seq)
    return view


def _apply_shard_state(view: RegistryView, event: Event, state: str, memory_bytes: int) -> RegistryView:
    body = event.body
    key = (event.author, body.model_id, body.fragment)
    stamp = _stamp(event)
    current = view.shards.get(key)
    if current is None or stamp > current.stamp:
        view.shards[key] = ShardRecord(event.author, body.model_id, body.fragment, state, memory_bytes, stamp)
    record = view.peer(event.author)
    record.latest_seq = max(record.latest_seq, event.seq)
    return view


def _apply_shard_claimed(view: RegistryView, event: Event) -> RegistryView:
    return _apply_shard_state(view, event, CLAIMED, event.body.memory_bytes)


def _apply_shard_loaded(view: RegistryView, event: Event) -> RegistryView:
    return _apply_shard_state(view, event, LOADED, event.body.memory_bytes)


def _apply_shard_released(view: RegistryView, event: Event) -> RegistryView:
    return _apply_shard_state(view, event, RELEASED, 0)


class RegistryReducer:
    """The Registry view's reducer: pure functions of (view, event) for membership and shards."""

    def __init__(self) -> None:
        self._dispatch: Dispatcher[RegistryView] = Dispatcher(
            "Registry",
            families={MEMBERSHIP, SHARDS},
            handlers={
                PeerJoined: _apply_peer_joined,
                PeerHeartbeat: _apply_peer_heartbeat,
                PeerLeft: _apply_peer_left,
                SequenceSkipped: _apply_sequence_skipped,
                ShardClaimed: _apply_shard_claimed,
                ShardLoaded: _apply_shard_loaded,
                ShardReleased: _apply_shard_released,
            },
        )

    def empty(self) -> RegistryView:
        return RegistryView()

    def apply(self, view: RegistryView, event: Event) -> RegistryView:
        return self._dispatch(view, event)

    def apply_equivocation(self, view: RegistryView, author: str, seq: int) -> RegistryView:
        record = view.peer(author)
        if record.equivocated_from_seq is None or seq < record.equivocated_from_seq:
            record.equivocated_from_seq = seq
        return view
