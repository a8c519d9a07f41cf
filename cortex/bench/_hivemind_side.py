"""hivemind side of `cortex bench peers`: serve experts, or time a RemoteMixtureOfExperts client.

This script runs inside the separate hivemind virtualenv that the bench creates, so it
imports only torch, hivemind and the standard library, never `cortex`. The bench starts it
twice, each time in its own process group:

    serve   load the experts from the weights file, serve them with hivemind's `Server`,
            print one JSON line {"maddrs": [...]} once they are declared in the DHT, and
            stop when stdin closes or after --max-lifetime-s.
    client  read {"peers": [...]} from stdin, join that DHT, build a `RemoteMixtureOfExperts` whose gating projection is
            the router, print {"ready": true}, then run the layer as JSON commands on
            stdin request (see `_serve_commands`), so the bench can alternate rounds of
            both systems. At {"done": true} it saves each batch's last output and prints
            {"settings": {...}}.

The weights file is a `torch.save` dict: "router" [E, D] and, for each expert e,
"experts.e.up.weight" [F, D], "experts.e.up.bias" [F], "experts.e.down.weight" [D, F] and
"experts.e.down.bias" [D]. Every peer binds to 127.0.0.1 only, with NAT traversal, relays,
auto-relay and IPFS bootstrap switched off; hivemind's TLS stays on, as a user would run it.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import select
import sys
import tempfile
import time

import torch
from torch import nn

LOOPBACK_MADDR = "/ip4/127.0.0.1/tcp/0"
UID_PREFIX = "expert."
# hivemind 1.1 P2P options that would reach beyond loopback, all switched off.
P2P_OPTIONS = {
    "host_maddrs": [LOOPBACK_MADDR],
    "use_ipfs": False,
    "use_relay": False,
    "use_auto_relay": False,
    "auto_nat": False,
    "nat_port_map": False,
}
EXPERT_SEARCH_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0


class FeedForward(nn.Module):
    """One expert: down(gelu(up(x))), [N, D] -> [N, F] -> [N, D] in float32."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, intermediate)
        self.down = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


def load_expert(weights: dict[str, torch.Tensor], expert: int) -> FeedForward:
    """Build expert `expert` from the weights file's tensors."""
    up = weights[f"experts.{expert}.up.weight"]  # [F, D]
    module = FeedForward(up.shape[1], up.shape[0])
    module.load_state_dict({
        "up.weight": up,
        "up.bias": weights[f"experts.{expert}.up.bias"],
        "down.weight": weights[f"experts.{expert}.down.weight"],
        "down.bias": weights[f"experts.{expert}.down.bias"],
    })
    return module.eval()


def serve(args: argparse.Namespace) -> int:
    """Serve the experts until stdin closes or --max-lifetime-s passes."""
    if args.stack_dump_after_s > 0:
        # A start that hangs leaves every thread's stack in stderr, where the bench reports it.
        faulthandler.dump_traceback_later(args.stack_dump_after_s)
    from hivemind import DHT
    from hivemind.moe.server import ModuleBackend, Server
    from hivemind.utils.tensor_descr import BatchTensorDescriptor

    torch.set_num_threads(args.threads)
    weights = torch.load(args.weights, weights_only=True)
    experts, hidden = weights["router"].shape
    dht = DHT(start=True, **P2P_OPTIONS)
    backends = {
        f"{UID_PREFIX}{expert}": ModuleBackend(
            name=f"{UID_PREFIX}{expert}",
            module=load_expert(weights, expert),
            args_schema=(BatchTensorDescriptor(hidden),),
            outputs_schema=BatchTensorDescriptor(hidden),
            max_batch_size=args.max_batch_size,
        )
        for expert in range(experts)
    }
    server = Server(dht, backends, num_connection_handlers=args.handlers, start=True)
    try:
        _wait_until_declared(dht, list(backends))
        maddrs = [str(maddr) for maddr in dht.get_visible_maddrs()]
        faulthandler.cancel_dump_traceback_later()
        print(json.dumps({"maddrs": maddrs}), flush=True)
        # The bench closes our stdin to stop us. The lifetime limit covers a bench that died first.
        select.select([sys.stdin], [], [], args.max_lifetime_s)
    finally:
        server.shutdown()
    return 0


