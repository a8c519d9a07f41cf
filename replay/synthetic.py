"""A signed event log with the mix of a busy swarm, for the replay bench and tests.

The simulated swarm has `peers` nodes serving one MoE model of 32 layers (four blocks of
eight layers, a head, and 16 routed experts on each layer). Each node joins, claims and
loads fragments, sends a heartbeat every two simulated seconds, and now and then releases
an expert and claims another. Requests arrive all the time: each is submitted by one node,
accepted by a head holder with a route over the block holders, streamed as token batches
of 8 tokens, and completed. Request content is sealed to the submitter and the driver
with `cortex.privacy`, as nodes do.

With each token batch come the request-scoped records of one decoding step, as they are in
the log of a node on the request's route, with the request id as their first ref as the data
plane writes them. They are the output of one block
(`StageOutputProduced`) and, for two routed experts of one MoE layer, the input sent
(`ExpertInputSent`) and the output produced (`ExpertOutputProduced`). One step in
VOTE_EVERY_STEPS runs its experts with redundancy 2: each expert has a second output from
another peer, and the block holder publishes the quorum's `QuorumVoted` and `QuorumDecided`.

Request events exist only when the Scheduler's event types import (`cortex.scheduler`),
and records only when the data plane's do (`cortex.comm.records`); otherwise the mix is
membership and shard events alone. `mix_types()` returns the types a generated log can
contain; votes come with records when the quorum's event types import (`cortex.quorum`).
Events are signed with real keys (seeded, so the peers are the same in every run), each
author numbering request-scoped records in their own sequence when the build has event
scopes, and stored with `LogStore.insert` without the acceptance checks, since
the generator is trusted; `cortex replay LOG --verify` passes on the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from events.codec import Event, sign_event
from events.identity import Identity
from events.membership import PeerHeartbeat, PeerJoined
from events.shards import ShardClaimed, ShardLoaded, ShardReleased, parse_fragment
from events.store import LogStore
from replay.reader import is_swarm_scoped

GENERATOR_VERSION = 4
"""Bump when the mix changes, so cached logs of the old mix are not reused."""

MODEL_ID = hashlib.blake2b(b"synthetic moe model", digest_size=32).hexdigest()
LAYERS = 32
BLOCK_SIZE = 8
EXPERTS_PER_LAYER = 16
TOKENS_PER_BATCH = 8
BATCHES_PER_REQUEST = 12
HEARTBEAT_INTERVAL_MS = 2_000
EVENT_SPACING_MS = 3
"""Simulated wall-clock time between two consecutive events of the swarm."""
START_MS = 1_764_800_000_000
VOTE_EVERY_STEPS = 4
"""One decoding step in this many has its experts run twice and voted on."""


def scheduler_types() -> Any:
    """Return the `cortex.scheduler` module if its request events import, else None."""
    try:
        import cortex.scheduler as scheduler
    except ImportError:
        return None
    return scheduler


def record_types() -> Any:
    """Return the `cortex.comm.records` module if the data plane's record types import, else None."""
    try:
        import cortex.comm.records as records
    except ImportError:
        return None
    return records


def quorum_types() -> Any:
    """Return the `cortex.quorum` module if the quorum's event types import, else None."""
    try:
        import cortex.quorum as quorum
    except ImportError:
        return None
    return quorum


def mix_types() -> list[str]:
    """Return the event types a generated log contains in this build."""
    names = ["PeerJoined", "PeerHeartbeat", "ShardClaimed", "ShardLoaded", "ShardReleased"]
    if scheduler_types() is not None:
        names += ["RequestSubmitted", "RequestAccepted", "TokenGenerated", "RequestCompleted"]
        if record_types() is not None:
            names += ["StageOutputProduced", "ExpertInputSent", "ExpertOutputProduced"]
            if quorum_types() is not None:
                names += ["QuorumVoted", "QuorumDecided"]
    return names


def schema_fingerprint() -> str:
    """Return the names, versions and fields of the mix's types; a cached log is valid only for these."""
    from events.model import type_by_name

    parts = []
    for name in mix_types():
        registered = type_by_name(name)
        fields = sorted(registered.field_names) if registered is not None else []
        parts.append(f"{name} {registered.version if registered else '?'} {','.join(fields)}")
    return "\n".join(parts)


