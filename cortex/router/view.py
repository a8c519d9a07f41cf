"""Router view: for each MoE layer, which live peers serve each routed expert, and how they perform.

The view folds four event families:

- `membership`: presence (last-writer-wins by stamp) and the latest heartbeat time (a max),
  for liveness, as the Registry does;
- `shards`: the state of each `expert[l][e]` fragment per holder (last-writer-wins by stamp);
  head and block fragments are passed over;
- `records`: every expert in an `ExpertOutputProduced` or `ExpertBatchProduced` counts as
  one output of its author (the replica) with its rows, and the record is paired with the
  input record it replies to (`ExpertInputSent` or `ExpertBatchSent`: same layer, its experts
  among the input's, named in its refs) to give one latency sample: output time minus input time. The input then
  leaves the view, which keeps only inputs still waiting for their output;
- `requests`: a request's redundancy (`RequestSubmitted`) and whether it ended
  (`RequestCompleted`, `RequestFailed`, `RequestCancelled`), which gives each replica's count
  of open requests it served outputs for.

Every register is last-writer-wins by (lamport, author, seq), every counter a sum or a max
of events that each count once, and input/output pairs are matched whichever arrives first,
so the view is the same for every delivery order of one set of events.

Latency samples compare two authors' clocks (the sender's and the replica's), so clock skew
between peers shifts them. Liveness is a query against a `now_ms` the caller passes.
A request's end is taken from any author, unlike the Scheduler, which checks who may end it:
here it only changes a load figure.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from cortex.comm.records import (
    RECORDS,
    ExpertBatchProduced,
    ExpertBatchSent,
    ExpertInputSent,
    ExpertOutputProduced,
    StageInputSent,
    StageOutputProduced,
)
from cortex.registry import LIVENESS_TIMEOUT_MS
from cortex.scheduler.observations import DEFAULT_LATENCY_MS
from cortex.scheduler.request_events import (
    REQUESTS,
    RequestAccepted,
    RequestCancelled,
    RequestCompleted,
    RequestFailed,
    RequestSubmitted,
    RouteReplanned,
    TokenGenerated,
    request_id_for,
)
from events.codec import Event
from events.membership import MEMBERSHIP, PeerHeartbeat, PeerJoined, PeerLeft, SequenceSkipped
from events.shards import SHARDS, ShardClaimed, ShardLoaded, ShardReleased, parse_fragment
from events.views import Dispatcher

Stamp = tuple[int, str, int]
ExpertKey = tuple[str, int, int]  # (model_id, layer, expert)
_NO_STAMP: Stamp = (0, "", 0)

CLAIMED = "claimed"
LOADED = "loaded"
RELEASED = "released"


def _stamp(event: Event) -> Stamp:
    return (event.lamport, event.author, event.seq)


@dataclass
class Presence:
    """One peer's presence for liveness: joined, left, last heartbeat, equivocation."""

    joined: bool = False
    present: bool = False
    presence_stamp: Stamp = _NO_STAMP
    last_heartbeat_ms: int = -1
    equivocated_from_seq: int | None = None

    def to_json(self) -> list[Any]:
        return [self.joined, self.present, list(self.presence_stamp), self.last_heartbeat_ms, self.equivocated_from_seq]


@dataclass
class ReplicaStats:
    """Counts of one peer's work as an expert replica, from the events in this log."""

    expert_outputs: int = 0
    rows: int = 0
    latency_total_ms: int = 0
    latency_samples: int = 0
    last_output_ms: int = -1
    open_requests: int = 0

    @property
    def mean_latency_ms(self) -> float | None:
        """The mean of the latency samples, or None without any."""
        return self.latency_total_ms / self.latency_samples if self.latency_samples else None

    def to_json(self) -> list[int]:
        return [self.expert_outputs, self.rows, self.latency_total_ms, self.latency_samples, self.last_output_ms, self.open_requests]


@dataclass
class RequestRouting:
    """Routing facts of one request: its redundancy, whether it ended, and which replicas served it."""

    redundancy: int = 1
    redundancy_stamp: Stamp = _NO_STAMP
    ended: bool = False
    served_by: set[str] = field(default_factory=set)

    def to_json(self) -> list[Any]:
        return [self.redundancy, self.ended, sorted(self.served_by)]


@dataclass(frozen=True)
class _Output:
    """An expert output waiting for the input record it replies to."""

    replica: str
    layer: int
    experts: tuple[int, ...]
    time_ms: int