def _wait_until_declared(dht: object, uids: list[str]) -> None:
    from hivemind.moe.server.dht_handler import get_experts

    deadline = time.monotonic() + EXPERT_SEARCH_TIMEOUT_S
    while time.monotonic() < deadline:
        if all(found is not None for found in get_experts(dht, uids)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"hivemind did not declare experts {uids} in its DHT within {EXPERT_SEARCH_TIMEOUT_S} s")


def client(args: argparse.Namespace) -> int:
    """Build a RemoteMixtureOfExperts, then run the calls that stdin commands request."""
    from hivemind import DHT
    from hivemind.moe import RemoteMixtureOfExperts

    torch.set_num_threads(args.threads)
    weights = torch.load(args.weights, weights_only=True)
    inputs = torch.load(args.inputs, weights_only=True)
    experts, hidden = weights["router"].shape
    # The bench starts this client while the server boots, so the imports above overlap the
    # boot, and sends the server's multiaddrs once the server printed them.
    line = sys.stdin.readline()
    if not line:
        return 0
    dht = DHT(initial_peers=json.loads(line)["peers"], start=True, client_mode=True, **P2P_OPTIONS)
    try:
        layer = RemoteMixtureOfExperts(
            in_features=hidden,
            grid_size=(experts,),
            dht=dht,
            uid_prefix=UID_PREFIX,
            k_best=args.top_k,
            k_min=args.top_k,
            forward_timeout=CALL_TIMEOUT_S,
        )
        # The gating projection is the shared router, so both systems pick the same experts.
        with torch.no_grad():
            layer.proj.weight.copy_(weights["router"])
            layer.proj.bias.zero_()
        print(json.dumps({"ready": True}), flush=True)
        outputs = _serve_commands(layer, inputs)
        torch.save(outputs, args.outputs)
    finally:
        dht.shutdown()
    settings = {"hivemind_version": _hivemind_version(), "torch_version": torch.__version__}
    print(json.dumps({"settings": settings}), flush=True)
    return 0


def _serve_commands(layer: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the layer as stdin commands request until {"done": true} or end of input.

    A command {"batch": NAME, "calls": N} runs N calls on that batch and prints
    {"times_ms": [...]}, one time per call. The last output of each batch is returned.
    """
    outputs: dict[str, torch.Tensor] = {}
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("done"):
            break
        batch = inputs[command["batch"]]
        samples = []
        with torch.no_grad():
            for _ in range(int(command["calls"])):
                start = time.perf_counter()
                output = layer(batch)
                samples.append((time.perf_counter() - start) * 1000.0)
        outputs[command["batch"]] = output.detach().clone()
        print(json.dumps({"times_ms": samples}), flush=True)
    return outputs


def _hivemind_version() -> str:
    import hivemind

    return str(hivemind.__version__)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    serve_parser = modes.add_parser("serve", help="serve the experts of the weights file")
    serve_parser.add_argument("--weights", required=True, help="torch.save file of router and expert tensors")
    serve_parser.add_argument("--handlers", type=int, default=4, help="hivemind connection handler processes")
    serve_parser.add_argument("--max-batch-size", type=int, default=4096, help="rows per expert batch on the server")
    serve_parser.add_argument("--threads", type=int, default=1, help="torch threads")
    serve_parser.add_argument("--max-lifetime-s", type=float, default=600.0, help="stop after this many seconds")
    serve_parser.add_argument(
        "--stack-dump-after-s", type=float, default=0.0, help="print every thread's stack if not serving by then (0: never)"
    )
    serve_parser.set_defaults(func=serve)
    client_parser = modes.add_parser("client", help="time RemoteMixtureOfExperts")
    client_parser.add_argument("--weights", required=True, help="torch.save file of router and expert tensors")
    client_parser.add_argument("--inputs", required=True, help="torch.save dict of batch name to tokens [T, D]")
    client_parser.add_argument("--outputs", required=True, help="where to torch.save the outputs per batch")
    client_parser.add_argument("--top-k", type=int, default=2, help="experts per token")
    client_parser.add_argument("--threads", type=int, default=1, help="torch threads")
    client_parser.set_defaults(func=client)
    return parser.parse_args(argv)


if __name__ == "__main__":
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    # hivemind forks processes while its threads run. tempfile finds its directory under a
    # lock on first use, and a child forked while another thread held that lock waited on it
    # forever (a server start hung so in a connection handler). Found once here, it needs no lock.
    tempfile.gettempdir()
    arguments = parse_arguments(sys.argv[1:])
    sys.exit(arguments.func(arguments))
