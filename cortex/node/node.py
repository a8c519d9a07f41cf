"""The node process: one asyncio task group that joins the swarm, loads fragments and serves them.

Lifecycle of `Node.run()`:

1. Refuse to start if the pid file of the data directory names a live process.
2. Open the log store, views and bus; join (the bus syncs history from a peer).
3. Refuse to go on if a peer speaks another protocol major, or if another live node signs
   with this node's key (the Acceptor reports `own_identity_conflict`).
4. Publish `PeerJoined`, then claim (`ShardClaimed`) and load (`ShardLoaded`) fragments.
5. Serve block and expert calls on the data plane, heartbeat every `HEARTBEAT_S`, and drive
   the requests this node is the driver of.
6. On SIGTERM or SIGINT: stop taking requests, let running ones finish (at most
   `DRAIN_TIMEOUT_S`), publish `PeerLeft`, flush the bus and exit 0.

The node writes `<data_dir>/node.status.json` once it serves, so launchers know it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import torch

import cortex.scheduler  # noqa: F401 - registers the request event types
from cortex import __version__
from cortex.bus.bus import BusConfig, GossipBus
from cortex.bus.errors import TransportError
from cortex.bus.nats_transport import NatsTransport
from cortex.bus.transport import Transport
from cortex.comm import (
    RECORD_TYPES,
    DataPlane,
    ExpertBatchProduced,
    ExpertBatchSent,
    ExpertOutputProduced,
    IncomingCall,
    Rejection,
    Response,
    StageInputSent,
    StageOutputProduced,
)
from cortex.comm.penalties import FramePenalties
from cortex.comm.records import EXPERT_INPUT_TYPES
from cortex.driver.executors import BlockExecutor, worker_compute
from cortex.driver.remote import RemoteBlockExecutor
from cortex.driver.fallback import FALLBACK_HARDWARE_KEY, FallbackError, open_fallback
from cortex.driver.requests import DriverContext, RequestDriver, Takeover
from cortex.driver.takeover import (
    DRIVER_SILENCE_MS,
    TAKEOVER_REPAIR_WAIT_MS,
    fallback_order,
    readable_order,
    superseded_by,
    takeover_due,
)
from cortex.driver.router import TokenRouter
from cortex.node.claims import choose_fragments, fragment_sizes
from cortex.node.config import ModelSettings, NodeConfig
from cortex.node.directory import SwarmDirectory
from cortex.node.faults import FaultInjector, parse_fault
from cortex.node.driving import end_taken_over, fallback_context, missing_fragments, prompt_readers_of, takeover_of
from cortex.node.lifecycle import (
    STATUS_FILE_NAME, NodeRefused, check_pid_file, hardware_summary, prepare_data_dir, remove_pid_file, write_pid_file,
)
from cortex.node.service import ExpertBatcher, ModelService, ServiceError
from cortex.quorum import TrustReducer, TrustView
from cortex.quorum.blocks import block_replicator
from cortex.quorum.equivocation import EquivocationReporter
from cortex.quorum.policy import QuorumPolicy
from cortex.quorum.replicated import QuorumSettings
from cortex.registry import RegistryReducer, RegistryView
from cortex.router import RouterReducer, RouterView
from cortex.scheduler import KV_CACHE_HARDWARE_KEY, SchedulerReducer, SchedulerView
from cortex.scheduler.admission import ModelGeometry
from cortex.scheduler.planning import PlanningContext, driver_order
from cortex.scheduler.request_events import (
    RequestAccepted,
    RequestCancelled,
    RequestCompleted,
    RequestFailed,
    RequestSubmitted,
    request_id_for,
)
from events import (
    SCHEMA_MAJOR,
    Acceptor,
    Event,
    EventWriter,
    Identity,
    LogStore,
    PeerHeartbeat,
    PeerJoined,
    PeerLeft,
    Projection,
    ShardClaimed,
    ShardLoaded,
    wall_clock_ms,
)

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = os.environ.get("CORTEX_PROTOCOL_VERSION", f"{SCHEMA_MAJOR}.0")
HEARTBEAT_S = 1.0
DRAIN_TIMEOUT_S = 30.0
IDENTITY_PROBE_S = 1.5
# A submission older than this when it arrives came from history (a join sync), not a live client.
STALE_REQUEST_MS = 60_000
# A gap longer than this between two ticks of the stall watch means the event loop was stopped (a
# paused process, a stalled machine). Peers count a node silent after DRIVER_SILENCE_MS without a
# heartbeat, so with a heartbeat interval of slack on each side they may already have taken its
# requests over, or accepted requests it should drive.
STALL_GAP_S = DRIVER_SILENCE_MS / 1000 - 2 * HEARTBEAT_S
# After such a stall the node catches up before it drives a new request or takes one over: for
# at least CATCH_UP_MIN_S (gossip still queued, one anti-entropy round), then while peers announce
# events it lacks, up to TAKEOVER_REPAIR_WAIT_MS in all. A request for it waits CATCH_UP_POLL_S
# at a time.
CATCH_UP_MIN_S = 2.5
CATCH_UP_POLL_S = 0.25
# The maximum wait of a driver for the catch-up before it accepts: the catch-up's own limit,
# plus two ticks of the stall watch, which notices the stall on its first tick after it.
SETTLE_MAX_S = TAKEOVER_REPAIR_WAIT_MS / 1000 + 2 * HEARTBEAT_S
MIB = 1024 * 1024


BOOT_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _clock() -> float:
    """Seconds on a clock that also runs while the machine sleeps (CLOCK_BOOTTIME on Linux), so a suspend counts as a stall."""
    return time.clock_gettime(BOOT_CLOCK)


class Node:
    """One Cortex node: log, views, bus, data plane, loaded fragments and request drivers."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        prepare_data_dir(config)
        self.identity = Identity.load_or_create(config.identity_path)
        self.peer_id = self.identity.peer_id
        self.store = LogStore(config.data_dir / "events.db")
        self.registry: Projection[RegistryView] = Projection(RegistryReducer())
        self.scheduler: Projection[SchedulerView] = Projection(SchedulerReducer())
        self.router_view: Projection[RouterView] = Projection(RouterReducer())
        self.trust: Projection[TrustView] = Projection(TrustReducer())
        self.views: dict[str, Projection[Any]] = {
            "registry": self.registry, "scheduler": self.scheduler, "router": self.router_view, "quorum": self.trust,
        }
        self.acceptor = Acceptor(self.store, list(self.views.values()), own_peer_id=self.peer_id)
        self.equivocations = EquivocationReporter(self.store, self.peer_id, lambda: self.acceptor.counters["equivocations"])
        self.writer = EventWriter(self.identity, self.acceptor)
        self.bus = GossipBus(self._transport(), self.acceptor, self._bus_config())
        self.dataplane = DataPlane(
            self.identity,
            sign_many=self.writer.write_many,
            is_known_request=lambda request_id: self.scheduler.view.record(request_id) is not None,
            acceptor=self.acceptor,
            flush_records=self.writer.flush,
            on_reject=self._on_reject,
        )
        self.penalties = FramePenalties(self.peer_id, self.emit, lambda: self.registry.view.peers)
        self.workers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cortex-compute")
        self.compute = worker_compute(self.workers)
        self.faults = FaultInjector(parse_fault(config.quorum.fault) if config.quorum.fault else None)
        try:
            self.fallback = open_fallback(config.fallback_model, config.device, config.dtype, self.compute)
        except FallbackError as error:
            raise NodeRefused(str(error)) from None
        self.services: dict[str, ModelService] = {}
        self.directories: dict[str, SwarmDirectory] = {}
        self.routers: dict[str, TokenRouter] = {}
        self.batchers: dict[str, ExpertBatcher] = {}
        self.tokenizers: dict[str, Any] = {}
        self.stopping = asyncio.Event()
        self.drivers: dict[str, asyncio.Task[None]] = {}  # request id -> the task driving it here
        self._roles: dict[str, str] = {}  # request id -> the previous driver this node's driver replaces, "" for a first driver
        self.driving: set[str] = set()  # ids of the requests this node drives, or ends after a takeover
        self._takeover_due_since: dict[str, int] = {}  # request id -> when its takeover waited first, in ms
        self._last_tick: float | None = None  # `_clock()` time of the stall watch's last tick
        self._catch_up_since: float | None = None  # `_clock()` time the stall watch found a stall
        self._task_group: asyncio.TaskGroup | None = None
        self.joined = False
        self.endpoint = ""
        self.bus_failure: str | None = None  # why the bus could not start; the status file says it

    # --- construction -----------------------------------------------------------

    def _bus_config(self) -> BusConfig:
        return BusConfig(join_wait_s=self.config.bus.join_wait_s, state_path=self.config.data_dir / "bus-state.json")

    def _transport(self) -> Transport:
        settings = self.config.bus
        if settings.backend == "libp2p":
            from cortex.bus.libp2p_transport import Libp2pConfig, Libp2pTransport

            return Libp2pTransport(
                Libp2pConfig(key_pair=self.identity.to_libp2p_key_pair(), listen=list(settings.listen), bootstrap=list(settings.bootstrap))
            )
        if settings.backend == "nats":
            from cortex.bus.nats_transport import NatsConfig, NatsTransport

            return NatsTransport(self.peer_id, NatsConfig(url=settings.nats_url, data_dir=self.config.data_dir / "nats"))
        raise NodeRefused(
            "bus backend 'memory' only connects nodes inside one process; use libp2p or nats for `cortex node start`"
        )

    # --- lifecycle ----------------------------------------------------------------

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT or `stop()`; raise NodeRefused if the node may not join."""
        check_pid_file(self.config.pid_path)
        write_pid_file(self.config.pid_path)
        torch.set_num_threads(self.config.torch_threads)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        try:
            self.bus.add_listener(self._on_events)
            try:
                await self.bus.start()
            except Exception as error:
                self.bus_failure = str(error) or repr(error)  # `cortex submit --config` then answers locally
                raise
            listen = self.config.data_plane.listen
            self.endpoint = await self.dataplane.start(listen[:-2] + ":*" if listen.endswith(":0") else listen)
            await self._check_join()
            self.joined = True
            self._open_models()
            await self.emit(self._announcement())
            try:
                async with asyncio.TaskGroup() as group:
                    self._task_group = group
                    heartbeat = group.create_task(self._heartbeat_loop())
                    stall_watch = group.create_task(self._stall_watch())
                    await self._load_models()
                    self._write_status("serving")
                    await self.stopping.wait()
                    await self._drain()
                    heartbeat.cancel()
                    stall_watch.cancel()
            finally:
                self._task_group = None  # events and deferred requests after this find no group to drive in
        finally:
            self.stopping.set()
            await self._shut_down()

    async def _check_join(self) -> None:
        """Refuse to join next to a peer of another protocol major or a live copy of this identity."""
        await asyncio.sleep(IDENTITY_PROBE_S if self.bus.transport.peers() else 0)
        conflicts = self.acceptor.counters.get("own_identity_conflict", 0)
        if conflicts:
            raise NodeRefused(
                f"another live node signs with this node's key ({self.peer_id}); {conflicts} of its events arrived. "
                f"Stop the other node or give this one a new key ({self.config.identity_path})"
            )
        mine = PROTOCOL_VERSION.split(".")[0]
        now = wall_clock_ms()
        for peer, record in self.registry.view.peers.items():
            announced = record.announcement
            if announced is None or peer == self.peer_id or not self.registry.view.is_live(peer, now):
                continue
            if announced.protocol_version.split(".")[0] != mine:
                raise NodeRefused(
                    f"peer {peer} speaks protocol {announced.protocol_version}, this node speaks {PROTOCOL_VERSION}; "
                    "run the same major version of Cortex on every node"
                )

    def _announcement(self) -> PeerJoined:
        names = {f"model:{service.name}": service_id for service_id, service in self.services.items()}
        hardware: dict[str, int | str | bool] = {**hardware_summary(self.config), **names}
        hardware[KV_CACHE_HARDWARE_KEY] = int(self.config.kv_cache_budget_mb * MIB)
        if self.fallback is not None:
            hardware[FALLBACK_HARDWARE_KEY] = self.fallback.model_id
        return PeerJoined(
            bus_addresses=tuple(getattr(self.bus.transport, "listen_addresses", [])),
            data_endpoint=self.endpoint,
            curve_public_key=self.identity.curve_public_key.decode(),
            hardware=hardware,
            protocol_version=PROTOCOL_VERSION,
            software_version=__version__,
        )

    async def emit(self, body: Any, refs: tuple[str, ...] = ()) -> Event:
        """Write one of this node's events to its log and publish it."""
        event = self.writer.write(body, refs=refs)
        await self.bus.publish(event)
        return event

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await self.emit(PeerHeartbeat(latest_seq=self.writer.last_seq))
            if not self._catching_up():
                self._take_over_silent_drivers()

    async def _stall_watch(self) -> None:
        """Find stalls of the event loop: a tick more than STALL_GAP_S after the previous one starts a catch-up.

        It runs apart from the heartbeat loop, so a slow publish of a heartbeat does not count as a stall.
        """
        self._last_tick = _clock()
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            now = _clock()
            if now - self._last_tick > STALL_GAP_S:
                logger.warning(
                    "this node's event loop was stopped for %.1f s, so peers may have taken its requests over. It drives "
                    "no new request, accepts none and takes none over until it has caught up with them (%.1f to %.1f s)",
                    now - self._last_tick - HEARTBEAT_S, CATCH_UP_MIN_S, TAKEOVER_REPAIR_WAIT_MS / 1000,
                )
                self._catch_up_since = now
            self._last_tick = now

    def _catching_up(self) -> bool:
        """Return whether this node is still catching up with its peers after its event loop was stopped.

        The first call past the catch-up ends it and logs which peers' events are still missing, if any.
        """
        now = _clock()
        if self._last_tick is not None and now - self._last_tick > STALL_GAP_S:
            return True  # stopped, and the stall watch has not run since
        if self._catch_up_since is None:
            return False
        elapsed = now - self._catch_up_since
        if elapsed < CATCH_UP_MIN_S:
            return True
        lacking = [peer for peer in self.registry.view.peers if self.bus.lacks_events_of(peer)]
        if lacking and elapsed < TAKEOVER_REPAIR_WAIT_MS / 1000:
            return True
        if lacking:
            logger.warning(
                "caught up with peers %.1f s after the stall, still missing events of %s, which anti-entropy fetches later",
                elapsed, ", ".join(sorted(lacking)),
            )
        else:
            logger.info("caught up with peers %.1f s after the stall", elapsed)
        self._catch_up_since = None
        return False

    async def _settled(self) -> None:
        """Return once this node is not catching up after a stall (`_catching_up`), is stopping, or after SETTLE_MAX_S."""
        deadline = _clock() + SETTLE_MAX_S
        while not self.stopping.is_set() and self._catching_up() and _clock() < deadline:
            await asyncio.sleep(CATCH_UP_POLL_S)

    async def _drain(self) -> None:
        logger.info("draining %d running request(s)", len(self.drivers))
        if self.drivers:
            await asyncio.wait(set(self.drivers.values()), timeout=DRAIN_TIMEOUT_S)

    async def _shut_down(self) -> None:
        with contextlib.suppress(Exception):
            if self.joined and self.bus.transport.running:
                await self.emit(PeerLeft(reason="stopped"))
                await self.bus.flush()
        with contextlib.suppress(Exception):
            await self.bus.stop()
        with contextlib.suppress(Exception):
            await self.dataplane.close()
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.writer.close()
        self.store.close()
        self._write_status("bus_failed" if self.bus_failure is not None else "stopped")
        remove_pid_file(self.config.pid_path)
        logger.info("node %s stopped", self.peer_id)

    def _nats_url(self) -> str | None:
        """Return the NATS server URL this node uses (its own local server's too), or None on libp2p."""
        if not isinstance(self.bus.transport, NatsTransport):
            return None
        try:
            return self.bus.transport.url
        except TransportError:
            return None

    def _write_status(self, state: str) -> None:
        status = {
            "state": state,
            "bus_error": self.bus_failure,
            "pid": os.getpid(),
            "peer_id": self.peer_id,
            "data_endpoint": self.endpoint,
            "bus_addresses": list(getattr(self.bus.transport, "listen_addresses", [])),
            "nats_url": self._nats_url(),
            "models": {model: service.fragments() for model, service in self.services.items()},
            # Replay of this node's log must rebuild views with these digests (tests/replay).
            "view_digests": {name: projection.view.digest() for name, projection in self.views.items()},
            "checkpoint_bytes_read": {model: service.loader.checkpoint.bytes_read for model, service in self.services.items()},
            "dataplane": {**self.dataplane.counters, **self.dataplane.timings},
            "router": {
                model: {
                    "dispatches": router.stats.dispatches,
                    "single_token_dispatches": router.stats.single_token_dispatches,
                    "single_token_dispatch_s": router.stats.single_token_dispatch_s,
                    "retries": router.stats.retries,
                    "hedges": router.stats.hedges,
                    "hedges_won": router.stats.hedges_won,
                    "quorum": dataclasses.asdict(router.stats.quorum),
                }
                for model, router in self.routers.items()
            },
            "expert_batching": {
                model: {"forward_passes": batcher.forward_passes, "merged_calls": batcher.merged_calls}
                for model, batcher in self.batchers.items()
            },
        }
        path = self.config.data_dir / STATUS_FILE_NAME
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps(status))
        temporary.replace(path)

    # --- fragments ----------------------------------------------------------------

    def _open_models(self) -> None:
        for settings in self.config.models:
            service = ModelService(settings.path, settings.display_name, self.config.device, self.config.dtype)
            self.services[service.model_id] = service
            directory = SwarmDirectory(
                service,
                lambda: self.registry.view,
                lambda: self.scheduler.view,
                self.dataplane,
                self.peer_id,
                self.config.data_plane.call_timeout_s,
                trust=lambda: self.trust.view,
            )
            self.directories[service.model_id] = directory
            self.routers[service.model_id] = TokenRouter(directory, self._quorum_settings(service.model_id))
            self.batchers[service.model_id] = ExpertBatcher(service, self.compute)
        self.dataplane.register_handler("stage", self._serve_stage, accepts=(StageInputSent,))
        self.dataplane.register_handler("expert", self._serve_expert, accepts=EXPERT_INPUT_TYPES)

    async def _load_models(self) -> None:
        for settings in self.config.models:
            service = next(s for s in self.services.values() if s.path == settings.path)
            fragments = self._fragments_to_claim(settings, service)
            for fragment in fragments:
                estimate = fragment_sizes(service.loader).get(fragment, 0)
                await self.emit(ShardClaimed(model_id=service.model_id, fragment=fragment, memory_bytes=estimate))
            loaded = 0
            for fragment in fragments:
                nbytes = await self.compute(service.load, fragment)
                loaded += nbytes
                await self.emit(ShardLoaded(model_id=service.model_id, fragment=fragment, memory_bytes=nbytes))
            service.attach(self.routers[service.model_id], self.compute)
            if service.head is not None:
                self._open_tokenizer(service)
            logger.info(
                "serving %s (%s): %d fragments, %.2f MiB: %s",
                service.name, service.model_id[:12], len(fragments), loaded / MIB, _summarize(fragments),
            )

    def _fragments_to_claim(self, settings: ModelSettings, service: ModelService) -> list[str]:
        if settings.fragments is not None:
            return list(settings.fragments)
        now = wall_clock_ms()
        coverage = self.registry.view.coverage(service.model_id, now)
        holders = {fragment: len(set(c.loaded) | set(c.claimed)) for fragment, c in coverage.items()}
        return choose_fragments(fragment_sizes(service.loader), holders, int(settings.memory_budget_mb * MIB))

    def _open_tokenizer(self, service: ModelService) -> None:
        from transformers import AutoTokenizer

        self.tokenizers[service.model_id] = AutoTokenizer.from_pretrained(str(service.path), local_files_only=True)

    # --- serving ------------------------------------------------------------------

    def _service(self, model_id: str) -> ModelService:
        service = self.services.get(model_id)
        if service is None:
            raise ServiceError(f"model {model_id[:16]} is not served by this node")
        return service

    async def _serve_stage(self, call: IncomingCall) -> Response:
        body = call.inputs[0].event.body
        service = self._service(body.model_id)
        spec = f"block[{body.start}:{body.stop}]"
        if body.position == 0 and spec in service.blocks:
            service.blocks[spec].close_session(call.request_id)  # a new start or a replay (takeover) of the session
        hidden = await service.executor(spec).run(call.request_id, call.tensors["hidden"].clone(), body.position)
        hidden = self.faults.apply_block(hidden)
        fields = {"model_id": body.model_id, "step": body.step, "start": body.start, "stop": body.stop}
        return Response(StageOutputProduced, fields, {"hidden": hidden})

    def _quorum_settings(self, model_id: str) -> QuorumSettings:
        settings = self.config.quorum
        policy = QuorumPolicy(
            settings.redundancy, round(settings.spot_check * 1_000_000), settings.seed, round(settings.probe * 1_000_000)
        )
        return QuorumSettings(
            emit=self.emit, model_id=model_id, own_peer=self.peer_id, policy=policy,
            redundancy_of=lambda request_id: self.router_view.view.redundancy_of(request_id), lying=self.faults.lying,
        )

    async def _serve_expert(self, call: IncomingCall) -> Response:
        """Run every expert the call carries (one input per expert, all of one model and step)."""
        first = call.inputs[0].fields
        self._service(first["model_id"])
        batcher = self.batchers[first["model_id"]]
        for received in call.inputs:
            model_id, step = received.fields["model_id"], received.fields["step"]
            if (model_id, step) != (first["model_id"], first["step"]):
                raise ServiceError(f"input {received.name!r} names model {model_id[:16]} step {step}; one call serves one model and step")
        hidden_size = self.services[first["model_id"]].loader.hidden_size
        for received in call.inputs:
            # Rows of another width would fail the forward pass merged with other calls' rows.
            if received.tensor.dim() != 2 or received.tensor.shape[1] != hidden_size:
                raise ServiceError(
                    f"input {received.name!r} has shape {list(received.tensor.shape)}; expert rows must be [N, {hidden_size}]"
                )
        segments = [(received.fields["layer"], received.fields["expert"], received.tensor) for received in call.inputs]
        # Each expert goes to the batcher, which merges it with other calls' rows for that expert.
        outputs = await batcher.run_many(segments)
        outputs = await self.faults.apply(self.services[first["model_id"]], segments, list(outputs))
        tensors = {received.name: output.contiguous() for received, output in zip(call.inputs, outputs, strict=True)}
        per_tensor = {received.name: {"layer": layer, "expert": expert} for received, (layer, expert, _rows) in zip(call.inputs, segments)}
        fields = {"model_id": first["model_id"], "step": first["step"]}
        # Inputs sent as one batch record get their outputs as one batch record, and the same for single records.
        record = ExpertBatchProduced if isinstance(call.inputs[0].event.body, ExpertBatchSent) else ExpertOutputProduced
        return Response(record, fields, tensors, per_tensor)

    def _on_reject(self, rejection: Rejection) -> None:
        self.penalties(rejection)  # a rate-limited PeerPenalized for an identified sender

    def records_of(self, request_id: str) -> list[str]:
        """Return the ids of the request-scoped records in this node's log for `request_id`."""
        self.writer.flush()  # the data plane appends records a moment later, in groups
        return self.store.ids(ref=request_id, types=[record.__name__ for record in RECORD_TYPES])

    # --- requests -----------------------------------------------------------------

    def _on_events(self, events: list[Event]) -> None:
        if self._task_group is not None:
            for penalty in self.equivocations.new_penalties():
                self._task_group.create_task(self.emit(penalty))
        for event in events:
            if isinstance(event.body, RequestSubmitted):
                self._consider(event)
            elif isinstance(event.body, RequestAccepted) and event.author != self.peer_id:
                self._stop_taken_over(event)
            elif isinstance(event.body, (RequestCompleted, RequestFailed, RequestCancelled)):
                self._close_sessions(event.body.request_id)

    def _stop_taken_over(self, accepted: Event) -> None:
        """Cancel this node's driver of a request when `accepted`, another peer's acceptance of it, replaces it (`superseded_by`).

        A driver that was only stalled (a paused process) receives its successor's acceptance
        once it runs again and stops, so only the successor streams on and ends the request.
        Of two peers that accepted a request in place of the same previous driver (or both as
        its first driver), the one with the earlier acceptance stops.
        """
        body: RequestAccepted = accepted.body
        task = self.drivers.get(body.request_id)
        record = self.scheduler.view.record(body.request_id)
        if task is None or task.done() or record is None:
            return
        happened = superseded_by(self.registry.view, record, self.peer_id, self._roles.get(body.request_id, ""), accepted)
        if happened:
            logger.warning("request %s %s, so this node stops its driver of it", body.request_id[:12], happened)
            task.cancel()

    def _close_sessions(self, request_id: str) -> None:
        """Drop the KV caches of a finished request on every block this node holds."""
        for service in self.services.values():
            for block in service.blocks.values():
                block.close_session(request_id)

    def _consider(self, event: Event, deferred: bool = False) -> None:
        request: RequestSubmitted = event.body
        service = self.services.get(request.model_id)
        if self.stopping.is_set() or self._task_group is None:
            return
        request_id = request_id_for(event.author, request.nonce)
        record = self.scheduler.view.record(request_id)
        if record is not None and (record.is_terminal or record.driver):
            return  # accepted by another peer, or from history (a join sync after a restart) and handled
        if request_id in self.driving:
            return  # this node took it over meanwhile
        if wall_clock_ms() - event.time_ms > STALE_REQUEST_MS:
            logger.info("request %s was submitted %d s ago; not driving it", request_id[:12], (wall_clock_ms() - event.time_ms) // 1000)
            return
        now = wall_clock_ms()
        order = readable_order(driver_order(self.registry.view, request.model_id, request_id, now, submitter=event.author), request)
        drives = order[:1] == [self.peer_id] and service is not None and service.head is not None
        fallback = not order and self.fallback is not None and readable_order(fallback_order(self.registry.view, request_id, now, event.author), request)[:1] == [self.peer_id]
        if not (drives or fallback):
            return
        if self._catching_up():
            # After a stall, another peer may have accepted this request already: drive it only
            # if no acceptance arrived once this node caught up.
            if not deferred:
                logger.info("request %s arrived while this node catches up after a stall, so it waits until then", request_id[:12])
            asyncio.get_running_loop().call_later(CATCH_UP_POLL_S, self._consider, event, True)
            return
        if drives:
            assert service is not None
            context = self._driver_context(service)
        else:
            # No live head holder: this node is the request's fallback driver (docs/degraded.md).
            assert self.fallback is not None
            context = fallback_context(
                self.identity, self.emit, request.model_id, self.compute, self.fallback, self.records_of,
                lambda submitted: prompt_readers_of(self.registry.view, submitted), self._settled,
            )
        self._start_driver(RequestDriver(context, event))

    def _start_driver(self, driver: RequestDriver) -> None:
        assert self._task_group is not None
        self.driving.add(driver.request_id)
        task = self._task_group.create_task(driver.run())
        self.drivers[driver.request_id] = task
        self._roles[driver.request_id] = driver.takeover.previous_driver if driver.takeover else ""
        task.add_done_callback(lambda _: self._driver_done(driver.request_id, task))

    def _driver_done(self, request_id: str, task: asyncio.Task[None]) -> None:
        if self.drivers.get(request_id) is task:
            del self.drivers[request_id]
            self._roles.pop(request_id, None)
            self.driving.discard(request_id)

    def _take_over_silent_drivers(self) -> None:
        """Take over the in-flight requests whose driver went silent and whose next driver is this node."""
        if self.stopping.is_set() or self._task_group is None:
            return
        now = wall_clock_ms()
        in_flight = self.scheduler.view.in_flight()
        ended = set(self._takeover_due_since) - {record.request_id for record in in_flight}
        for request_id in ended:
            del self._takeover_due_since[request_id]
        for record in in_flight:
            service = self.services.get(record.model_id)
            if service is None or service.head is None or record.request_id in self.driving:
                continue
            if takeover_due(self.registry.view, record, self.peer_id, now) is None:
                self._takeover_due_since.pop(record.request_id, None)
                continue
            if self._awaits_missing_events(record.request_id, record.drivers, now):
                continue
            found = takeover_of(self.registry.view, self.store, record, self.identity, now)
            if found is None:
                continue
            if isinstance(found[1], str):
                self.driving.add(record.request_id)
                self._task_group.create_task(end_taken_over(self.emit, record, found[0], found[1]))
            else:
                submitted, takeover = found
                assert isinstance(takeover, Takeover)
                logger.warning(
                    "taking request %s over from silent driver %s after %d streamed tokens",
                    record.request_id[:12], takeover.previous_driver or "(none accepted)", len(takeover.token_ids),
                )
                self._start_driver(RequestDriver(self._driver_context(service), submitted, takeover))

    def _awaits_missing_events(self, request_id: str, drivers: tuple[str, ...], now_ms: int) -> bool:
        """Return whether a takeover of `request_id` waits for events of its drivers that anti-entropy is fetching.

        A batch of the silent driver that reached other peers but not this node would
        otherwise be streamed twice, or fail the takeover as a gap. The wait is at most
        TAKEOVER_REPAIR_WAIT_MS from the first time the takeover was due.
        """
        lacking = [driver for driver in drivers if self.bus.lacks_events_of(driver)]
        first_due = self._takeover_due_since.setdefault(request_id, now_ms)
        if not lacking or now_ms - first_due >= TAKEOVER_REPAIR_WAIT_MS:
            if lacking:
                logger.warning(
                    "taking request %s over without every event of its drivers %s: anti-entropy did not fetch them within %d ms",
                    request_id[:12], ", ".join(lacking), TAKEOVER_REPAIR_WAIT_MS,
                )
            self._takeover_due_since.pop(request_id, None)
            return False
        if first_due == now_ms:
            logger.info("request %s: waiting for missing events of %s before taking it over", request_id[:12], ", ".join(lacking))
        return True

    def _driver_context(self, service: ModelService) -> DriverContext:
        directory = self.directories[service.model_id]
        router = self.routers[service.model_id]
        assert service.head is not None
        tokenizer = self.tokenizers[service.model_id]
        eos = {service.loader.config.eos_token_id, tokenizer.eos_token_id} - {None}

        def planning(own_request: str) -> PlanningContext:
            return PlanningContext(
                self.registry.view, self.scheduler.view, wall_clock_ms(), directory.observations, own_request=own_request
            )

        def executor_for(spec: str, holder: str) -> BlockExecutor:
            if holder == self.peer_id:
                return service.executor(spec)
            return RemoteBlockExecutor(directory, holder, spec)

        return DriverContext(
            identity=self.identity,
            emit=self.emit,
            model_id=service.model_id,
            head=service.head,
            tokenizer=tokenizer,
            eos_token_ids=sorted(int(e) for e in eos if isinstance(e, int)),
            geometry=ModelGeometry.from_config(service.loader.checkpoint.config, dtype=self.config.dtype),
            compute=self.compute,
            planning=planning,
            record=lambda request_id: self.scheduler.view.record(request_id),
            executor_for=executor_for,
            records_of=self.records_of,
            fallback=self.fallback,
            missing_fragments=lambda: missing_fragments(self.registry.view, service, wall_clock_ms()),
            readers=lambda submitted: prompt_readers_of(self.registry.view, submitted),
            settled=self._settled,
            replicate=block_replicator(
                directory.holders, executor_for, router.quorum or self._quorum_settings(service.model_id), router.stats.quorum
            ),
        )


def _summarize(fragments: list[str]) -> str:
    experts = [f for f in fragments if f.startswith("expert")]
    others = [f for f in fragments if not f.startswith("expert")]
    return ", ".join(others + ([f"{len(experts)} experts"] if experts else [])) or "nothing"
