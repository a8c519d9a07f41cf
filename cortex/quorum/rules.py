"""The trust rule and its constants, in one place.

Trust is an integer from 0 to `TRUST_MAX` per peer, folded from the quorum events in the
log's canonical order (lamport, author, seq). Every peer starts at `TRUST_START`.

- A decision that lists the peer as dissenting lowers its trust by `DISSENT_PENALTY`, and
  starts (or restarts) its probation.
- A decision that lists the peer as agreeing counts toward its probation. Once the peer has
  `PROBATION_DECISIONS` agreeing decisions in a row since its last dissent, each further
  agreeing decision raises its trust by `RECOVERY_STEP`, up to `TRUST_MAX`. So a peer that is
  wrong at least once in every `PROBATION_DECISIONS` decisions never gains trust, and one
  dissent costs `PROBATION_DECISIONS + DISSENT_PENALTY / RECOVERY_STEP` agreeing decisions.
- A vote or decision that is provably false (see `cortex.quorum.trust`) lowers its voter's
  trust by `FALSE_VOTE_PENALTY` and has no other effect.
- An equivocation (two events with one author and seq) sets the author's trust to 0 for
  good; nothing raises it again.
- A `PeerPenalized` with a reason the quorum does not derive itself (such as `bad_frame`
  from the data plane) lowers trust by `REPORT_PENALTY`, once per (reporter, peer, reason),
  so one reporter alone cannot push a peer below `TRUST_THRESHOLD`.
- A peer whose trust is below `TRUST_THRESHOLD` is excluded: routers send it no calls, and
  its own votes and decisions are passed over while it is excluded.

A voter's own output never earns it trust: a decision changes the trust of the producers it
names other than its author.
"""

from __future__ import annotations

TRUST_MAX = 1_000
TRUST_START = 1_000
TRUST_THRESHOLD = 500
DISSENT_PENALTY = 200  # three dissents from full trust exclude a peer (1000 -> 400)
FALSE_VOTE_PENALTY = 300  # two provably false votes exclude a voter (1000 -> 400)
REPORT_PENALTY = 100
RECOVERY_STEP = 5
PROBATION_DECISIONS = 20


def is_excluded(trust: int) -> bool:
    """Return whether a peer with this trust is excluded from routing and voting."""
    return trust < TRUST_THRESHOLD
