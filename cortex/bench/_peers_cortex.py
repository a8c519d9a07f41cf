"""Cortex side of `cortex bench peers`: expert servers on the data plane, and the MoE layer client.

Shape legend: T = tokens of a batch, E = experts, K = experts per token, D = hidden size,
F = expert intermediate size, N = token rows sent for one expert.

Each expert server is its own process (`python -m cortex.bench._peers_cortex serve`) with
the settings a node uses. It has a fresh Ed25519 identity and a `DataPlane` with CurveZMQ on
127.0.0.1. An `EventWriter` signs every record it sends and appends it to an fsynced SQLite
log, and an `Acceptor` verifies and appends every record it receives. It prints one JSON line
{"peer_id", "endpoint", "experts"} when it serves, and stops when stdin closes, on SIGTERM,
or after --max-lifetime-s.

The client (`CortexMoeLayer`) routes with the router weights (softmax over the top-K logits,
as hivemind's `RemoteMixtureOfExperts` and Mixtral do) and hands the tokens to Cortex's
`TokenRouter`. The router groups them per expert and sends each replica its experts' rows
as concurrent data-plane calls, one per expert. The client then combines the expert
outputs with the routing weights.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cortex.comm import DataPlane, ExpertBatchProduced, ExpertBatchSent, IncomingCall, Rejection, Response
from cortex.comm import CommError
from cortex.driver.errors import CallFailed
from cortex.driver.router import TokenRouter
from cortex.runtime.fragments import MoeCall
from cortex.runtime.routing import RoutingDecision
from events import Acceptor, EventWriter, Identity, LogStore

logger = logging.getLogger(__name__)

MODEL_ID = "bench-peers"
LAYER = 0
EXPERT_KIND = "expert"


def expert_forward(weights: dict[str, torch.Tensor], expert: int, rows: torch.Tensor) -> torch.Tensor:
    """Run expert `expert` on rows [N, D]: down(gelu(up(x))), the same math as hivemind's side."""
    hidden = F.gelu(F.linear(rows, weights[f"experts.{expert}.up.weight"], weights[f"experts.{expert}.up.bias"]))  # [N, F]
    return F.linear(hidden, weights[f"experts.{expert}.down.weight"], weights[f"experts.{expert}.down.bias"])  # [N, D]


def route(router: torch.Tensor, tokens: torch.Tensor, top_k: int) -> RoutingDecision:
    """Pick each token's top-k experts by router logit; weights are a softmax over those k logits."""
    logits = F.linear(tokens, router)  # [T, E]
    top_logits, expert_ids = logits.topk(top_k, dim=-1)  # [T, K]
    return RoutingDecision(expert_ids=expert_ids, weights=top_logits.softmax(dim=-1))


def reference_layer(weights: dict[str, torch.Tensor], tokens: torch.Tensor, top_k: int) -> torch.Tensor:
    """Compute the MoE layer in this process, one expert at a time: [T, D] -> [T, D]."""
    routing = route(weights["router"], tokens, top_k)
    output = torch.zeros_like(tokens)  # [T, D]
    for expert in range(weights["router"].shape[0]):
        token_index, slot = (routing.expert_ids == expert).nonzero(as_tuple=True)
        if token_index.numel():
            expert_output = expert_forward(weights, expert, tokens[token_index])  # [N, D]
            output.index_add_(0, token_index, routing.weights[token_index, slot].unsqueeze(-1) * expert_output)
    return output


@dataclass(frozen=True)
class ExpertServer:
    """A running expert server process as announced on its stdout."""

    peer_id: str
    endpoint: str
    experts: tuple[int, ...]


def open_dataplane(directory: Path, request_id: str, handler_timeout_s: float) -> tuple[DataPlane, LogStore]:
    """Build a node's data plane: a new identity, an fsynced SQLite log, signing and verification."""
    directory.mkdir(parents=True, exist_ok=True)
    identity = Identity.generate()
    store = LogStore(directory / "events.db")
    acceptor = Acceptor(store, own_peer_id=identity.peer_id)
    writer = EventWriter(identity, acceptor)

    def on_reject(rejection: Rejection) -> None:
        logger.warning("rejected a frame from %s: %s", rejection.peer_id or rejection.curve_key, rejection.message)

    dataplane = DataPlane(
        identity,
        sign_many=writer.write_many,
        is_known_request={request_id}.__contains__,
        acceptor=acceptor,
        on_reject=on_reject,
        handler_timeout_s=handler_timeout_s,
    )
    return dataplane, store


