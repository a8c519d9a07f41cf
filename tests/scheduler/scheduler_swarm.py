"""Registry and Scheduler views of small made-up swarms for planning tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cortex.registry import RegistryReducer, RegistryView
from cortex.scheduler.admission import KV_CACHE_HARDWARE_KEY, ModelGeometry
from events import Event, Identity, PeerJoined, PeerLeft, ShardLoaded, sign_event

MODEL = "model-1"
NOW_MS = 2_000
# 4 layers, 100 KV bytes per token per layer, 1,000 positions.
GEOMETRY = ModelGeometry(num_layers=4, kv_bytes_per_token_layer=100, max_positions=1_000)


def peer_events(identity: Identity, fragments: Iterable[str], kv_budget: int | None = None, model: str = MODEL) -> list[Event]:
    hardware: dict[str, int | str | bool] = {"cpus": 2}
    if kv_budget is not None:
        hardware[KV_CACHE_HARDWARE_KEY] = kv_budget
    joined = PeerJoined(("/ip4/127.0.0.1/tcp/4001",), "tcp://127.0.0.1:5555", identity.curve_public_key.decode(), hardware, "1.0", "0.1.0")
    events = [sign_event(identity, joined, seq=1, lamport=1, time_ms=1_000)]
    for seq, fragment in enumerate(fragments, start=2):
        events.append(sign_event(identity, ShardLoaded(model, fragment, 10), seq=seq, lamport=seq, time_ms=1_000))
    return events


def left_event(identity: Identity, seq: int) -> Event:
    return sign_event(identity, PeerLeft("stopped"), seq=seq, lamport=seq, time_ms=1_500)


def registry_of(
    holdings: Mapping[Identity, Iterable[str]], budgets: Mapping[Identity, int] | None = None, left: Iterable[Identity] = ()
) -> RegistryView:
    """Fold a registry where each identity joined and loaded its fragments; `left` peers then left."""
    reducer = RegistryReducer()
    view = reducer.empty()
    budgets = budgets or {}
    for identity, fragments in holdings.items():
        events = peer_events(identity, list(fragments), budgets.get(identity))
        if identity in set(left):
            events.append(left_event(identity, len(events) + 1))
        for event in events:
            view = reducer.apply(view, event)
    return view