@dataclass
class RouterView:
    """Expert replicas per layer, replica load and latency, folded from events (see the module docstring)."""

    peers: dict[str, Presence] = field(default_factory=dict)
    experts: dict[ExpertKey, dict[str, tuple[str, Stamp]]] = field(default_factory=dict)
    stats: dict[str, ReplicaStats] = field(default_factory=dict)
    requests: dict[str, RequestRouting] = field(default_factory=dict)
    # Input record id -> (time_ms, layer, experts), for inputs no output has replied to yet. An
    # input leaves when its output arrives, so the map stays as small as the calls in flight.
    inputs: dict[str, tuple[int, int, tuple[int, ...]]] = field(default_factory=dict)
    # Input record id -> outputs that name it and arrived before it. Not part of `to_json`: an
    # output waits under every input it names that is not stored, and the entries under inputs
    # it does not reply to stay until those inputs arrive, so their count depends on delivery order.
    waiting: dict[str, list[_Output]] = field(default_factory=dict)

    # --- queries ------------------------------------------------------------------

    def is_live(self, peer_id: str, now_ms: int, timeout_ms: int = LIVENESS_TIMEOUT_MS) -> bool:
        """Return whether the peer joined, has not left, is not equivocating, and was heard from within `timeout_ms`."""
        presence = self.peers.get(peer_id)
        if presence is None or not presence.joined or not presence.present or presence.equivocated_from_seq is not None:
            return False
        return now_ms - presence.last_heartbeat_ms <= timeout_ms

    def replica_stats(self, peer_id: str) -> ReplicaStats:
        """Return the peer's replica figures (all zero for a peer that served nothing)."""
        return self.stats.get(peer_id) or ReplicaStats()

    def rank_key(self, peer_id: str) -> tuple[int, float, str]:
        """Return the sort key of a replica: open requests, then mean latency (DEFAULT_LATENCY_MS unmeasured), then id."""
        stats = self.replica_stats(peer_id)
        latency = stats.mean_latency_ms
        return (stats.open_requests, DEFAULT_LATENCY_MS if latency is None else latency, peer_id)

    def replicas(
        self, model_id: str, layer: int, expert: int, now_ms: int, *, timeout_ms: int = LIVENESS_TIMEOUT_MS
    ) -> list[str]:
        """Return the live peers that loaded expert[layer][expert] of the model, best first (`rank_key`)."""
        holders = self.experts.get((model_id, layer, expert), {})
        live = [peer for peer, (state, _stamp) in holders.items() if state == LOADED and self.is_live(peer, now_ms, timeout_ms)]
        return sorted(live, key=self.rank_key)

    def routing_table(self, model_id: str, now_ms: int, *, timeout_ms: int = LIVENESS_TIMEOUT_MS) -> dict[int, dict[int, tuple[str, ...]]]:
        """Map layer -> expert -> live replicas best first, for every expert of the model anyone claimed or loaded.

        An expert whose replicas are all dead, released or only claimed maps to an empty tuple.
        """
        table: dict[int, dict[int, tuple[str, ...]]] = {}
        for key in sorted(self.experts):
            model, layer, expert = key
            if model != model_id or all(state == RELEASED for state, _stamp in self.experts[key].values()):
                continue
            table.setdefault(layer, {})[expert] = tuple(self.replicas(model, layer, expert, now_ms, timeout_ms=timeout_ms))
        return table

    def models(self) -> list[str]:
        """Return the ids of models with at least one expert fragment claimed or loaded, sorted."""
        return sorted({key[0] for key, holders in self.experts.items() if any(s != RELEASED for s, _ in holders.values())})

    def experts_of(self, peer_id: str) -> list[ExpertKey]:
        """Return the (model_id, layer, expert) the peer loaded, sorted."""
        return sorted(key for key, holders in self.experts.items() if holders.get(peer_id, ("", _NO_STAMP))[0] == LOADED)

    def redundancy_of(self, request_id: str) -> int:
        """Return the redundancy the submitter asked for (1 when the request is unknown)."""
        routing = self.requests.get(request_id)
        return 1 if routing is None else routing.redundancy

    def load_of(self, peer_id: str) -> dict[str, Any]:
        """Return the peer's expert load and latency, for `cortex status`."""
        stats = self.replica_stats(peer_id)
        latency = stats.mean_latency_ms
        return {
            "experts_loaded": len(self.experts_of(peer_id)),
            "expert_outputs": stats.expert_outputs,
            "expert_rows": stats.rows,
            "open_expert_requests": stats.open_requests,
            "expert_latency_ms": None if latency is None else round(latency, 1),
        }

    def to_json(self) -> dict[str, Any]:
        """Return the whole state as JSON-ready data in a canonical order."""
        return {
            "peers": {peer: self.peers[peer].to_json() for peer in sorted(self.peers)},
            "experts": [
                [model, layer, expert, {peer: [state, list(stamp)] for peer, (state, stamp) in sorted(self.experts[(model, layer, expert)].items())}]
                for model, layer, expert in sorted(self.experts)
            ],
            "stats": {peer: self.stats[peer].to_json() for peer in sorted(self.stats)},
            "requests": {request: self.requests[request].to_json() for request in sorted(self.requests)},
            "inputs": len(self.inputs),
        }

    def digest(self) -> str:
        """Return a BLAKE2b-256 hex digest of the canonical state; equal views give equal digests."""
        return hashlib.blake2b(orjson.dumps(self.to_json(), option=orjson.OPT_SORT_KEYS), digest_size=32).hexdigest()

    # --- updates (used by the reducer) ----------------------------------------------

    def presence(self, peer_id: str) -> Presence:
        presence = self.peers.get(peer_id)
        if presence is None:
            presence = self.peers[peer_id] = Presence()
        return presence

    def replica(self, peer_id: str) -> ReplicaStats:
        stats = self.stats.get(peer_id)
        if stats is None:
            stats = self.stats[peer_id] = ReplicaStats()
        return stats

    def request(self, request_id: str) -> RequestRouting:
        routing = self.requests.get(request_id)
        if routing is None:
            routing = self.requests[request_id] = RequestRouting()
        return routing

    def add_latency(self, replica: str, input_ms: int, output_ms: int) -> None:
        stats = self.replica(replica)
        stats.latency_total_ms += max(output_ms - input_ms, 0)
        stats.latency_samples += 1


