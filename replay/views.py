"""The views that replay can rebuild, by name, and how to load each one.

Each view is registered by name with the module and the reducer class the node itself uses,
so replay folds a log through exactly the node's reducers. A view whose module is not in
this build (the module of a later subsystem, say) is listed as unavailable with the
import error, and the other views still work.

A reducer follows `events.views.Reducer`. Its view should provide `to_json()` (JSON-ready
data in a canonical order) and `digest()` (a hash of that data), as `RegistryView` does;
`view_json` and `view_digest` fall back to a dataclass dump for a view without them.
Methods that `cortex status` reads when a view provides them (see `replay.status`):

    in_flight() -> list[RequestRecord]         the Scheduler view's requests in flight
    load_by_holder(), kv_reserved_by_holder()  the Scheduler view's per-peer load
    requests_in_flight(now_ms) -> list[dict]   any view: one dict per request in flight
    trust_of(peer_id) -> int | float | None    quorum: a peer's trust score
    load_of(peer_id) -> dict                   router: a peer's load figures
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from events.errors import EventError
from events.views import Reducer
from replay.errors import ViewUnavailable


@dataclass(frozen=True)
class ViewSpec:
    """A view's name and the location of its reducer: `module.reducer`, called with no arguments."""

    name: str
    module: str
    reducer: str
    description: str


@dataclass(frozen=True)
class LoadedView:
    """A view whose module imported: its spec and a factory for fresh reducers."""

    spec: ViewSpec
    factory: Callable[[], Reducer[Any]]

    @property
    def name(self) -> str:
        return self.spec.name

    def new_reducer(self) -> Reducer[Any]:
        return self.factory()


VIEW_SPECS: dict[str, ViewSpec] = {}


def register_view(name: str, module: str, reducer: str, description: str) -> None:
    """Register (or replace) the view `name`, folded by `module.reducer`."""
    VIEW_SPECS[name] = ViewSpec(name, module, reducer, description)


# NOTE: the router and quorum modules are named as planned, before they exist. When one
# lands under another name, change its line here.
register_view("registry", "cortex.registry", "RegistryReducer", "peers, shard claims and loads, coverage of each model")
register_view("scheduler", "cortex.scheduler", "SchedulerReducer", "requests and their lifecycle")
register_view("router", "cortex.router", "RouterReducer", "per-layer routing: experts to ranked live replicas")
register_view("quorum", "cortex.quorum", "TrustReducer", "votes, decisions and peer trust")


def load_view(name: str) -> LoadedView:
    """Import a registered view's reducer; raise ViewUnavailable with the reason and the fix."""
    spec = VIEW_SPECS.get(name)
    if spec is None:
        raise ViewUnavailable(f"no view named {name!r}; registered views are {', '.join(sorted(VIEW_SPECS))}")
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as error:
        if error.name is not None and spec.module.startswith(error.name):
            raise ViewUnavailable(
                f"the {name} view is not implemented yet: Cortex has no {spec.module} module in this version"
            ) from None
        raise ViewUnavailable(f"the {name} view is not available: importing {spec.module} failed: {error}") from error
    except ImportError as error:
        raise ViewUnavailable(f"the {name} view is not available: importing {spec.module} failed: {error}") from error
    factory = getattr(module, spec.reducer, None)
    if factory is None or not callable(factory):
        raise ViewUnavailable(
            f"the {name} view is not available: {spec.module} has no reducer {spec.reducer}; "
            "update its line in replay/views.py"
        )
    try:
        factory()
    except EventError as error:
        # A reducer checks at construction that it handles every type of its families.
        raise ViewUnavailable(f"the {name} view is not available: building its reducer failed: {error}") from error
    return LoadedView(spec, factory)


def view_availability() -> list[tuple[ViewSpec, str | None]]:
    """Return each registered view with None if it loads, else the reason it does not."""
    availability: list[tuple[ViewSpec, str | None]] = []
    for name in sorted(VIEW_SPECS):
        try:
            load_view(name)
            availability.append((VIEW_SPECS[name], None))
        except ViewUnavailable as error:
            availability.append((VIEW_SPECS[name], str(error)))
    return availability


def available_views() -> list[LoadedView]:
    """Return every registered view that loads, sorted by name."""
    loaded: list[LoadedView] = []
    for name in sorted(VIEW_SPECS):
        try:
            loaded.append(load_view(name))
        except ViewUnavailable:
            continue
    return loaded


def resolve_views(names: list[str] | None) -> list[LoadedView]:
    """Load the named views, or every available one when `names` is empty or None."""
    if not names:
        views = available_views()
        if not views:
            raise ViewUnavailable("no view is available in this build")
        return views
    return [load_view(name) for name in dict.fromkeys(names)]


def view_json(view: Any) -> Any:
    """Return a view as JSON-ready data in a canonical order."""
    to_json = getattr(view, "to_json", None)
    if callable(to_json):
        return to_json()
    if dataclasses.is_dataclass(view) and not isinstance(view, type):
        return orjson.loads(orjson.dumps(dataclasses.asdict(view), option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS))
    raise TypeError(f"{type(view).__name__} has no to_json() and is not a dataclass; give it a to_json()")


def view_digest(view: Any) -> str:
    """Return the view's digest: its own `digest()`, else BLAKE2b-256 of its canonical JSON."""
    digest = getattr(view, "digest", None)
    if callable(digest):
        return str(digest())
    data = orjson.dumps(view_json(view), option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.blake2b(data, digest_size=32).hexdigest()
