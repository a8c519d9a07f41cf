"""Comparison of replicated expert outputs: relative L2 distance, tolerance per dtype, grouping.

Shape legend: N = token rows of one expert call, D = hidden size.

Two replicas of one expert given the same rows return outputs [N, D] that are close but
rarely bitwise equal: GEMMs at different memory alignments, thread counts or hardware sum
in another order. So outputs are compared by relative L2 distance

    distance(a, ref) = ||a - ref||_2 / max(||ref||_2, MIN_NORM)

computed in float64 over the whole [N, D] tensor. An output with NaN or infinity is at
distance infinity from everything, including another non-finite output.

Grouping (`group_outputs`): outputs agree when their distance is at most the tolerance.
The reference of a group is its member with the smallest sum of distances to the others
(a medoid), so one outlier never drags the reference. The candidates are visited in a fixed
order (ascending medoid score, then producer id). Each output joins the first group whose
reference it agrees with, and the largest group wins. A tie between groups of equal size
is no quorum, because neither side has more support.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cortex.quorum.events import NANO, NOT_FINITE

# Tolerances on the relative L2 distance, by the least precise dtype among compared outputs.
# Each one passes honest drift with a wide margin and rejects a 1.10 scaling (distance 0.10):
# - float32: replicas agree to about 1e-6 (summation order); 1e-3 also passes a deliberate
#   1.0001 scaling (distance 1e-4), which models a tiny numeric difference, and rejects
#   anything of 1e-2 or more.
# - float16: 11-bit mantissa, rounding error about 5e-4 per element; 1e-2 leaves 20x margin.
# - bfloat16: 8-bit mantissa, rounding about 4e-3 per element and 1e-2 over a layer against
#   float32; 5e-2 leaves margin for that and is still half of a 1.10 scaling.
TOLERANCE_BY_DTYPE: dict[torch.dtype, float] = {
    torch.float32: 1e-3,
    torch.float64: 1e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}
MIN_NORM = 1e-12  # below this the reference counts as zero, and its norm is taken as this


def tolerance_for(dtypes: Sequence[torch.dtype]) -> float:
    """Return the tolerance for outputs of these dtypes: the loosest one among them."""
    try:
        return max(TOLERANCE_BY_DTYPE[dtype] for dtype in dtypes)
    except KeyError as error:
        raise ValueError(
            f"no quorum tolerance for dtype {error.args[0]}; expected one of {sorted(map(str, TOLERANCE_BY_DTYPE))}"
        ) from None


def least_precise(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """Return the dtype whose tolerance `tolerance_for` picks."""
    return max(dtypes, key=lambda dtype: TOLERANCE_BY_DTYPE.get(dtype, math.inf))


def relative_distance(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Return ||output - reference|| / max(||reference||, MIN_NORM), or infinity if either is not finite."""
    a = output.detach().to(torch.float64)
    b = reference.detach().to(torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"outputs of shapes {list(a.shape)} and {list(b.shape)} cannot be compared; replicas must return one shape")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), MIN_NORM))


def to_nano(distance: float) -> int:
    """Return a distance in billionths for events, `NOT_FINITE` for infinity or NaN."""
    if not math.isfinite(distance):
        return NOT_FINITE
    return min(round(distance * NANO), NOT_FINITE - 1)


def tensor_digest(tensor: torch.Tensor) -> str:
    """Return the BLAKE2b-256 hex digest of a tensor's bytes (contiguous, in its own dtype)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=32).hexdigest()


@dataclass(frozen=True)
class Grouping:
    """The outcome of comparing one expert's outputs.

    `groups` lists indexes into the outputs, largest group first; `reference[g]` is the
    index of group g's reference output; `distances[i]` is output i's distance to the
    reference of the largest group. `winner` is the largest group's index list when it has
    at least `quorum` members and no other group is as large, else None.
    """

    groups: list[list[int]]
    references: list[int]
    distances: list[float]
    winner: list[int] | None


def group_outputs(outputs: Sequence[torch.Tensor], keys: Sequence[str], tolerance: float, quorum: int) -> Grouping:
    """Group outputs [N, D] that agree within `tolerance`; `keys` (producer ids) break ties."""
    count = len(outputs)
    if count == 0 or len(keys) != count:
        raise ValueError(f"group_outputs needs one key per output and at least one output, got {count} outputs and {len(keys)} keys")
    pairwise = _pairwise_distances(outputs)
    scores = [sum(min(value, 1e9) for value in row) for row in pairwise]
    order = sorted(range(count), key=lambda index: (scores[index], keys[index]))
    groups: list[list[int]] = []
    references: list[int] = []
    for index in order:
        for group, reference in zip(groups, references, strict=True):
            if pairwise[index][reference] <= tolerance:
                group.append(index)
                break
        else:
            groups.append([index])
            references.append(index)
    ranked = sorted(range(len(groups)), key=lambda g: (-len(groups[g]), order.index(references[g])))
    groups = [sorted(groups[g]) for g in ranked]
    references = [references[g] for g in ranked]
    best = groups[0]
    tied = len(groups) > 1 and len(groups[1]) == len(best)
    winner = best if len(best) >= quorum and not tied else None
    distances = [pairwise[index][references[0]] for index in range(count)]
    return Grouping(groups, references, distances, winner)


def _pairwise_distances(outputs: Sequence[torch.Tensor]) -> list[list[float]]:
    """Return the symmetrized relative distance of every pair of outputs: the larger of
    `relative_distance(a, b)` and `relative_distance(b, a)`, so order never matters.

    Each output is converted to float64 and its norm taken once, and each pair's difference
    once, which gives the same values as calling `relative_distance` both ways.
    """
    count = len(outputs)
    converted = [output.detach().to(torch.float64) for output in outputs]
    finite = [bool(torch.isfinite(value).all()) for value in converted]
    norms = [max(float(torch.linalg.vector_norm(value)), MIN_NORM) for value in converted]
    pairwise = [[0.0] * count for _ in range(count)]
    for i in range(count):
        for j in range(i + 1, count):
            if converted[i].shape != converted[j].shape:
                raise ValueError(
                    f"outputs of shapes {list(converted[i].shape)} and {list(converted[j].shape)} cannot be compared; "
                    "replicas must return one shape"
                )
            if finite[i] and finite[j]:
                difference = float(torch.linalg.vector_norm(converted[i] - converted[j]))
                distance = max(difference / norms[j], difference / norms[i])
            else:
                distance = math.inf
            pairwise[i][j] = pairwise[j][i] = distance
    return pairwise


def majority(replicas: int) -> int:
    """Return the quorum for `replicas` outputs: a strict majority."""
    return replicas // 2 + 1