# --- handlers -----------------------------------------------------------------------


def _set_presence(view: RouterView, event: Event, present: bool) -> None:
    presence = view.presence(event.author)
    stamp = _stamp(event)
    if stamp > presence.presence_stamp:
        presence.present = present
        presence.presence_stamp = stamp


def _apply_peer_joined(view: RouterView, event: Event) -> RouterView:
    _set_presence(view, event, True)
    presence = view.presence(event.author)
    presence.joined = True
    presence.last_heartbeat_ms = max(presence.last_heartbeat_ms, event.time_ms)
    return view


def _apply_peer_heartbeat(view: RouterView, event: Event) -> RouterView:
    presence = view.presence(event.author)
    presence.last_heartbeat_ms = max(presence.last_heartbeat_ms, event.time_ms)
    return view


def _apply_peer_left(view: RouterView, event: Event) -> RouterView:
    _set_presence(view, event, False)
    return view


def _unchanged(view: RouterView, event: Event) -> RouterView:
    return view


def _apply_shard(view: RouterView, event: Event, state: str) -> RouterView:
    body = event.body
    fragment = parse_fragment(body.fragment)
    if fragment.kind != "expert":
        return view
    holders = view.experts.setdefault((body.model_id, fragment.layer, fragment.expert), {})
    stamp = _stamp(event)
    current = holders.get(event.author)
    if current is None or stamp > current[1]:
        holders[event.author] = (state, stamp)
    return view


def _apply_shard_claimed(view: RouterView, event: Event) -> RouterView:
    return _apply_shard(view, event, CLAIMED)


def _apply_shard_loaded(view: RouterView, event: Event) -> RouterView:
    return _apply_shard(view, event, LOADED)


def _apply_shard_released(view: RouterView, event: Event) -> RouterView:
    return _apply_shard(view, event, RELEASED)


def _apply_request_submitted(view: RouterView, event: Event) -> RouterView:
    body: RequestSubmitted = event.body
    routing = view.request(request_id_for(event.author, body.nonce))
    stamp = _stamp(event)
    if stamp > routing.redundancy_stamp:
        routing.redundancy = body.redundancy
        routing.redundancy_stamp = stamp
    return view


def _apply_request_ended(view: RouterView, event: Event) -> RouterView:
    routing = view.request(event.body.request_id)
    if not routing.ended:
        routing.ended = True
        for replica in routing.served_by:
            view.replica(replica).open_requests -= 1
    return view


