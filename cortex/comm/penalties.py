"""Penalties for rejected tensor frames: a `PeerPenalized` event per offence, rate-limited.

`FramePenalties` is the data plane's `on_reject` hook on a node. For a rejection whose
sender is identified, it publishes `PeerPenalized(peer, "bad_frame", evidence, detail)`:

- the sender is the peer the rejection names: the author of records that matched the
  authenticated connection, or the peer called. Otherwise it is the known peer whose
  CurveZMQ key authenticated the connection (`peers()` lists the peer ids to look in);
- `evidence` lists the ids of the sender's signed records that this node stored, which
  is the case for a bad digest: the records passed the signature check, so with the bytes
  received they show that the sender sent inconsistent data. Other rejections have no
  signed evidence, and `detail` carries the reason and the check's message;
- `unknown_request` is not published, because an honest driver's call can arrive before
  the request's events do; `unknown_kind` and `unauthenticated` never reach the hook with
  an identified sender.

A flood of bad frames cannot flood the bus: one event per (peer, reason) per
`PER_PEER_INTERVAL_S`, and at most `MAX_PER_INTERVAL` events in all per `INTERVAL_S`. The
rest are counted in `counters` (`suppressed`), as are rejections from senders that could
not be identified (`unidentified`). The data plane logs every rejection itself.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from cortex.comm.errors import FrameReason
from cortex.comm.messages import Rejection
from cortex.comm.validation import curve_key_text
from events import InvalidPeerId

logger = logging.getLogger(__name__)

BAD_FRAME = "bad_frame"
PER_PEER_INTERVAL_S = 60.0
INTERVAL_S = 60.0
MAX_PER_INTERVAL = 20
MAX_DETAIL_CHARS = 256
NOT_PUBLISHED = frozenset({FrameReason.UNKNOWN_REQUEST, FrameReason.UNKNOWN_KIND, FrameReason.UNAUTHENTICATED})


class FramePenalties:
    """Turns data-plane rejections into rate-limited `PeerPenalized` events.

    `publish(body)` writes and publishes one of this node's events (`Node.emit`); it is
    awaited in a task of the running loop. `peers()` returns the peer ids whose CurveZMQ
    keys identify a connection (the peers of the registry view).
    """

    def __init__(
        self,
        own_peer_id: str,
        publish: Callable[[Any], Awaitable[object]],
        peers: Callable[[], Iterable[str]],
        *,
        clock: Callable[[], float] = time.monotonic,
        per_peer_interval_s: float = PER_PEER_INTERVAL_S,
        interval_s: float = INTERVAL_S,
        max_per_interval: int = MAX_PER_INTERVAL,
    ) -> None:
        self.own_peer_id = own_peer_id
        self.counters: collections.Counter[str] = collections.Counter()
        self._publish = publish
        self._peers = peers
        self._clock = clock
        self._per_peer_interval_s = per_peer_interval_s
        self._interval_s = interval_s
        self._max_per_interval = max_per_interval
        self._last_by_offence: dict[tuple[str, str], float] = {}
        self._recent: collections.deque[float] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, rejection: Rejection) -> None:
        if rejection.reason in NOT_PUBLISHED:
            self.counters["not_published"] += 1
            return
        peer = rejection.peer_id or self._peer_of_key(rejection.curve_key)
        if peer is None or peer == self.own_peer_id:
            self.counters["unidentified"] += 1
            return
        now = self._clock()
        if not self._allowed(peer, rejection.reason.value, now):
            self.counters["suppressed"] += 1
            return
        from cortex.quorum.events import PeerPenalized

        detail = f"{rejection.reason.value}: {rejection.message}"[:MAX_DETAIL_CHARS]
        body = PeerPenalized(peer=peer, reason=BAD_FRAME, evidence=rejection.evidence, detail=detail)
        self.counters["published"] += 1
        task = asyncio.get_running_loop().create_task(self._send(body), name="comm-penalty")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_sent(self) -> None:
        """Wait until every penalty handed to `publish` so far was published (for shutdown and tests)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _allowed(self, peer: str, reason: str, now: float) -> bool:
        last = self._last_by_offence.get((peer, reason))
        if last is not None and now - last < self._per_peer_interval_s:
            return False
        while self._recent and now - self._recent[0] >= self._interval_s:
            self._recent.popleft()
        if len(self._recent) >= self._max_per_interval:
            return False
        self._recent.append(now)
        self._last_by_offence[(peer, reason)] = now
        if len(self._last_by_offence) > 4 * self._max_per_interval:
            self._forget_old(now)
        return True

    def _forget_old(self, now: float) -> None:
        for key, last in list(self._last_by_offence.items()):
            if now - last >= self._per_peer_interval_s:
                del self._last_by_offence[key]

    def _peer_of_key(self, curve_key: str | None) -> str | None:
        if curve_key is None:
            return None
        for peer in self._peers():
            try:
                if curve_key_text(peer) == curve_key:
                    return peer
            except InvalidPeerId:
                continue
        return None

    async def _send(self, body: Any) -> None:
        try:
            await self._publish(body)
        except Exception:
            self.counters["publish_failed"] += 1
            logger.exception("could not publish a penalty of %s", body.peer)
        else:
            logger.warning("penalized %s: %s", body.peer, body.detail)
