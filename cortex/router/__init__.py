"""Router view: routed experts to ranked live replicas, with replica load and latency (see `view.py`).

The TokenRouter (`cortex.driver.router`) may read it through `RouterView.replicas` and
`RouterView.routing_table`; docs/operator_tools.md lists the query API.
"""

from cortex.router.view import CLAIMED, LOADED, RELEASED, Presence, ReplicaStats, RequestRouting, RouterReducer, RouterView

__all__ = ["CLAIMED", "LOADED", "RELEASED", "Presence", "ReplicaStats", "RequestRouting", "RouterReducer", "RouterView"]
