"""Tables for a terminal: the swarm status and any view that replay rebuilt."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.json import JSON
from rich.table import Table
from rich.text import Text

from cortex.registry import RegistryView
from replay.render import format_value, json_line, short_hex, short_peer_id
from replay.status import requests_in_flight, swarm_status
from replay.times import format_time_ms
from replay.views import view_json


MAX_SHARD_ROWS = 200
# The keys of the Router view's `load_of`, shown in words in the load column.
ROUTER_LOAD_KEYS = ("experts_loaded", "expert_outputs", "expert_rows", "open_expert_requests", "expert_latency_ms")
"""Shard records printed in the registry table; `--json` has them all."""


def status_tables(status: dict[str, Any]) -> list[RenderableType]:
    """Return the peers table, one coverage table per model, requests in flight and notes."""
    renderables: list[RenderableType] = [
        Text(f"swarm at {format_time_ms(status['now_ms'])} UTC: {status['live_peers']} of {len(status['peers'])} peers live")
    ]
    if status.get("excluded_peers"):
        names = ", ".join(short_peer_id(peer) for peer in status["excluded_peers"])
        renderables.append(Text(f"excluded by the quorum: {names}", style="bold red"))
    renderables.append(_peers_table(status["peers"]))
    for model in status["models"]:
        renderables.append(_coverage_table(model))
    if status["requests_in_flight"] is not None:
        renderables.append(_requests_table(status["requests_in_flight"]))
    for note in status["notes"]:
        renderables.append(Text(f"note: {note}", style="dim"))
    return renderables


def _peers_table(peers: list[dict[str, Any]]) -> Table:
    table = Table(title="peers", title_justify="left")
    for column in ("peer", "address", "hardware", "liveness", "trust", "load"):
        table.add_column(column)
    for peer in peers:
        style = "green" if peer["live"] else "red"
        load = peer["load"]
        load_text = f"{load['fragments_loaded']} loaded, {load['memory_bytes'] / 2**20:,.1f} MiB"
        if "requests_in_flight_routed" in load:
            load_text += (f"; requests in flight: {load['requests_in_flight_routed']} routed, "
                          f"{load['requests_in_flight_driven']} driven, "
                          f"KV {load['kv_reserved_bytes'] / 2**20:,.1f} MiB")
        if "expert_outputs" in load:
            latency = load["expert_latency_ms"]
            load_text += (f"; experts: {load['experts_loaded']} loaded, {load['expert_outputs']} outputs, "
                          f"{load['open_expert_requests']} open requests, latency "
                          + ("n/a" if latency is None else f"{latency} ms"))
        described = ("fragments_loaded", "memory_bytes", "requests_in_flight_routed", "requests_in_flight_driven", "kv_reserved_bytes",
                 *ROUTER_LOAD_KEYS)
        extra = {key: value for key, value in load.items() if key not in described}
        if extra:
            load_text += " " + format_value(extra)
        table.add_row(
            peer["short_id"],
            peer["data_endpoint"] or "-",
            format_value(peer["hardware"]) if peer["hardware"] else "-",
            Text(peer["liveness"], style=style),
            _trust_text(peer),
            load_text,
        )
    return table


def _trust_text(peer: dict[str, Any]) -> Text:
    """Return the trust cell: the score, marked in bold red when the quorum view excludes the peer."""
    if peer["trust"] is None:
        return Text("n/a")
    if peer.get("excluded"):
        return Text(f"{peer['trust']} excluded", style="bold red")
    return Text(str(peer["trust"]))


def _coverage_table(model: dict[str, Any]) -> RenderableType:
    table = Table(title=f"model {short_hex(model['model_id'])}: coverage", title_justify="left")
    for column in ("fragment", "live replicas", "claimed only", "holders"):
        table.add_column(column)
    for fragment in model["fragments"]:
        style = "green"
        if fragment["loaded"] == 0:
            style = "red bold"
        elif fragment["loaded"] == 1:
            style = "yellow"
        table.add_row(
            fragment["fragment"],
            Text(str(fragment["loaded"]), style=style),
            str(fragment["claimed"]),
            ", ".join(fragment["holders"]) or "-",
        )
    if not model["gaps"]:
        return table
    gaps = Text("gaps:\n", style="red bold")
    for gap in model["gaps"]:
        gaps.append(f"  {gap}\n", style="red")
    return Group(table, gaps)


def _requests_table(requests: list[dict[str, Any]]) -> Table:
    table = Table(title="requests in flight", title_justify="left")
    columns = list(dict.fromkeys(key for request in requests for key in request))
    for column in columns or ["(none)"]:
        table.add_column(column)
    for request in requests:
        table.add_row(*(format_value(request.get(column, "")) for column in columns))
    return table


def view_tables(name: str, view: Any, now_ms: int, digest: str) -> list[RenderableType]:
    """Return tables for a rebuilt view; views without their own layout print as JSON."""
    header = Text(f"view {name}, digest {digest}")
    if isinstance(view, RegistryView):
        status = swarm_status({name: view}, {}, now_ms)
        status["notes"] = []
        return [header, *status_tables(status), _shards_table(view)]
    if callable(getattr(view, "in_flight", None)) and isinstance(getattr(view, "requests", None), dict):
        return [header, *_scheduler_tables(view, now_ms)]
    return [header, JSON(json_line(view_json(view)))]


def _scheduler_tables(view: Any, now_ms: int) -> list[RenderableType]:
    """Return the Scheduler view as a count of requests by state and the requests in flight."""
    states: dict[str, int] = {}
    for record in view.requests.values():
        states[record.state] = states.get(record.state, 0) + 1
    counts = Table(title=f"requests: {len(view.requests)}", title_justify="left")
    counts.add_column("state")
    counts.add_column("requests", justify="right")
    for state, count in sorted(states.items()):
        counts.add_row(state, f"{count:,}")
    in_flight = requests_in_flight({"scheduler": view}, now_ms) or []
    return [counts, _requests_table(in_flight)]


def _shards_table(view: RegistryView) -> Table:
    table = Table(title="shard records (released ones are kept as tombstones)", title_justify="left")
    for column in ("peer", "model", "fragment", "state", "memory", "stamp (lamport, seq)"):
        table.add_column(column)
    keys = sorted(view.shards)
    if len(keys) > MAX_SHARD_ROWS:
        table.caption = f"first {MAX_SHARD_ROWS} of {len(keys):,} records; --json lists all"
    for key in keys[:MAX_SHARD_ROWS]:
        record = view.shards[key]
        lamport, _author, seq = record.stamp
        table.add_row(
            short_peer_id(record.holder), short_hex(record.model_id), record.fragment, record.state,
            f"{record.memory_bytes:,}", f"{lamport}, {seq}",
        )
    return table
