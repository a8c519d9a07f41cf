"""Data plane: tensors with their signed record events over CurveZMQ-encrypted ZeroMQ.

See docs/dataplane.md for the API, the frame format and the checks on receipt.
"""

from cortex.comm.dataplane import DataPlane, Handler, Signer
from cortex.comm.errors import CallFailed, CommError, DataPlaneClosed, FrameReason, FrameRejected, PeerTimeout
from cortex.comm.frames import CHUNK_BYTES, DTYPES, MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, MAX_TENSOR_BYTES, MAX_TENSORS
from cortex.comm.messages import IncomingCall, ReceivedTensor, Rejection, Reply, Response
from cortex.comm.records import (
    RECORD_TYPES,
    RECORDS,
    ExpertBatchProduced,
    ExpertBatchSent,
    ExpertInputSent,
    ExpertOutputProduced,
    StageInputSent,
    StageOutputProduced,
)
from cortex.comm.roundtrip import (
    RoundTripStats,
    measure_call_round_trip,
    measure_local_call_round_trip,
    measure_raw_round_trip,
    measure_signed_round_trip,
)
from cortex.comm.validation import FrameLimits

__all__ = [
    "CHUNK_BYTES",
    "DTYPES",
    "MAX_CHUNK_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_TENSORS",
    "MAX_TENSOR_BYTES",
    "RECORDS",
    "RECORD_TYPES",
    "CallFailed",
    "CommError",
    "DataPlane",
    "DataPlaneClosed",
    "ExpertBatchProduced",
    "ExpertBatchSent",
    "ExpertInputSent",
    "ExpertOutputProduced",
    "FrameLimits",
    "FrameReason",
    "FrameRejected",
    "Handler",
    "IncomingCall",
    "PeerTimeout",
    "ReceivedTensor",
    "Rejection",
    "Reply",
    "Response",
    "RoundTripStats",
    "Signer",
    "StageInputSent",
    "StageOutputProduced",
    "measure_call_round_trip",
    "measure_local_call_round_trip",
    "measure_raw_round_trip",
    "measure_signed_round_trip",
]