@dataclass
class _Peer:
    identity: Identity
    seq: int = 0
    request_seq: int = 0
    next_heartbeat_ms: int = 0
    loaded: list[str] = field(default_factory=list)


def submission(scheduler: Any, submitter: str, rng: random.Random, **fields: Any) -> tuple[Any, str | None]:
    """Build a RequestSubmitted body; return it and the request id, or None if it is the event id.

    Handles both request-id schemes of the Scheduler's events: the id of the submission
    event, or a digest of the submitter and a random `nonce` field (`request_id_for`).
    """
    names = {item.name for item in dataclasses.fields(scheduler.RequestSubmitted)}
    if "nonce" not in names:
        return scheduler.RequestSubmitted(**fields), None
    nonce = rng.randbytes(16).hex()
    return scheduler.RequestSubmitted(nonce=nonce, **fields), scheduler.request_id_for(submitter, nonce)


class SwarmSimulator:
    """Produces the signed events of the simulated swarm, one at a time, in a causal order."""

    def __init__(self, peers: int, seed: int) -> None:
        self._random = random.Random(seed)
        self.peers = [_Peer(Identity(self._random.randbytes(32))) for _ in range(peers)]
        self._scheduler = scheduler_types()
        self._records = record_types()
        self._quorum = quorum_types() if self._records is not None else None
        self._lamport = 0
        self._now_ms = START_MS
        self._sealed: dict[tuple[str, str, str], str] = {}

    def events(self) -> Iterator[Event]:
        """Yield events forever: the joins and first claims, then the steady mix."""
        for peer in self.peers:
            yield from self._join(peer)
        while True:
            yield from self._heartbeats_due()
            if self._scheduler is not None and self._random.random() < 0.8:
                yield from self._request()
            else:
                yield from self._churn()

    def _sign(self, peer: _Peer, body: Any, refs: tuple[str, ...] = ()) -> Event:
        if is_swarm_scoped(type(body).__name__):
            peer.seq += 1
            seq = peer.seq
        else:
            peer.request_seq += 1
            seq = peer.request_seq
        self._lamport += 1
        self._now_ms += EVENT_SPACING_MS
        return sign_event(peer.identity, body, seq=seq, lamport=self._lamport, time_ms=self._now_ms, refs=refs)

    def _join(self, peer: _Peer) -> Iterator[Event]:
        index = self.peers.index(peer)
        yield self._sign(peer, PeerJoined(
            bus_addresses=(f"/ip4/127.0.0.1/tcp/{4001 + index}/p2p/{peer.identity.peer_id}",),
            data_endpoint=f"tcp://127.0.0.1:{5001 + index}",
            curve_public_key=peer.identity.curve_public_key.decode(),
            hardware={"cpu_cores": 16, "memory_bytes": 64 * 2**30, "gpu": index % 2 == 0, "gpu_memory_bytes": 24 * 2**30},
            protocol_version="1.0",
            software_version="0.1.0",
        ))
        peer.next_heartbeat_ms = self._now_ms + HEARTBEAT_INTERVAL_MS
        fragments = ["head"] if index % 4 == 0 else []
        fragments.append(f"block[{index % 4 * BLOCK_SIZE}:{(index % 4 + 1) * BLOCK_SIZE}]")
        fragments += [f"expert[{layer}][{(index + layer) % EXPERTS_PER_LAYER}]" for layer in range(1, LAYERS, 3)]
        for fragment in fragments:
            yield from self._claim_and_load(peer, fragment)

    def _claim_and_load(self, peer: _Peer, fragment: str) -> Iterator[Event]:
        size = 2**30 if fragment.startswith("block") else 2**24
        claim = self._sign(peer, ShardClaimed(model_id=MODEL_ID, fragment=fragment, memory_bytes=size))
        yield claim
        yield self._sign(peer, ShardLoaded(model_id=MODEL_ID, fragment=fragment, memory_bytes=size + 4096), (claim.id,))
        peer.loaded.append(fragment)

    def _heartbeats_due(self) -> Iterator[Event]:
        for peer in self.peers:
            if self._now_ms >= peer.next_heartbeat_ms:
                peer.next_heartbeat_ms = self._now_ms + HEARTBEAT_INTERVAL_MS
                yield self._sign(peer, PeerHeartbeat(latest_seq=peer.seq))

    def _churn(self) -> Iterator[Event]:
        peer = self._random.choice(self.peers)
        experts = [fragment for fragment in peer.loaded if fragment.startswith("expert")]
        if experts:
            fragment = self._random.choice(experts)
            peer.loaded.remove(fragment)
            yield self._sign(peer, ShardReleased(model_id=MODEL_ID, fragment=fragment, reason="rebalance"))
        layer = self._random.randrange(1, LAYERS)
        yield from self._claim_and_load(peer, f"expert[{layer}][{self._random.randrange(EXPERTS_PER_LAYER)}]")

    def _request(self) -> Iterator[Event]:
        scheduler = self._scheduler
        submitter = self._random.choice(self.peers)
        drivers = [peer for peer in self.peers if "head" in peer.loaded]
        driver = self._random.choice(drivers)
        prompt = self._sealed_text("prompt", submitter, driver, b"Explain how a mixture of experts routes tokens.")
        body, request_id = submission(
            scheduler, submitter.identity.peer_id, self._random,
            model_id=MODEL_ID, max_tokens=TOKENS_PER_BATCH * BATCHES_PER_REQUEST, prompt_bytes=48, sealed_prompt=prompt,
        )
        submitted = self._sign(submitter, body)
        request_id = request_id or submitted.id
        yield submitted

        route = {f"block[{start}:{start + BLOCK_SIZE}]": self._holder(start) for start in range(0, LAYERS, BLOCK_SIZE)}
        reservations = {fragment: 2**22 for fragment in route}
        refs = (submitted.id,)
        yield self._sign(driver, scheduler.RequestAccepted(
            request_id=request_id, route=route, kv_reservations=reservations, prompt_tokens=12,
            plan_digest=scheduler.plan_digest(route, reservations, 12),
        ), refs)

        tokens = self._sealed_text("tokens", submitter, driver, orjson.dumps({"token_ids": list(range(TOKENS_PER_BATCH)), "text": " routed tokens"}))
        for batch in range(BATCHES_PER_REQUEST):
            start = batch * TOKENS_PER_BATCH
            if self._records is not None:
                yield from self._step_records(route, (request_id,), request_id, step=start)
            yield self._sign(driver, scheduler.TokenGenerated(
                request_id=request_id, step_start=start, step_stop=start + TOKENS_PER_BATCH, sealed_tokens=tokens,
            ), refs)
        yield self._sign(driver, scheduler.RequestCompleted(
            request_id=request_id, prompt_tokens=12, completion_tokens=TOKENS_PER_BATCH * BATCHES_PER_REQUEST,
            finish_reason="length", timings_ms={"prefill": 40, "decode": 900, "total": 950},
            records_digest=hashlib.blake2b(request_id.encode(), digest_size=32).hexdigest(), records_count=96,
        ), refs)

    def _step_records(self, route: dict[str, str], refs: tuple[str, ...], request_id: str, step: int) -> Iterator[Event]:
        """Yield one step's records: a block's output, two experts' inputs and outputs, and maybe a vote."""
        records = self._records
        by_id = {peer.identity.peer_id: peer for peer in self.peers}
        fragment, holder_id = self._random.choice(sorted(route.items()))
        holder = by_id[holder_id]
        block = parse_fragment(fragment)
        tensor = {"model_id": MODEL_ID, "step": step, "dtype": "bfloat16", "shape": (1, 4096), "nbytes": 8192}
        yield self._sign(holder, records.StageOutputProduced(
            start=block.start, stop=block.stop, name="hidden", digest=self._digest(), **tensor,
        ), refs)
        layer = self._random.randrange(block.start, block.stop)
        voted = self._quorum is not None and step // TOKENS_PER_BATCH % VOTE_EVERY_STEPS == 0
        outputs: list[tuple[int, str, str]] = []  # (expert, producer, digest)
        for expert in self._random.sample(range(EXPERTS_PER_LAYER), 2):
            for producer in self._random.sample(self.peers, 2 if voted else 1):
                sent = self._sign(holder, records.ExpertInputSent(
                    layer=layer, expert=expert, name="hidden", digest=self._digest(), **tensor,
                ), refs)
                yield sent
                output = self._sign(producer, records.ExpertOutputProduced(
                    layer=layer, expert=expert, name="output", digest=self._digest(), **tensor,
                ), (*refs, sent.id))
                yield output
                outputs.append((expert, producer.identity.peer_id, output.body.digest))
        if voted:
            yield from self._vote(holder, refs, request_id, step, layer, outputs)

    def _vote(
        self, voter: _Peer, refs: tuple[str, ...], request_id: str, step: int, layer: int, outputs: list[tuple[int, str, str]]
    ) -> Iterator[Event]:
        """Yield the voter's QuorumVoted on the outputs and the agreed QuorumDecided."""
        quorum = self._quorum
        assert quorum is not None, "votes are generated only when cortex.quorum imports"
        experts = tuple(expert for expert, _producer, _digest in outputs)
        call = {"request_id": request_id, "model_id": MODEL_ID, "step": step, "layer": layer}
        yield self._sign(voter, quorum.QuorumVoted(
            dtype="bfloat16", tolerance_nano=10_000_000, experts=experts,
            producers=tuple(producer for _expert, producer, _digest in outputs),
            digests=tuple(digest for _expert, _producer, digest in outputs),
            distances_nano=tuple(self._random.randrange(1_000_000) for _ in outputs), **call,
        ), refs)
        unique = tuple(dict.fromkeys(experts))
        winners = tuple(next(digest for expert, _producer, digest in outputs if expert == chosen) for chosen in unique)
        yield self._sign(voter, quorum.QuorumDecided(
            outcome=quorum.AGREED, quorum=2, rounds=1, experts=unique, winner_digests=winners,
            agreeing=tuple(sorted({producer for _expert, producer, _digest in outputs})), dissenting=(), **call,
        ), refs)

    def _digest(self) -> str:
        return self._random.randbytes(32).hex()

    def _holder(self, start: int) -> str:
        fragment = f"block[{start}:{start + BLOCK_SIZE}]"
        holders = [peer.identity.peer_id for peer in self.peers if fragment in peer.loaded]
        return self._random.choice(holders)

    def _sealed_text(self, kind: str, submitter: _Peer, driver: _Peer, plaintext: bytes) -> str:
        # Sealing costs two X25519 operations, so one sealed text per (kind, pair) is reused.
        from cortex.privacy import seal

        key = (kind, submitter.identity.peer_id, driver.identity.peer_id)
        if key not in self._sealed:
            self._sealed[key] = seal(plaintext, [submitter.identity.peer_id, driver.identity.peer_id])
        return self._sealed[key]


