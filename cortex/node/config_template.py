"""The commented `config.yaml` that `cortex init` writes, sized from the detected hardware.

The text depends only on stable facts (cores, CPU model, RAM, GPUs), never on free disk or
the time, so running `cortex init` again on the same machine writes the same bytes. Paths in
it are relative to the config's folder or `package:` paths, so the same file works on the host
(`~/.cortex/config.yaml`) and in the container (`/data/config.yaml`).
"""

from __future__ import annotations

from cortex.node.config import DEFAULT_API_LISTEN, DEFAULT_KV_CACHE_BUDGET_MB
from cortex.node.hardware import Hardware

# Share of RAM (CPU nodes) or of the first GPU's memory (CUDA nodes) that fragments may take;
# the rest is left to the KV cache, activations, the fallback model and the system.
MODEL_MEMORY_SHARE = 0.5
KV_CACHE_SHARE = 0.125  # of the same memory
BUDGET_STEP_MB = 256  # budgets are rounded down to this step
MIN_MODEL_BUDGET_MB = 256

_TEMPLATE = """\
# Cortex node config, written by `cortex init` for this machine:
#   CPU: {cores} cores ({cpu_model}, {machine}), RAM: {ram_mb} MiB
#   GPUs: {gpus}
# Every key has a default, so a key left out keeps it. Relative paths are resolved against
# this file's folder; `package:NAME` names NAME inside the installed cortex package.
# Environment variables override keys: CORTEX_LOG_LEVEL=DEBUG, CORTEX_BUS_BACKEND=nats,
# CORTEX_DATA_PLANE_LISTEN=... (docs/config.md lists every name).
# `cortex init --force` regenerates this file and keeps the old one as config.yaml.old.

# Folder of the event log (events.db), pid file, status file and bus state.
data_dir: .
# Ed25519 key file: the node's identity and peer id. cortex init creates it once and never replaces it.
identity: node.key

bus:
  # Gossip bus backend: libp2p (peer to peer) or nats (a NATS server).
  backend: libp2p
  # libp2p listen multiaddrs. 127.0.0.1 accepts only this machine; write
  # /ip4/0.0.0.0/tcp/4001 to accept peers from other machines. Port 0 picks a free port.
  listen: [/ip4/127.0.0.1/tcp/0]
  # libp2p multiaddrs ending in /p2p/<peer id> of nodes to join; empty starts a new swarm.
  bootstrap: []
  # URL of the NATS server for backend nats, such as nats://127.0.0.1:4222;
  # null starts a nats-server in data_dir.
  nats_url: null
  # Seconds the join sync waits for a first peer.
  join_wait_s: 2.0

data_plane:
  # ZeroMQ ROUTER endpoint for tensors between nodes; port 0 picks a free port.
  listen: tcp://127.0.0.1:0
  # Seconds one expert call may take before it is retried on another replica (block calls get 4 times this).
  call_timeout_s: 10.0

api:
  # Reserved HOST:PORT for an HTTP API. Cortex has no HTTP API yet, so nothing listens here.
  listen: {api_listen}

# Models this node serves. fragments: auto claims fragments within memory_budget_mb, or list
# them, such as [head, "block[0:4]", "expert[1][0]"].
models:
  - path: package:demo_model
    # Name announced with the model; null means the folder name.
    name: null
    fragments: auto
    # MiB of fragments this node may claim: {budget_basis}.
    memory_budget_mb: {memory_budget_mb}

# MiB of KV cache this node admits across sessions, advertised to peers.
kv_cache_budget_mb: {kv_cache_budget_mb}
# torch threads of the node process: the cores this process may use.
torch_threads: {cores}
# auto, cpu or cuda. {device_reason}
device: {device}
# float32, bfloat16 or float16.
dtype: {dtype}
# Light local model that generates the reply when the swarm cannot (degraded mode). none turns it off.
fallback_model: package:demo_model
# DEBUG, INFO, WARNING or ERROR, for Cortex's own messages.
log_level: INFO
# The same levels for the libraries libp2p, multiaddr, asyncio, nats and trio, which log
# thousands of lines a minute at DEBUG.
library_log_level: WARNING

quorum:
  # Minimum replicas that compute each expert call of the requests this node routes, 1 to 8;
  # with 2 or more, their outputs are compared.
  redundancy: 1
  # Probability (0 to 1) that a call with one replica also goes to a second one, to compare them.
  spot_check: 0.0
  # Seed of the spot-check draw, recorded in each spot-check vote.
  seed: 0
  # Probability (0 to 1) that a replicated call also goes to one peer excluded for wrong
  # outputs, so a peer that recovered can be trusted again.
  probe: 0.02
  # TEST ONLY: a fault mode that makes this node compute wrong outputs on purpose; keep null.
  fault: null
"""


def _round_down(value_mb: float, minimum: int) -> int:
    return max(minimum, int(value_mb // BUDGET_STEP_MB) * BUDGET_STEP_MB)


def describe_gpus(hardware: Hardware) -> str:
    """Return the GPUs line of the header, such as `1 x NVIDIA H200 (143771 MiB), through torch`."""
    if not hardware.gpus:
        return "none found (torch sees no CUDA device and nvidia-smi is absent or lists none)"
    names = ", ".join(f"{gpu.name} ({gpu.memory_mb} MiB)" for gpu in hardware.gpus)
    return f"{len(hardware.gpus)}: {names}, found by {hardware.gpu_source}"


def render_config(hardware: Hardware) -> str:
    """Return the commented YAML config for a node on `hardware`."""
    if hardware.torch_cuda:
        memory_mb = float(hardware.gpus[0].memory_mb)
        budget_basis = f"half of the first GPU's {hardware.gpus[0].memory_mb} MiB"
        device, dtype = "cuda", "bfloat16"
        device_reason = "torch can use the GPU, so the node runs on it."
    else:
        memory_mb = float(hardware.ram_mb)
        budget_basis = f"half of the {hardware.ram_mb} MiB of RAM"
        device, dtype = "cpu", "float32"
        device_reason = "torch sees no CUDA device, so the node runs on the CPU."
        if hardware.gpus:
            device_reason = (
                "nvidia-smi lists GPUs, but this torch cannot use them (a CPU build); install a CUDA build of "
                "torch 2.13.0 and run `cortex init --force` to use them."
            )
    return _TEMPLATE.format(
        cores=hardware.cpu_cores,
        cpu_model=hardware.cpu_model,
        machine=hardware.machine,
        ram_mb=hardware.ram_mb,
        gpus=describe_gpus(hardware),
        api_listen=DEFAULT_API_LISTEN,
        budget_basis=budget_basis,
        memory_budget_mb=_round_down(memory_mb * MODEL_MEMORY_SHARE, MIN_MODEL_BUDGET_MB),
        kv_cache_budget_mb=_round_down(memory_mb * KV_CACHE_SHARE, DEFAULT_KV_CACHE_BUDGET_MB),
        device=device,
        device_reason=device_reason,
        dtype=dtype,
    )
