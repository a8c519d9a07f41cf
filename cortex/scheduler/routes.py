"""Route planning: a chain of block holders that covers every decoder layer, admission and re-planning.

A route covers layers 0 to L-1 of the model with loaded `block[a:b]` fragments that chain
(each starts where the previous one stops), one live holder per fragment. Chains compare by,
in order:

1. new layers: layers on holders not kept from the current route (all layers for a new
   request), because each such holder replays the session's inputs;
2. cost: the sum of the holders' costs (`PlanningContext.cost`);
3. hops: fewer fragments;
4. the sequence of (start layer, peer id), so ties break by peer id.

The search is a shortest path over layer boundaries, since each block goes from a lower
boundary to a higher one.

KV admission: each fragment of the route reserves `layers * (prompt_tokens + max_tokens) *
kv_bytes_per_token_layer` bytes on its holder. A holder is a candidate for a fragment only if
its free budget (advertised budget minus what in-flight requests reserve) covers that, and
the sum over all fragments one holder gets in the chain must fit too.

Re-planning marks every fragment whose holder is live and did not fail as kept, so the
chosen chain keeps as many layers where they are as any chain can, and replaces the rest.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from cortex.scheduler.admission import ModelGeometry, kv_budget
from cortex.scheduler.errors import BlockRangeUncovered, InvalidRoute, KvBudgetExceeded
from cortex.scheduler.lifecycle import RequestRecord
from cortex.scheduler.planning import PlanningContext, RoutePlan
from events.shards import parse_fragment

ChainKey = tuple[int, float, int, tuple[tuple[int, str], ...]]


@dataclass(frozen=True)
class _Edge:
    """One candidate: `holder` serving `fragment` (layers start to stop-1) for this request.

    `new_layers` is 0 for a fragment kept from the current route, else its layer count:
    the layers whose session a new holder must replay.
    """

    start: int
    stop: int
    fragment: str
    holder: str
    cost: float
    kv_bytes: int
    new_layers: int


def admit(
    context: PlanningContext, model_id: str, geometry: ModelGeometry, *, prompt_tokens: int, max_tokens: int
) -> RoutePlan:
    """Plan a new request's route or raise the PlanError the driver publishes as RequestFailed.

    Raises ContextTooLong, BlockRangeUncovered or KvBudgetExceeded.
    """
    geometry.check_context(prompt_tokens, max_tokens)
    return plan_route(context, model_id, geometry, prompt_tokens=prompt_tokens, max_tokens=max_tokens)


def replan_route(
    context: PlanningContext, record: RequestRecord, geometry: ModelGeometry, failed: Collection[str]
) -> RoutePlan:
    """Plan a new route for an in-flight request after `failed` holders dropped out.

    Fragments whose holders are live and not in `failed` stay. Pass a context whose
    `own_request` is the request's id, so its current reservations are not counted twice.
    """
    if record.submission is None:
        raise InvalidRoute(f"request {record.request_id} has no known RequestSubmitted, so it cannot be re-planned")
    if context.own_request != record.request_id:
        raise InvalidRoute(
            f"re-planning request {record.request_id} needs a PlanningContext with own_request set to it, "
            f"got {context.own_request!r}"
        )
    keep = {
        fragment: holder
        for fragment, holder in record.route.items()
        if holder not in failed and context.registry.is_live(holder, context.now_ms)
    }
    return plan_route(
        context,
        record.model_id,
        geometry,
        prompt_tokens=record.prompt_tokens,
        max_tokens=record.submission.max_tokens,
        keep=keep,
        excluded=failed,
    )


def plan_route(
    context: PlanningContext,
    model_id: str,
    geometry: ModelGeometry,
    *,
    prompt_tokens: int,
    max_tokens: int,
    keep: Mapping[str, str] | None = None,
    excluded: Collection[str] = (),
) -> RoutePlan:
    """Return the cheapest route for a request; see the module docstring for the policy."""
    tokens = prompt_tokens + max_tokens
    edges = _candidate_edges(context, model_id, geometry, tokens, keep or {}, excluded)
    layers = geometry.num_layers
    if _cheapest_chain(edges, layers) is None:
        raise _uncovered_error(context, model_id, edges, layers, excluded)

    room = {holder: kv_budget(context.registry, holder) - context.kv_reserved.get(holder, 0) for holder in _holders(edges)}
    candidates = [edge for edge in edges if edge.kv_bytes <= room[edge.holder]]
    # Each pass removes one (fragment, holder) pair, so the loop ends.
    while True:
        chain = _cheapest_chain(candidates, layers)
        if chain is None:
            raise _budget_error(context, model_id, edges, candidates, room, geometry, tokens)
        overfull = _first_overfull_edge(chain, room)
        if overfull is None:
            break
        candidates.remove(overfull)
    route = {edge.fragment: edge.holder for edge in chain}
    reservations = {edge.fragment: edge.kv_bytes for edge in chain}
    return RoutePlan(model_id, route, reservations, prompt_tokens, max_tokens)


def _candidate_edges(
    context: PlanningContext,
    model_id: str,
    geometry: ModelGeometry,
    tokens: int,
    keep: Mapping[str, str],
    excluded: Collection[str],
) -> list[_Edge]:
    edges = []
    for fragment, coverage in context.registry.coverage(model_id, context.now_ms).items():
        parsed = parse_fragment(fragment)
        if parsed.kind != "block" or parsed.stop > geometry.num_layers:
            continue
        kv_bytes = geometry.kv_bytes(parsed.stop - parsed.start, tokens)
        for holder in coverage.loaded:
            if holder in excluded or not context.is_eligible(holder):
                continue
            kept = keep.get(fragment) == holder
            cost = 0.0 if kept else context.cost(holder)
            new_layers = 0 if kept else parsed.stop - parsed.start
            edges.append(_Edge(parsed.start, parsed.stop, fragment, holder, cost, kv_bytes, new_layers))
    return edges


def _holders(edges: list[_Edge]) -> set[str]:
    return {edge.holder for edge in edges}


def _reachable(edges: list[_Edge], stop: int) -> dict[int, tuple[ChainKey, list[_Edge]]]:
    """Return, for each layer boundary reachable from layer 0, the cheapest chain that reaches it."""
    by_start: dict[int, list[_Edge]] = {}
    for edge in edges:
        if edge.stop <= stop:
            by_start.setdefault(edge.start, []).append(edge)
    best: dict[int, tuple[ChainKey, list[_Edge]]] = {0: ((0, 0.0, 0, ()), [])}
    for boundary in sorted({0, *(edge.stop for edge in edges)}):
        if boundary not in best:
            continue
        (new_layers, cost, hops, steps), chain = best[boundary]
        for edge in by_start.get(boundary, []):
            key: ChainKey = (
                new_layers + edge.new_layers,
                cost + edge.cost,
                hops + 1,
                (*steps, (edge.start, edge.holder)),
            )
            current = best.get(edge.stop)
            if current is None or key < current[0]:
                best[edge.stop] = (key, [*chain, edge])
    return best


def _cheapest_chain(edges: list[_Edge], stop: int) -> list[_Edge] | None:
    found = _reachable(edges, stop).get(stop)
    return found[1] if found is not None else None


def _first_overfull_edge(chain: list[_Edge], room: Mapping[str, float]) -> _Edge | None:
    """Return the last edge of the first holder whose fragments in `chain` need more than its room."""
    needed: dict[str, int] = {}
    for edge in chain:
        needed[edge.holder] = needed.get(edge.holder, 0) + edge.kv_bytes
    for holder in sorted(needed):
        if needed[holder] > room[holder]:
            return [edge for edge in chain if edge.holder == holder][-1]
    return None


def _gap_start(edges: list[_Edge], stop: int) -> int:
    """Return the highest layer boundary below `stop` that a chain from layer 0 reaches."""
    return max(boundary for boundary in _reachable(edges, stop) if boundary < stop)


def _uncovered_error(
    context: PlanningContext, model_id: str, edges: list[_Edge], layers: int, excluded: Collection[str]
) -> BlockRangeUncovered:
    gap = _gap_start(edges, layers)
    starts_after = [edge.start for edge in edges if edge.start > gap]
    gap_stop = min(starts_after, default=layers)
    notes = []
    for fragment, coverage in context.registry.coverage(model_id, context.now_ms).items():
        parsed = parse_fragment(fragment)
        if parsed.kind == "block" and parsed.start <= gap < parsed.stop:
            notes.append(_fragment_note(context, fragment, coverage.loaded, excluded))
    known = "; ".join(notes) if notes else f"no peer announced a block that contains layer {gap}"
    return BlockRangeUncovered(
        f"model {model_id}: no chain of live block holders covers layers {gap} to {gap_stop - 1} "
        f"(live blocks from layer 0 reach layer {gap}): {known}; start a node that serves "
        f"block[{gap}:{gap_stop}] of this model or wait for a holder to come back",
        {"model_id": model_id, "first_layer": gap, "last_layer": gap_stop - 1, "fragment": f"block[{gap}:{gap_stop}]"},
    )


def _fragment_note(context: PlanningContext, fragment: str, loaded: tuple[str, ...], excluded: Collection[str]) -> str:
    if not loaded:
        return f"{fragment} has no live holder that loaded it"
    usable = [holder for holder in loaded if holder not in excluded and context.is_eligible(holder)]
    if not usable:
        return f"{fragment} is held only by failed or untrusted peers {', '.join(loaded)}"
    return f"{fragment} is live but starts at layer {parse_fragment(fragment).start}, which no chain reaches"


def _budget_error(
    context: PlanningContext,
    model_id: str,
    edges: list[_Edge],
    candidates: list[_Edge],
    room: Mapping[str, float],
    geometry: ModelGeometry,
    tokens: int,
) -> KvBudgetExceeded:
    # Report the fragment where chains stop, or else the lowest one that some holder lacked room for.
    gap = _gap_start(candidates, geometry.num_layers)
    rejected = sorted(
        (edge for edge in edges if edge not in candidates),
        key=lambda edge: (edge.start != gap, edge.start, edge.stop, -room[edge.holder], edge.holder),
    )
    best = rejected[0]
    blocked = [edge for edge in rejected if edge.fragment == best.fragment]
    free = {edge.holder: max(int(room[edge.holder]), 0) for edge in blocked}
    budget = {edge.holder: int(kv_budget(context.registry, edge.holder)) for edge in blocked}
    holders = ", ".join(f"{edge.holder} has {free[edge.holder]:,} of {budget[edge.holder]:,} free" for edge in blocked)
    return KvBudgetExceeded(
        f"model {model_id}: {best.fragment} needs {best.kv_bytes:,} KV-cache bytes for this request "
        f"({best.stop - best.start} layers x {tokens} tokens x {geometry.kv_bytes_per_token_layer} bytes), "
        f"but no live holder has that much free ({holders}); lower max_tokens or shorten the prompt, "
        "or retry when in-flight requests finish",
        {
            "model_id": model_id,
            "fragment": best.fragment,
            "needed_bytes": best.kv_bytes,
            "free_bytes": free[best.holder],
            "budget_bytes": budget[best.holder],
            "holder": best.holder,
        },
    )