def generate_log(
    path: Path, count: int, peers: int = 16, seed: int = 0, progress: Callable[[int], None] | None = None
) -> dict[str, int]:
    """Write a log of exactly `count` events to `path` (a new file); return the count of each type."""
    if peers < 4:
        raise ValueError(f"peers={peers}: the simulated swarm needs at least 4 peers to cover every block")
    counts: dict[str, int] = {}
    simulator = SwarmSimulator(peers, seed)
    with LogStore(path) as store:
        source = simulator.events()
        written = 0
        while written < count:
            with store.transaction():
                for _ in range(min(10_000, count - written)):
                    event = next(source)
                    store.insert(event)
                    counts[event.type] = counts.get(event.type, 0) + 1
                    written += 1
            if progress is not None:
                progress(written)
    return dict(sorted(counts.items()))


def cached_log(cache_dir: Path, count: int, progress: Callable[[int], None] | None = None) -> tuple[Path, bool]:
    """Return a cached generated log of `count` events, generating it first if needed.

    Returns (path, generated). The file name records the generator version and the schema
    of the mix's types, so a change of either makes a new file. A half-written file never
    gets the final name.
    """
    mix = hashlib.blake2b(schema_fingerprint().encode(), digest_size=4).hexdigest()
    path = cache_dir / f"replay-mix-v{GENERATOR_VERSION}-{mix}-{count}.db"
    if path.exists():
        return path, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    for leftover in cache_dir.glob(partial.name + "*"):
        leftover.unlink()
    generate_log(partial, count, progress=progress)
    partial.rename(path)
    return path, True
