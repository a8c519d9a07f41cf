"""Votes and decisions for one MoE layer at one step: from compared outputs to quorum events.

Shape legend: N = token rows of one expert call, D = hidden size.

`decide_expert` groups one expert's outputs (see `cortex.quorum.compare`) with a strict
majority of the outputs as the quorum, and picks the output to use from the winning group:
the one computed in the most precise dtype, then the one closest to the group's reference.
`layer_events` turns the outcomes of every expert of the layer into one `QuorumVoted` and
the body of one `QuorumDecided`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cortex.quorum.compare import (
    TOLERANCE_BY_DTYPE,
    Grouping,
    group_outputs,
    majority,
    tensor_digest,
    to_nano,
)
from cortex.quorum.events import AGREED, NANO, NO_QUORUM, QuorumDecided, QuorumVoted


@dataclass(frozen=True)
class Probe:
    """An excluded holder's output for one expert, compared with the winning group but never used."""

    producer: str
    digest: str
    distance: float
    agrees: bool


@dataclass(frozen=True)
class ExpertOutcome:
    """One expert's outputs [N, D] by producer, how they grouped, and the output chosen (None: no quorum)."""

    expert: int
    producers: list[str]
    outputs: list[torch.Tensor]
    digests: list[str]
    grouping: Grouping
    chosen: int | None
    probes: tuple[Probe, ...] = ()

    @property
    def winners(self) -> list[str]:
        winner = self.grouping.winner or []
        return [self.producers[index] for index in winner]

    @property
    def losers(self) -> list[str]:
        winner = set(self.grouping.winner or [])
        return [producer for index, producer in enumerate(self.producers) if index not in winner]


def decide_expert(expert: int, producers: Sequence[str], outputs: Sequence[torch.Tensor], tolerance: float) -> ExpertOutcome:
    """Group one expert's outputs and choose the one to use, if a strict majority agrees."""
    grouping = group_outputs(outputs, producers, tolerance, majority(len(outputs)))
    chosen = None
    if grouping.winner is not None:
        reference = grouping.references[0]
        chosen = min(
            grouping.winner,
            key=lambda index: (
                TOLERANCE_BY_DTYPE.get(outputs[index].dtype, 1.0),
                grouping.distances[index] if index != reference else -1.0,
                producers[index],
            ),
        )
    digests = [tensor_digest(output) for output in outputs]
    return ExpertOutcome(expert, list(producers), list(outputs), digests, grouping, chosen)


@dataclass(frozen=True)
class LayerCall:
    """The identity of a layer's comparison: request, model, step, layer, and its spot-check sampling."""

    request_id: str
    model_id: str
    step: int
    layer: int
    spot_check_ppm: int = 0
    spot_check_seed: int = 0


def layer_events(
    call: LayerCall, outcomes: Sequence[ExpertOutcome], dtype: str, tolerance: float, rounds: int, voter: str, lying: bool = False
) -> tuple[QuorumVoted, QuorumDecided]:
    """Return the vote (every output's distance to its expert's reference) and the decision for a layer.

    `lying` makes this voter report the opposite of what it measured: its own outputs
    agree, every other producer dissents. It exists only for the `wrong_voter` fault mode,
    which tests that honest nodes see through such votes.
    """
    experts: list[int] = []
    producers: list[str] = []
    digests: list[str] = []
    distances: list[int] = []
    for outcome in outcomes:
        for index, producer in enumerate(outcome.producers):
            experts.append(outcome.expert)
            producers.append(producer)
            digests.append(outcome.digests[index])
            distances.append(to_nano(outcome.grouping.distances[index]))
        for probe in outcome.probes:
            experts.append(outcome.expert)
            producers.append(probe.producer)
            digests.append(probe.digest)
            distances.append(to_nano(probe.distance))
    agreeing, dissenting = _split_producers(outcomes)
    if lying:
        dissenting = sorted(set(agreeing + dissenting) - {voter})
        agreeing = [voter] if voter in producers else []
        distances = [0 if producer == voter else 10 * round(tolerance * NANO) + 1 for producer in producers]
    agreed = all(outcome.chosen is not None for outcome in outcomes)
    vote = QuorumVoted(
        request_id=call.request_id, model_id=call.model_id, step=call.step, layer=call.layer, dtype=dtype,
        tolerance_nano=round(tolerance * NANO), experts=tuple(experts), producers=tuple(producers),
        digests=tuple(digests), distances_nano=tuple(distances),
        spot_check_ppm=call.spot_check_ppm, spot_check_seed=call.spot_check_seed,
    )
    decision = QuorumDecided(
        request_id=call.request_id, model_id=call.model_id, step=call.step, layer=call.layer,
        outcome=AGREED if agreed else NO_QUORUM,
        quorum=max(majority(len(outcome.producers)) for outcome in outcomes),
        rounds=rounds,
        experts=tuple(outcome.expert for outcome in outcomes),
        winner_digests=tuple("" if o.chosen is None else o.digests[o.chosen] for o in outcomes),
        agreeing=tuple(agreeing), dissenting=tuple(dissenting), spot_check=call.spot_check_ppm > 0,
    )
    return vote, decision


def _split_producers(outcomes: Sequence[ExpertOutcome]) -> tuple[list[str], list[str]]:
    """Return (agreeing, dissenting) producers; no-quorum experts count for neither side."""
    agreeing: set[str] = set()
    dissenting: set[str] = set()
    for outcome in outcomes:
        if outcome.chosen is None:
            continue
        agreeing.update(outcome.winners)
        dissenting.update(outcome.losers)
        agreeing.update(probe.producer for probe in outcome.probes if probe.agrees)
        dissenting.update(probe.producer for probe in outcome.probes if not probe.agrees)
    return sorted(agreeing - dissenting), sorted(dissenting)
