"""Admission before the acceptance path: an allowlist and a per-author rate limit.

The rate limit is a token bucket per author: `rate_per_s` tokens a second up to
`burst`. `admit` takes a token before verification, and the bus refunds the
tokens of events the acceptance path did not accept (rejected or duplicate)
as soon as the frame is processed, so events forged in a victim's name (which
fail the signature check) cannot drain the victim's bucket. While an author's bucket is empty, its further events are
dropped before they are verified, counted in `throttled` and logged once per
episode. Dropped events are not lost: they show up as gaps in the author's
sequence and are fetched again by anti-entropy, so a flooder's events trickle
in at the rate limit while other authors are unaffected.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class _Bucket:
    tokens: float
    updated: float
    throttling: bool = False


class Admission:
    """Decides, before verification, whether an author's events are let in."""

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        allowlist: frozenset[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(f"rate_per_s={rate_per_s} and burst={burst} must be positive (burst at least 1)")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.allowlist = allowlist
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self.throttled: collections.Counter[str] = collections.Counter()
        self.not_allowed: collections.Counter[str] = collections.Counter()

    def is_allowed_peer(self, peer: str) -> bool:
        """Whether `peer` may author events and send sync requests (always, without an allowlist)."""
        return self.allowlist is None or peer in self.allowlist

    def admit(self, author: str) -> bool:
        """Whether an event by `author` may go to the acceptance path now."""
        if not self.is_allowed_peer(author):
            self.not_allowed[author] += 1
            return False
        bucket = self._refill(author)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            if bucket.throttling:
                bucket.throttling = False
                logger.info("author %s is below its rate limit again", author)
            return True
        self.throttled[author] += 1
        if not bucket.throttling:
            bucket.throttling = True
            logger.warning(
                "author %s exceeds the rate limit of %s events/s (burst %s); throttling its events",
                author, self.rate_per_s, self.burst,
            )
        return False

    def refund(self, author: str, count: int = 1) -> None:
        """Return the tokens of `count` admitted events that were not accepted."""
        bucket = self._refill(author)
        bucket.tokens = min(self.burst, bucket.tokens + count)

    def _refill(self, author: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(author)
        if bucket is None:
            bucket = _Bucket(tokens=self.burst, updated=now)
            self._buckets[author] = bucket
            return bucket
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate_per_s)
        bucket.updated = now
        return bucket
