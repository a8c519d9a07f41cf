"""The swarm at a glance, from a node's views: peers, coverage of each model, requests in flight.

Everything here is a query on views at a `now_ms` that the caller passes: the wall clock for
`cortex status`, the time of the last replayed event for `cortex replay`. So the same log
and the same `now_ms` always give the same status.

Coverage gaps are inferred from the fragments that peers claimed: the events do not carry
a model's layer or expert count, so layers above the highest block seen and experts above
the highest expert seen are not known to be missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cortex.registry import LIVENESS_TIMEOUT_MS, LOADED, RegistryView
from events.shards import parse_fragment
from replay.render import short_peer_id
from replay.times import format_duration_ms


def peer_rows(registry: RegistryView, now_ms: int, views: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return one dict per known peer: id, addresses, hardware, liveness, trust, exclusion and load."""
    trust_of = _hook(views, "trust_of")
    is_excluded = _hook(views, "is_excluded")
    load_of = _hook(views, "load_of")
    routed = _call(views, "load_by_holder")
    reserved = _call(views, "kv_reserved_by_holder")
    driven = _drivers(views)
    rows = []
    for peer_id in sorted(registry.peers):
        record = registry.peers[peer_id]
        announcement = record.announcement
        loaded = [shard for shard in registry.shards_of(peer_id) if shard.state == LOADED]
        load: dict[str, Any] = {"fragments_loaded": len(loaded), "memory_bytes": sum(shard.memory_bytes for shard in loaded)}
        if routed is not None:
            load["requests_in_flight_routed"] = routed.get(peer_id, 0)
            load["requests_in_flight_driven"] = driven.get(peer_id, 0)
            load["kv_reserved_bytes"] = (reserved or {}).get(peer_id, 0)
        if load_of is not None:
            load.update(load_of(peer_id))
        rows.append({
            "peer_id": peer_id,
            "short_id": short_peer_id(peer_id),
            "data_endpoint": None if announcement is None else announcement.data_endpoint,
            "bus_addresses": [] if announcement is None else list(announcement.bus_addresses),
            "hardware": {} if announcement is None else dict(announcement.hardware),
            "software_version": None if announcement is None else announcement.software_version,
            "live": registry.is_live(peer_id, now_ms),
            "liveness": liveness_text(registry, peer_id, now_ms),
            "last_heartbeat_ms": record.last_heartbeat_ms,
            "trust": None if trust_of is None else trust_of(peer_id),
            "excluded": None if is_excluded is None else is_excluded(peer_id),
            "load": load,
        })
    return rows


def liveness_text(registry: RegistryView, peer_id: str, now_ms: int) -> str:
    """Describe a peer's liveness at `now_ms`: live, silent, left, equivocated or not joined."""
    record = registry.peers[peer_id]
    if record.equivocated_from_seq is not None:
        return f"excluded: equivocated at seq {record.equivocated_from_seq}"
    if record.announcement is None:
        return "not joined"
    if not record.present:
        return "left"
    age_ms = now_ms - record.last_heartbeat_ms
    if age_ms <= LIVENESS_TIMEOUT_MS:
        return f"live ({format_duration_ms(max(age_ms, 0))} ago)"
    return f"silent for {format_duration_ms(age_ms)}"


def model_coverage(registry: RegistryView, model_id: str, now_ms: int) -> dict[str, Any]:
    """Return each fragment's live replica counts and the model's gaps at `now_ms`."""
    coverage = registry.coverage(model_id, now_ms)
    fragments = [
        {"fragment": fragment, "loaded": len(cover.loaded), "claimed": len(cover.claimed),
         "holders": [short_peer_id(holder) for holder in cover.loaded]}
        for fragment, cover in sorted(coverage.items(), key=lambda item: _fragment_order(item[0]))
    ]
    gaps = [f"{item['fragment']}: no live replica" + (" (claimed, not loaded)" if item["claimed"] else "")
            for item in fragments if item["loaded"] == 0]
    gaps.extend(_layer_gaps(list(coverage), {fragment for fragment, cover in coverage.items() if cover.loaded}))
    return {"model_id": model_id, "fragments": fragments, "gaps": gaps}


