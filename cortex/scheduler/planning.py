"""Planning inputs and choices: the driver of a request, holder costs, and expert replica ranking.

Everything here is a pure function of the views, a caller-passed `now_ms`, and optional
local inputs (`PeerObservations`, a trust mapping). Ties break by peer id, so equal
inputs give equal choices on every node.

Driver order (rendezvous hashing): the live head holders of the model, ranked by
BLAKE2b-128 of `request_id + "\\n" + peer_id`, highest first, ties by peer id. If the
submitter holds the head and is live, it goes first. The first peer is the driver; if it
dies, the order computed again at a later `now_ms` no longer contains it, so the next peer
takes over. Each peer's rank depends only on the request id and its own id, so peers joining
or leaving never reorder the others.

Holder cost, lower is better (constants below):

    cost = (latency_ms + LOAD_PENALTY_MS * load) / trust

`latency_ms` is this node's smoothed round trip to the peer (DEFAULT_LATENCY_MS if never
measured, 0 for this node itself). `load` is the number of in-flight requests whose route
uses the peer (from the Scheduler view, the same on every node) plus this node's own calls in
flight to it. `trust` comes from the caller (DEFAULT_TRUST when absent); a peer whose trust
is at or below `min_trust` is never chosen.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cortex.registry import RegistryView
from cortex.scheduler.errors import NoLiveHeadHolder
from cortex.scheduler.observations import DEFAULT_LATENCY_MS, PeerObservations
from cortex.scheduler.request_events import RequestAccepted, RouteReplanned, plan_digest
from cortex.scheduler.view import SchedulerView
from events.shards import parse_fragment

LOAD_PENALTY_MS = 5.0  # cost of one in-flight request or call, in ms of latency
DEFAULT_TRUST = 1.0
MIN_TRUST = 0.0
HEAD = "head"


@dataclass(frozen=True)
class PlanningContext:
    """The views and local inputs one planning decision reads.

    `observations` is this node's local cache, `trust` a caller-supplied mapping (peer id to
    a positive weight, DEFAULT_TRUST when absent), and `own_request` a request whose own
    reservations and load are left out (the request being re-planned). Load and
    reservations are read from the Scheduler view once, so build a context per decision.
    """

    registry: RegistryView
    scheduler: SchedulerView
    now_ms: int
    observations: PeerObservations | None = None
    trust: Mapping[str, float] = field(default_factory=dict)
    min_trust: float = MIN_TRUST
    own_request: str = ""

    @functools.cached_property
    def shared_load(self) -> dict[str, int]:
        return self.scheduler.load_by_holder(exclude_request=self.own_request)

    @functools.cached_property
    def kv_reserved(self) -> dict[str, int]:
        return self.scheduler.kv_reserved_by_holder(exclude_request=self.own_request)

    def trust_of(self, peer_id: str) -> float:
        return self.trust.get(peer_id, DEFAULT_TRUST)

    def is_eligible(self, peer_id: str) -> bool:
        """Return whether the peer may be chosen: its trust is above `min_trust`."""
        return self.trust_of(peer_id) > self.min_trust

    def load(self, peer_id: str) -> int:
        local = self.observations.load(peer_id) if self.observations is not None else 0
        return self.shared_load.get(peer_id, 0) + local

    def cost(self, peer_id: str) -> float:
        """Return the holder cost of the module docstring; call only for eligible peers."""
        if self.observations is not None:
            latency = self.observations.expected_latency_ms(peer_id)
        else:
            latency = DEFAULT_LATENCY_MS
        return (latency + LOAD_PENALTY_MS * self.load(peer_id)) / self.trust_of(peer_id)


def rendezvous_score(request_id: str, peer_id: str) -> bytes:
    """Return the peer's rendezvous weight for a request: BLAKE2b-128 of request and peer ids."""
    return hashlib.blake2b(f"{request_id}\n{peer_id}".encode(), digest_size=16).digest()


