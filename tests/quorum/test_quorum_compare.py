"""Comparison rules: relative L2 distance, tolerance per dtype, grouping, spot-check draws."""

from __future__ import annotations

import math

import pytest
import torch

from cortex.quorum.compare import group_outputs, majority, relative_distance, tolerance_for, to_nano
from cortex.quorum.events import NOT_FINITE
from cortex.quorum.policy import StragglerPolicy, spot_checked

ROWS, HIDDEN = 7, 192  # N token rows of one expert call, D hidden size


def _output(seed: int = 0) -> torch.Tensor:
    return torch.randn(ROWS, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 0.1  # [N, D]


def test_distance_of_scaling_is_its_factor() -> None:
    output = _output()

    assert relative_distance(output * 1.10, output) == pytest.approx(0.10, rel=1e-6)
    assert relative_distance(output * 1.0001, output) == pytest.approx(1e-4, rel=1e-3)  # float32 rounding of the scaled values
    assert relative_distance(output, output) == 0.0


def test_float32_tolerance_accepts_drift_rejects_scaling() -> None:
    output = _output()
    tolerance = tolerance_for([torch.float32])

    assert relative_distance(output * 1.0001, output) <= tolerance
    assert relative_distance(output * 1.10, output) > tolerance
    assert relative_distance(torch.zeros_like(output), output) > tolerance


def test_bfloat16_tolerance_accepts_rounding_rejects_scaling() -> None:
    output = _output()
    rounded = output.to(torch.bfloat16)
    tolerance = tolerance_for([torch.float32, torch.bfloat16])

    assert tolerance == tolerance_for([torch.bfloat16])
    assert relative_distance(rounded, output) <= tolerance
    assert relative_distance(rounded, output) > tolerance_for([torch.float32])
    assert relative_distance(output * 1.10, output) > tolerance


def test_non_finite_output_is_infinitely_far() -> None:
    output = _output()
    broken = torch.full_like(output, math.nan)

    assert relative_distance(broken, output) == math.inf
    assert relative_distance(broken, broken) == math.inf
    assert to_nano(math.inf) == NOT_FINITE


def test_unknown_dtype_has_no_tolerance() -> None:
    with pytest.raises(ValueError, match="no quorum tolerance"):
        tolerance_for([torch.int64])


def test_grouping_outvotes_one_faulty_output() -> None:
    output = _output()
    grouping = group_outputs([output, output * 1.10, output * 1.0000001], ["a", "b", "c"], 1e-3, majority(3))

    assert grouping.winner == [0, 2]
    assert grouping.groups == [[0, 2], [1]]
    assert grouping.distances[1] == pytest.approx(0.10, rel=1e-5)


def test_grouping_tie_is_no_quorum() -> None:
    output = _output()
    grouping = group_outputs([output, output * 1.10], ["a", "b"], 1e-3, majority(2))

    assert grouping.winner is None
    assert len(grouping.groups) == 2


def test_grouping_does_not_depend_on_order() -> None:
    outputs = [_output(), _output() * 1.10, _output() * 1.00001, torch.zeros(ROWS, HIDDEN)]
    keys = ["a", "b", "c", "d"]
    forward = group_outputs(outputs, keys, 1e-3, 3)
    backward = group_outputs(outputs[::-1], keys[::-1], 1e-3, 3)

    assert sorted(keys[i] for i in forward.groups[0]) == sorted(keys[::-1][i] for i in backward.groups[0])
    assert forward.winner is None  # 2 of 4 agree: not a strict majority


def test_spot_check_draw_is_seeded_and_near_probability() -> None:
    request = "ab" * 32
    draws = [spot_checked(7, request, step, layer, 100_000) for step in range(2_000) for layer in (1, 2)]

    assert draws == [spot_checked(7, request, step, layer, 100_000) for step in range(2_000) for layer in (1, 2)]
    assert 0.08 < sum(draws) / len(draws) < 0.12
    assert not any(spot_checked(7, request, step, 1, 0) for step in range(100))
    assert all(spot_checked(7, request, step, 1, 1_000_000) for step in range(100))


def test_straggler_policy_bounds() -> None:
    policy = StragglerPolicy()

    assert policy.hedge_delay_s(0.0) == policy.hedge_min_s
    assert policy.hedge_delay_s(10_000.0) == policy.hedge_max_s
    assert policy.hedge_delay_s(100.0) == pytest.approx(0.4)
    assert policy.hedge_delay_s(100.0, rows=32) == pytest.approx(0.8)
    assert policy.deadline_s(10.0, 10.0) == policy.deadline_min_s
    assert policy.deadline_s(10_000.0, 10.0) == 10.0
    assert policy.deadline_s(200.0, 10.0, rows=32) == pytest.approx(8.0)