def _fragment_order(fragment: str) -> tuple[int, int, int]:
    parsed = parse_fragment(fragment)
    if parsed.kind == "head":
        return (0, 0, 0)
    if parsed.kind == "block":
        return (1, parsed.start, parsed.stop)
    return (2, parsed.layer, parsed.expert)


def _layer_gaps(fragments: list[str], live: set[str]) -> list[str]:
    """Return layers that no live block covers, a missing head, and experts below the highest seen."""
    parsed = [(fragment, parse_fragment(fragment)) for fragment in fragments]
    blocks = [item for _fragment, item in parsed if item.kind == "block"]
    gaps: list[str] = []
    if blocks and not any(item.kind == "head" for _fragment, item in parsed):
        gaps.append("head: never claimed")
    if blocks:
        top = max(block.stop for block in blocks)
        covered = {layer for fragment, item in parsed if item.kind == "block" and fragment in live for layer in item.layers}
        missing = [layer for layer in range(top) if layer not in covered]
        gaps.extend(f"layers {start}-{stop}: no live block" for start, stop in _runs(missing))
    experts: dict[int, set[int]] = {}
    for _fragment, item in parsed:
        if item.kind == "expert":
            experts.setdefault(item.layer, set()).add(item.expert)
    for layer, seen in sorted(experts.items()):
        never = [expert for expert in range(max(seen) + 1) if expert not in seen]
        gaps.extend(f"expert[{layer}][{start}..{stop}]: never claimed" for start, stop in _runs(never))
    return gaps


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for number in numbers:
        if runs and runs[-1][1] == number - 1:
            runs[-1] = (runs[-1][0], number)
        else:
            runs.append((number, number))
    return runs


def requests_in_flight(views: Mapping[str, Any], now_ms: int) -> list[dict[str, Any]] | None:
    """Return the requests in flight from the scheduler view, or None without one."""
    hook = _hook(views, "requests_in_flight")
    if hook is not None:
        requests: list[dict[str, Any]] = hook(now_ms)
        return requests
    in_flight = _call(views, "in_flight")
    if in_flight is None:
        return None
    return [
        {
            "request_id": record.request_id,
            "state": record.state,
            "model_id": record.model_id,
            "submitter": short_peer_id(record.submitter) if record.submitter else "",
            "driver": short_peer_id(record.driver) if record.driver else "",
            "age_ms": now_ms - record.submitted_ms if record.submitted_ms >= 0 else None,
            "holders": sorted(short_peer_id(holder) for holder in record.route.values()),
            "completion_tokens": record.completion_tokens,
            "replans": record.replans,
        }
        for record in in_flight
    ]


def swarm_status(views: Mapping[str, Any], unavailable: Mapping[str, str], now_ms: int) -> dict[str, Any]:
    """Return the whole status as JSON-ready data: peers, models, requests, and what is missing."""
    registry: RegistryView = views["registry"]
    in_flight = requests_in_flight(views, now_ms)
    notes = []
    if in_flight is None:
        reason = unavailable.get("scheduler", "no view provides the requests in flight")
        notes.append(f"requests in flight: not shown because {reason}")
    if _hook(views, "trust_of") is None:
        notes.append(f"trust: not shown because {unavailable.get('quorum', 'the quorum view has no trust_of(peer_id)')}")
    return {
        "now_ms": now_ms,
        "peers": peer_rows(registry, now_ms, views),
        "live_peers": len(registry.live_peers(now_ms)),
        "excluded_peers": _call(views, "excluded_peers"),
        "models": [model_coverage(registry, model_id, now_ms) for model_id in registry.models()],
        "requests_in_flight": in_flight,
        "notes": notes,
    }


def _call(views: Mapping[str, Any], name: str) -> Any:
    """Call the first view's method `name` with no arguments; None if no view has one."""
    method = _hook(views, name)
    return None if method is None else method()


def _drivers(views: Mapping[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in _call(views, "in_flight") or []:
        if record.driver:
            counts[record.driver] = counts.get(record.driver, 0) + 1
    return counts


def _hook(views: Mapping[str, Any], name: str) -> Any:
    """Return the first view's method called `name` (see replay.views), or None."""
    for view in views.values():
        method = getattr(view, name, None)
        if callable(method):
            return method
    return None