def driver_order(
    registry: RegistryView, model_id: str, request_id: str, now_ms: int, submitter: str = "", excluded: Iterable[str] = ()
) -> list[str]:
    """Return the live head holders of the model in takeover order; the first is the driver.

    `excluded` peers (for example, ones the trust view excludes) are left out.
    """
    skipped = set(excluded)
    holders = [holder for holder in registry.holders(model_id, HEAD, now_ms) if holder not in skipped]
    ranked = sorted(holders, key=lambda holder: (_negated(rendezvous_score(request_id, holder)), holder))
    if submitter in ranked:
        ranked.remove(submitter)
        ranked.insert(0, submitter)
    return ranked


def choose_driver(
    registry: RegistryView, model_id: str, request_id: str, now_ms: int, submitter: str = "", excluded: Iterable[str] = ()
) -> str:
    """Return the driver of a request; raise NoLiveHeadHolder if no live peer holds the head."""
    order = driver_order(registry, model_id, request_id, now_ms, submitter, excluded)
    if not order:
        raise NoLiveHeadHolder(
            f"no live peer has loaded the head of model {model_id}, so no node can drive request {request_id}; "
            "start a node that serves the head of this model",
            {"model_id": model_id},
        )
    return order[0]


def _negated(score: bytes) -> bytes:
    # Sorting ascending by the complemented bytes ranks the highest score first.
    return bytes(255 - byte for byte in score)


def rank_replicas(context: PlanningContext, holders: Iterable[str]) -> list[str]:
    """Return the eligible holders, cheapest first, ties by peer id."""
    eligible = {holder for holder in holders if context.is_eligible(holder)}
    return sorted(eligible, key=lambda holder: (context.cost(holder), holder))


def rank_expert_replicas(context: PlanningContext, model_id: str) -> dict[tuple[int, int], tuple[str, ...]]:
    """Map each (layer, expert) of the model that anyone loaded to its live replicas, best first.

    An expert whose replicas are all dead or excluded maps to an empty tuple.
    """
    table: dict[tuple[int, int], tuple[str, ...]] = {}
    for fragment, coverage in context.registry.coverage(model_id, context.now_ms).items():
        parsed = parse_fragment(fragment)
        if parsed.kind == "expert":
            table[(parsed.layer, parsed.expert)] = tuple(rank_replicas(context, coverage.loaded))
    return dict(sorted(table.items()))


@dataclass(frozen=True)
class RoutePlan:
    """A route of block holders for one request and the KV bytes each route fragment reserves."""

    model_id: str
    route: dict[str, str]
    kv_reservations: dict[str, int]
    prompt_tokens: int
    max_tokens: int

    @property
    def digest(self) -> str:
        return plan_digest(self.route, self.kv_reservations, self.prompt_tokens)

    @property
    def fragments(self) -> list[str]:
        """Return the route's fragments in layer order."""
        return sorted(self.route, key=lambda fragment: parse_fragment(fragment).start)

    @property
    def holders(self) -> list[str]:
        """Return the holders in layer order (a holder of two fragments appears twice)."""
        return [self.route[fragment] for fragment in self.fragments]

    def changes_from(self, previous: Mapping[str, str]) -> dict[str, tuple[str, str]]:
        """Return fragment -> (old holder or "", new holder) for each fragment that changed."""
        return {
            fragment: (previous.get(fragment, ""), holder)
            for fragment, holder in self.route.items()
            if previous.get(fragment) != holder
        }

    def accepted(self, request_id: str, takeover_of: str = "") -> RequestAccepted:
        """Return the RequestAccepted body that publishes this plan."""
        return RequestAccepted(
            request_id, dict(self.route), dict(self.kv_reservations), self.prompt_tokens, self.digest, takeover_of
        )

    def replanned(self, request_id: str, failed_holder: str, reason: str, resume_step: int) -> RouteReplanned:
        """Return the RouteReplanned body that publishes this plan in place of the old one."""
        return RouteReplanned(
            request_id,
            failed_holder,
            reason,
            dict(self.route),
            dict(self.kv_reservations),
            self.prompt_tokens,
            self.digest,
            resume_step,
        )
