"""Errors raised by the data plane, and the reasons a received tensor frame is rejected."""

from __future__ import annotations

import enum


class CommError(Exception):
    """Base class of every error the `cortex.comm` package raises."""


class DataPlaneClosed(CommError):
    """The data plane was closed (or not started) while a call needed it."""


class PeerTimeout(CommError):
    """A peer did not reply to a call within its timeout."""


class CallFailed(CommError):
    """A call reached the peer, but the peer replied with an error frame."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class FrameReason(enum.Enum):
    """Reason a received frame was rejected. The value is the counter name and the wire reason."""

    TRUNCATED = "truncated"
    MALFORMED = "malformed"
    MALFORMED_EVENT = "malformed_event"
    BAD_SIGNATURE = "bad_signature"
    UNEXPECTED_TYPE = "unexpected_type"
    UNKNOWN_RECORD_TYPE = "unknown_record_type"
    UNAUTHENTICATED = "unauthenticated"
    AUTHOR_MISMATCH = "author_mismatch"
    UNLINKED_REPLY = "unlinked_reply"
    UNKNOWN_REQUEST = "unknown_request"
    BAD_DTYPE = "bad_dtype"
    SHAPE_MISMATCH = "shape_mismatch"
    OVERSIZED = "oversized"
    LENGTH_MISMATCH = "length_mismatch"
    BAD_DIGEST = "bad_digest"
    UNKNOWN_KIND = "unknown_kind"

    @property
    def penalized(self) -> bool:
        """Whether the sender is at fault (and reported to the penalty hook).

        An unknown kind or record type can come from an honest peer running another software
        version, so it is rejected and counted but not penalized.
        """
        return self not in (FrameReason.UNKNOWN_KIND, FrameReason.UNKNOWN_RECORD_TYPE)


class FrameRejected(CommError):
    """A received frame failed a check; `reason` names the check.

    `peer_id` is the sender's peer id once its records' author has been matched to the
    authenticated connection, and None before that. `evidence` lists the ids of the
    sender's signed records that the receiver stored and that show the fault (a record
    whose digest does not match the bytes that came with it).
    """

    def __init__(
        self, reason: FrameReason, message: str, peer_id: str | None = None, evidence: tuple[str, ...] = ()
    ) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message
        self.peer_id = peer_id
        self.evidence = evidence