class CortexMoeLayer:
    """The client: an MoE layer whose experts run on `ExpertServer` processes via the TokenRouter.

    It is also the router's `ReplicaDirectory`: each expert has exactly one replica here.
    """

    def __init__(self, router: torch.Tensor, servers: list[ExpertServer], request_id: str, call_timeout_s: float) -> None:
        self.router = router
        self.request_id = request_id
        self.call_timeout_s = call_timeout_s
        self.endpoints = {server.peer_id: server.endpoint for server in servers}
        self.holders = {expert: server.peer_id for server in servers for expert in server.experts}
        self.token_router = TokenRouter(self)
        self.step = 0
        self._dataplane: DataPlane | None = None
        self._store: LogStore | None = None

    async def start(self, directory: Path) -> None:
        self._dataplane, self._store = open_dataplane(directory, self.request_id, self.call_timeout_s)
        await self._dataplane.start("tcp://127.0.0.1:*")

    async def close(self) -> None:
        if self._dataplane is not None:
            await self._dataplane.close()
        if self._store is not None:
            self._store.close()

    @property
    def counters(self) -> dict[str, int]:
        return dict(self._dataplane.counters) if self._dataplane is not None else {}

    async def forward(self, tokens: torch.Tensor, top_k: int) -> torch.Tensor:
        """Route, dispatch and combine one batch of tokens [T, D] -> [T, D]."""
        routing = route(self.router, tokens, top_k)
        outputs = await self.token_router.dispatch(self.request_id, MoeCall(LAYER, tokens, routing), self.step)  # [T, K, D]
        self.step += 1
        return (routing.weights.unsqueeze(-1) * outputs).sum(dim=1)  # [T, D]

    # ReplicaDirectory protocol of the TokenRouter.

    def replicas(self, layer: int, expert: int) -> list[str]:
        holder = self.holders.get(expert)
        return [holder] if holder is not None else []

    def note_failure(self, peer: str) -> None:
        logger.warning("expert call to %s failed", peer)

    async def call_experts(
        self, peer: str, request_id: str, step: int, segments: list[tuple[int, int, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Send every expert's rows [N, D] to `peer` in one multi-expert data-plane call.

        Each expert's rows travel as their own tensor; one signed `ExpertBatchSent` record
        names every expert of the call, as a node's expert calls do. The reply has one output
        per expert, under the same name.
        """
        assert self._dataplane is not None, "call start() before forward()"
        names = [f"expert[{layer}][{expert}]" for layer, expert, _rows in segments]
        tensors = {name: rows for name, (_layer, _expert, rows) in zip(names, segments, strict=True)}
        per_tensor = {name: {"layer": layer, "expert": expert} for name, (layer, expert, _rows) in zip(names, segments, strict=True)}
        try:
            reply = await self._dataplane.call(
                peer,
                self.endpoints[peer],
                EXPERT_KIND,
                request_id=request_id,
                record=ExpertBatchSent,
                fields={"model_id": MODEL_ID, "step": step},
                tensors=tensors,
                timeout_s=self.call_timeout_s,
                tensor_fields=per_tensor,
            )
        except CommError as error:
            raise CallFailed(peer, f"experts {names}", str(error)) from error
        received = {output.name: output for output in reply.outputs}
        outputs = []
        for name, (layer, expert, rows) in zip(names, segments, strict=True):
            output = received.get(name)
            record = output.event.body if output is not None else None
            if (
                output is None
                or not isinstance(record, ExpertBatchProduced)
                or output.fields.get("expert") != expert
                or output.tensor.shape != rows.shape
            ):
                raise CallFailed(peer, f"expert[{layer}][{expert}]", f"reply record {record!r:.200} does not match the call")
            outputs.append(output.tensor)
        return outputs


async def serve(args: argparse.Namespace) -> int:
    """Serve the experts named by --experts until stdin closes, SIGTERM, or --max-lifetime-s."""
    torch.set_num_threads(args.threads)
    weights = torch.load(args.weights, weights_only=True)
    experts = tuple(int(expert) for expert in args.experts.split(","))
    dataplane, store = open_dataplane(Path(args.data_dir), args.request_id, args.handler_timeout_s)

    async def run_expert(call: IncomingCall) -> Response:
        first = call.inputs[0].fields
        tensors: dict[str, torch.Tensor] = {}
        per_tensor: dict[str, dict[str, int]] = {}
        for received in call.inputs:
            layer, expert = received.fields["layer"], received.fields["expert"]
            if expert not in experts:
                raise ValueError(f"expert {expert} not found: this server runs experts {list(experts)}")
            with torch.no_grad():
                tensors[received.name] = expert_forward(weights, expert, received.tensor)  # [N, D]
            per_tensor[received.name] = {"layer": layer, "expert": expert}
        return Response(ExpertBatchProduced, {"model_id": first["model_id"], "step": first["step"]}, tensors, per_tensor)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # A daemon thread waits for stdin to close, because interpreter exit does not join daemon threads.
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    dataplane.register_handler(EXPERT_KIND, run_expert, accepts=(ExpertBatchSent,))
    try:
        endpoint = await dataplane.start("tcp://127.0.0.1:*")
        print(json.dumps({"peer_id": dataplane.identity.peer_id, "endpoint": endpoint, "experts": experts}), flush=True)
        try:
            await asyncio.wait_for(stop.wait(), args.max_lifetime_s)
        except TimeoutError:
            logger.warning("expert server stops after its maximum lifetime of %.0f s", args.max_lifetime_s)
    finally:
        await dataplane.close()
        store.close()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="serve bench experts over the Cortex data plane")
    modes = parser.add_subparsers(dest="mode", required=True)
    serve_parser = modes.add_parser("serve")
    serve_parser.add_argument("--weights", required=True, help="torch.save file of router and expert tensors")
    serve_parser.add_argument("--experts", required=True, help="comma-separated expert indices to serve")
    serve_parser.add_argument("--data-dir", required=True, help="directory of this server's event log")
    serve_parser.add_argument("--request-id", required=True, help="the one request id this server accepts")
    serve_parser.add_argument("--threads", type=int, default=1, help="torch threads")
    serve_parser.add_argument("--handler-timeout-s", type=float, default=30.0, help="time limit of one expert call")
    serve_parser.add_argument("--max-lifetime-s", type=float, default=600.0, help="stop after this many seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
