"""The cost model of a cell of the grid: what a strategy's ``cost`` prices (:class:`CellCost`),
and its pricing per training image for the workflow's runtime resource (:class:`PerImageCost`);
benchmarks/fit_cost.py prices it with measured fits and FLOP counts instead."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from sroc import refinement
from sroc.detectors import detector_class

if TYPE_CHECKING:
    from sroc.config import DetectorSpec


class CellCost(Protocol):
    """Seconds (or any additive unit) of the work in one cell, for resource estimates and
    benchmarks/fit_cost.py. ``n`` training images at the refined pollution ratio, of which
    ``n_polluted`` polluted; ``n_test`` test images."""

    n: int
    n_polluted: int
    n_test: int
    settings: Mapping
    refiner: DetectorSpec
    consensus: Sequence[DetectorSpec]

    def fit(self, n_fit: float) -> float: ...

    def score(self, n_fit: float, n_score: float) -> float:
        """Scoring ``n_score`` images without maps against a model fitted on ``n_fit``."""

    def self_score(self) -> float:
        """Scoring the ``n`` training images against themselves (leave-one-out or not)."""

    def test_run(self, n_fit: float) -> float:
        """A fit on ``n_fit`` images and the test set's scoring, as the grid's runs do."""

    def ranking_by(self, spec: DetectorSpec) -> float:
        """Another detector's fit and self-scoring of the training set (refiner, members)."""

    def for_detector(self, spec: DetectorSpec) -> CellCost:
        """The same cell priced for another detector (a consensus member), so that a member's
        ranking is priced by that ranking's own ``cost``."""


@dataclass
class PerImageCost:
    """A :class:`CellCost` in seconds from each detector class's ``runtime_seconds_per_image``
    (one fit plus one test scoring, per training image; half each), for the workflow's runtime
    resource. The test set is taken as large as the training set, an upper bound for a split."""

    detector_type: str
    n: int
    settings: Mapping
    refiner: DetectorSpec
    consensus: Sequence[DetectorSpec]

    @property
    def n_polluted(self) -> int:
        return refinement.n_removed(self.n, float(self.settings["pollution_ratio"]))

    @property
    def n_test(self) -> int:
        return self.n

    def _half(self, detector_type: str | None = None) -> float:
        return detector_class(detector_type or self.detector_type).runtime_seconds_per_image / 2

    def fit(self, n_fit: float) -> float:
        return self._half() * n_fit

    def score(self, n_fit: float, n_score: float) -> float:
        return self._half() * n_score

    def self_score(self) -> float:
        return self.score(self.n, self.n)

    def test_run(self, n_fit: float) -> float:
        return self.fit(n_fit) + self.score(n_fit, self.n_test)

    def ranking_by(self, spec: DetectorSpec) -> float:
        return 2 * self._half(spec.type) * self.n

    def for_detector(self, spec: DetectorSpec) -> PerImageCost:
        return replace(self, detector_type=spec.type)