def _experts_of(body: Any) -> tuple[int, ...]:
    """Return the experts a record names: one for `ExpertInputSent`/`ExpertOutputProduced`, a list for a batch record."""
    return tuple(body.experts) if isinstance(body, (ExpertBatchSent, ExpertBatchProduced)) else (body.expert,)


def _rows_of(body: Any) -> int:
    shapes = body.shapes if isinstance(body, ExpertBatchProduced) else (body.shape,)
    return sum(shape[0] if shape else 0 for shape in shapes)


def _replies_to(output_experts: tuple[int, ...], input_experts: tuple[int, ...]) -> bool:
    return set(output_experts) <= set(input_experts)


def _apply_expert_input(view: RouterView, event: Event) -> RouterView:
    body = event.body
    experts = _experts_of(body)
    replied = False
    for output in view.waiting.pop(event.id, ()):
        if output.layer == body.layer and _replies_to(output.experts, experts):
            view.add_latency(output.replica, event.time_ms, output.time_ms)
            replied = True
    if not replied:
        view.inputs[event.id] = (event.time_ms, body.layer, experts)
    return view


def _apply_expert_output(view: RouterView, event: Event) -> RouterView:
    body = event.body
    stats = view.replica(event.author)
    stats.expert_outputs += len(_experts_of(body))
    stats.rows += _rows_of(body)
    stats.last_output_ms = max(stats.last_output_ms, event.time_ms)
    if event.refs:
        routing = view.request(event.refs[0])
        if event.author not in routing.served_by:
            routing.served_by.add(event.author)
            if not routing.ended:
                stats.open_requests += 1
    _pair_output(view, event, body)
    return view


def _pair_output(view: RouterView, event: Event, body: Any) -> None:
    """Take one latency sample from the input this output replies to, or wait for that input.

    The matched input leaves the view: each input has one output, so no later event needs it.
    """
    # NOTE: a replica that signs two different outputs for one input breaks that rule: the
    # latency samples then depend on which output arrives first (its output counts do not).
    named = event.refs[1:]
    experts = _experts_of(body)
    for input_id in named:
        known = view.inputs.get(input_id)
        if known is not None and known[1] == body.layer and _replies_to(experts, known[2]):
            view.add_latency(event.author, known[0], event.time_ms)
            del view.inputs[input_id]
            return
    output = _Output(event.author, body.layer, experts, event.time_ms)
    for input_id in named:
        if input_id not in view.inputs:
            view.waiting.setdefault(input_id, []).append(output)


class RouterReducer:
    """The Router view's reducer: pure functions of (view, event) over membership, shards, requests and records."""

    families = frozenset({MEMBERSHIP, SHARDS, REQUESTS, RECORDS})
    """The event families the view projects; events of other families leave it unchanged."""

    def __init__(self) -> None:
        self._dispatch: Dispatcher[RouterView] = Dispatcher(
            "Router",
            families=self.families,
            handlers={
                PeerJoined: _apply_peer_joined,
                PeerHeartbeat: _apply_peer_heartbeat,
                PeerLeft: _apply_peer_left,
                SequenceSkipped: _unchanged,
                ShardClaimed: _apply_shard_claimed,
                ShardLoaded: _apply_shard_loaded,
                ShardReleased: _apply_shard_released,
                RequestSubmitted: _apply_request_submitted,
                RequestAccepted: _unchanged,
                RouteReplanned: _unchanged,
                TokenGenerated: _unchanged,
                RequestCompleted: _apply_request_ended,
                RequestFailed: _apply_request_ended,
                RequestCancelled: _apply_request_ended,
                ExpertInputSent: _apply_expert_input,
                ExpertOutputProduced: _apply_expert_output,
                ExpertBatchSent: _apply_expert_input,
                ExpertBatchProduced: _apply_expert_output,
                StageInputSent: _unchanged,
                StageOutputProduced: _unchanged,
            },
        )

    def empty(self) -> RouterView:
        return RouterView()

    def apply(self, view: RouterView, event: Event) -> RouterView:
        return self._dispatch(view, event)

    def apply_equivocation(self, view: RouterView, author: str, seq: int) -> RouterView:
        presence = view.presence(author)
        if presence.equivocated_from_seq is None or seq < presence.equivocated_from_seq:
            presence.equivocated_from_seq = seq
        return view
