"""The experiment grid of one (category, seed, detector) cell: sections 4.3-4.5 and Appendix B.

Two kinds of job share the cell's work:

- :func:`unrefined_runs_and_rankings` fits the detector on the training set of every pollution
  ratio (the robustness curve) and scores the test set. The model fitted at the refined
  pollution ratio is also SROC's scorer. The job then ranks that polluted training set with every
  configured strategy (SROC, random, cross-validation, STOC, SROC by the refiner detector, and
  those beyond the paper), fits the oracle on its healthy images, and, for ``sroc_auto``, refits
  on what remains after removing as many suspects as the self-scores' tail suggests.
- :func:`refined_runs` removes, for one refinement ratio r, the round(r N) first images of each
  ranking (for ``patch_sroc``, the round(r P) highest of the P training patches from PatchCore's
  memory bank), refits the detector on the rest and scores the test set.

A ranking is computed once and serves every refinement ratio; adding a ratio adds jobs of the
second kind only.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sroc import refinement, splits
from sroc.contamination import estimate_contamination
from sroc.detectors import BaseDetector, make_detector
from sroc.evaluation import TestEvaluation
from sroc.feature_cache import input_boxes, load_features
from sroc.io import atomic_path
from sroc.runs import Run, StoredRanking

log = logging.getLogger(__name__)

# Strategies that rank the polluted training set; the oracle needs no ranking. The last three go
# beyond the paper (docs/refinement.md): leave-one-out self-scores, SROC in several steps, and
# the consensus of several detectors' leave-one-out rankings.
RANKED_STRATEGIES = (
    "sroc", "random", "cross_validation", "stoc", "by_refiner",
    "sroc_loo", "iterative_sroc", "consensus", "patch_sroc",
)  # fmt: skip
# Strategies that refine a detector's patch memory bank rather than its training images, with
# the detector types that have one: the workflow runs them for those detectors only
# (:func:`strategies_for`).
PATCH_STRATEGIES = {"patch_sroc": ("patchcore",)}
# Strategies that make one run per cell, at a refinement ratio of their own: the oracle removes
# the polluted images; sroc_auto removes as many leave-one-out SROC suspects as
# sroc.contamination estimates from the self-scores (the ratio chosen from the data).
SINGLE_RUN_STRATEGIES = ("oracle", "sroc_auto")
STRATEGIES = (*RANKED_STRATEGIES, *SINGLE_RUN_STRATEGIES)
# The config's ``refinement:`` section without the keys that it leaves out: the workflow
# (common.smk) and benchmarks/fit_cost.py read the section through :func:`refinement_settings`.
REFINEMENT_DEFAULTS = {
    "pollution_ratio": 0.2,
    "ratios": [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8],
    "strategies": ["sroc", "random", "cross_validation", "stoc", "oracle", "by_refiner"],
    "n_folds": 5,
    "refiner": "mahalanobis",
    "refiner_params": {},
    "iterative_steps": 3,
    "consensus": ["knn", "mahalanobis", "padim"],
    "consensus_params": {},
}


def strategies_for(detector_type: str, strategies: Sequence[str]) -> list[str]:
    """The configured ``strategies`` that apply to ``detector_type``: all but the patch-level
    ones (:data:`PATCH_STRATEGIES`) of detectors without a patch memory bank."""
    return [s for s in strategies if detector_type in PATCH_STRATEGIES.get(s, (detector_type,))]


def refinement_settings(config: Mapping) -> dict:
    """The ``refinement:`` section of ``config`` over :data:`REFINEMENT_DEFAULTS`."""
    return {**REFINEMENT_DEFAULTS, **(config.get("refinement") or {})}


@dataclass(frozen=True)
class DetectorSpec:
    """A detector type with its hyper-parameters, and how it runs."""

    type: str
    params: Mapping = field(default_factory=dict)
    random_state: int = 0
    n_jobs: int = 1

    def factory(self, **overrides) -> Callable[[], BaseDetector]:
        """A zero-argument callable returning a fresh, unfitted detector (``overrides`` replace
        hyper-parameters, e.g. ``exclude_self=True`` for leave-one-out self-scoring)."""
        params = {**dict(self.params), **overrides}
        return lambda: make_detector(
            self.type, random_state=self.random_state, n_jobs=self.n_jobs, **params
        )


def strategy_seed(category: str, seed: int) -> int:
    """The seed of random removal and of the folds, from the split seed and the category, so
    that every detector of a (category, seed) sees the same random removal and folds."""
    entropy = [int(seed), zlib.crc32(category.encode("utf-8"))]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class Cell:
    """The features of one (category, seed) split, read from the cache once.

    Holds the training candidates (training goods and pollution set) and the test set.
    """

    def __init__(self, manifest: pd.DataFrame, cache_path: str):
        self.manifest = manifest
        self.test = splits.test_set(manifest)
        candidates = manifest[manifest["role"].isin(["train", "pollution"])]
        ids = pd.concat([candidates["image_id"], self.test["image_id"]]).tolist()
        self._features, _ = load_features(cache_path, ids)
        self._row_of = {image_id: row for row, image_id in enumerate(ids)}
        self.test_ids = self.test["image_id"].to_numpy(dtype=str)
        self.test_features = self.features_of(self.test_ids)

    def features_of(self, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
        rows = np.array([self._row_of[i] for i in image_ids], dtype=np.int64)
        return {stage: array[rows] for stage, array in self._features.items()}

    def training_set(self, ratio: float) -> pd.DataFrame:
        return splits.training_set(self.manifest, ratio)


def _fit_and_score(
    factory: Callable[[], BaseDetector],
    train_features: dict[str, np.ndarray],
    cell: Cell,
    evaluation: TestEvaluation,
) -> tuple[BaseDetector, np.ndarray, np.ndarray | None, float, float]:
    start = time.perf_counter()
    detector = factory().fit(train_features)
    fitted = time.perf_counter()
    scores, maps = detector.score(cell.test_features, maps=evaluation.needs_maps)
    return detector, scores, maps, fitted - start, time.perf_counter() - fitted


def _run(strategy, refiner, pollution_ratio, refinement_ratio, train, removed, cell, fit) -> Run:
    _, scores, maps, fit_seconds, score_seconds = fit
    return Run(
        strategy=strategy,
        refiner=refiner,
        pollution_ratio=float(pollution_ratio),
        refinement_ratio=float(refinement_ratio),
        training_ids=train["image_id"].to_numpy(dtype=str),
        polluted_ids=train.loc[train["polluted"], "image_id"].to_numpy(dtype=str),
        removed_ids=np.asarray(removed, dtype=str),
        test_ids=cell.test_ids,
        scores=scores,
        maps=maps,
        fit_seconds=fit_seconds,
        score_seconds=score_seconds,
    )


def unrefined_runs_and_rankings(
    cell: Cell,
    detector: DetectorSpec,
    refiner: DetectorSpec,
    evaluation: TestEvaluation,
    pollution_ratios: Sequence[float],
    refined_ratio: float,
    strategies: Sequence[str],
    n_folds: int,
    rng_seed: int,
    iterative_steps: int = 3,
    consensus: Sequence[DetectorSpec] = (),
) -> tuple[list[Run], list[StoredRanking]]:
    """The robustness curve, the rankings of the polluted training set at ``refined_ratio``,
    and the oracle (see the module docstring). ``iterative_steps`` and ``consensus`` (the
    detectors whose leave-one-out rankings are averaged) serve the strategies of those names."""
    factory = detector.factory()
    unfit = sorted(set(strategies) - set(strategies_for(detector.type, strategies)))
    if unfit:
        raise ValueError(
            f"strategy {unfit[0]!r} refines a patch memory bank, which detector type "
            f"{detector.type!r} has not: it runs for {PATCH_STRATEGIES[unfit[0]]} only. Leave it "
            "out for this detector (the workflow does so with sroc.grid.strategies_for)"
        )
    runs, scorer = [], None
    ratios = set(map(float, pollution_ratios))
    if strategies:
        ratios.add(float(refined_ratio))
    for ratio in sorted(ratios):
        train = cell.training_set(ratio)
        fit = _fit_and_score(factory, cell.features_of(train["image_id"]), cell, evaluation)
        runs.append(_run("none", "none", ratio, 0.0, train, [], cell, fit))
        log.info(
            "pollution %g: fit on %d images (%d polluted) in %.2f s, scored %d test images in "
            "%.2f s",
            ratio, len(train), int(train["polluted"].sum()), fit[3], len(cell.test), fit[4],
        )  # fmt: skip
        if ratio == float(refined_ratio):
            scorer = fit[0]

    train = cell.training_set(refined_ratio)
    ids = train["image_id"].to_numpy(dtype=str)
    features = cell.features_of(ids)
    rankings = []
    for strategy in strategies:
        if strategy == "oracle":
            healthy = train[~train["polluted"]]
            fit = _fit_and_score(factory, cell.features_of(healthy["image_id"]), cell, evaluation)
            removed = train.loc[train["polluted"], "image_id"]
            runs.append(
                _run("oracle", "none", refined_ratio, len(removed) / len(train), train, removed,
                     cell, fit)
            )  # fmt: skip
            continue
        if strategy == "sroc_auto":
            runs.append(_auto_ratio_run(cell, detector, evaluation, train, refined_ratio))
            continue
        start = time.perf_counter()
        if strategy == "sroc":
            ranking = refinement.sroc_ranking(features, ids, factory, fitted=scorer)
            ranked_by = detector.type
        elif strategy == "random":
            ranking = refinement.random_ranking(ids, rng_seed)
            ranked_by = "none"
        elif strategy == "cross_validation":
            ranking = refinement.cross_validation_ranking(features, ids, factory, n_folds, rng_seed)
            ranked_by = detector.type
        elif strategy == "stoc":
            ranking = refinement.stoc_ranking(features, ids, factory, n_folds, rng_seed)
            ranked_by = detector.type
        elif strategy == "by_refiner":
            ranking = refinement.sroc_ranking(features, ids, refiner.factory())
            ranked_by = refiner.type
        elif strategy == "sroc_loo":
            ranking = refinement.sroc_ranking(features, ids, detector.factory(exclude_self=True))
            ranked_by = detector.type
        elif strategy == "patch_sroc":
            ranking = refinement.patch_sroc_ranking(
                features, ids, detector.factory(exclude_self=True)
            )
            ranked_by = detector.type
        elif strategy == "iterative_sroc":
            ranking = refinement.iterative_sroc_ranking(
                features, ids, factory, refined_ratio, iterative_steps
            )
            ranked_by = detector.type
        elif strategy == "consensus":
            members = consensus or (detector,)
            ranking = refinement.consensus_ranking(
                [
                    refinement.sroc_ranking(features, ids, member.factory(exclude_self=True))
                    for member in members
                ],
                ids,
            )
            ranked_by = "+".join(member.type for member in members)
        else:
            raise ValueError(f"unknown refinement strategy {strategy!r}; choose from {STRATEGIES}")
        log.info(
            "ranking %s: %d fits in %.2f s", strategy, ranking.n_fits, time.perf_counter() - start
        )
        rankings.append(
            StoredRanking(
                strategy=strategy,
                refiner=ranked_by,
                image_ids=ids,
                scores=ranking.scores,
                order=ranking.order,
                polluted=train["polluted"].to_numpy(dtype=bool),
                attrs={
                    "pollution_ratio": float(refined_ratio),
                    "n_fits": ranking.n_fits,
                    "fit_seconds": ranking.fit_seconds,
                    "score_seconds": ranking.score_seconds,
                },
                patch_scores=ranking.patch_scores,
            )
        )
    return runs, rankings


def _auto_ratio_run(
    cell: Cell,
    detector: DetectorSpec,
    evaluation: TestEvaluation,
    train: pd.DataFrame,
    pollution_ratio: float,
) -> Run:
    """sroc_auto: rank by leave-one-out self-scores, remove the share that
    :func:`sroc.contamination.estimate_contamination` finds in their tail, refit and score."""
    ids = train["image_id"].to_numpy(dtype=str)
    ranking = refinement.sroc_ranking(
        cell.features_of(ids), ids, detector.factory(exclude_self=True)
    )
    ratio = estimate_contamination(ranking.scores)
    removed = ids[ranking.order[: refinement.n_removed(len(ids), ratio)]]
    kept = train.loc[~train["image_id"].isin(removed), "image_id"]
    fit = _fit_and_score(detector.factory(), cell.features_of(kept), cell, evaluation)
    log.info("sroc_auto: estimated contamination %.3f, removed %d images", ratio, len(removed))
    return _run("sroc_auto", detector.type, pollution_ratio, ratio, train, removed, cell, fit)


def refined_runs(
    cell: Cell,
    detector: DetectorSpec,
    evaluation: TestEvaluation,
    rankings: Mapping[str, StoredRanking],
    ratio: float,
) -> list[Run]:
    """For every ranking, refit on the polluted training set less its round(ratio N) first
    images and score the test set; for a patch-level ranking (``patch_sroc``), refit on every
    training patch but the round(ratio P) highest of its P patch scores. Such a run's removed
    images are those that lost at least one patch."""
    factory = detector.factory()
    runs = []
    for strategy, ranking in rankings.items():
        pollution_ratio = float(ranking.attrs["pollution_ratio"])
        train = cell.training_set(pollution_ratio)
        if not np.array_equal(train["image_id"].to_numpy(dtype=str), ranking.image_ids):
            raise ValueError(
                f"the {strategy} ranking was computed on another training set than this split's "
                f"at pollution {pollution_ratio:g}: rerun the ranking job"
            )
        if ranking.patch_scores is not None:
            rows = refinement.removed_patches(ranking.patch_scores, ranking.image_ids, ratio)
            touched = refinement.images_of_patches(rows, ranking.patch_scores.shape)
            removed = ranking.image_ids[touched]
            patch_factory = detector.factory(excluded_patches=rows)
            fit = _fit_and_score(patch_factory, cell.features_of(ranking.image_ids), cell,
                                 evaluation)  # fmt: skip
            log.info(
                "%s at r=%g: removed %d of %d patches, from %d images",
                strategy, ratio, len(rows), ranking.patch_scores.size, len(removed),
            )  # fmt: skip
        else:
            removed = ranking.removed_ids(refinement.n_removed(len(train), ratio))
            kept = np.setdiff1d(ranking.image_ids, removed)
            fit = _fit_and_score(factory, cell.features_of(kept), cell, evaluation)
        run = _run(strategy, ranking.refiner, pollution_ratio, ratio, train, removed, cell, fit)
        log.info(
            "%s at r=%g: removed %d (%d polluted), fit in %.2f s, scored in %.2f s",
            strategy, ratio, len(removed), run.record()["n_removed_polluted"], fit[3], fit[4],
        )  # fmt: skip
        runs.append(run)
    return runs


def result_rows(
    runs: Sequence[Run],
    evaluation: TestEvaluation,
    rankings: Sequence[StoredRanking] = (),
) -> list[dict]:
    """The rows of the results table for ``runs``, with their test metrics.

    With ``rankings``, each ranked strategy also gets its r = 0 row: nothing is removed, so it is
    the unrefined model at the refined pollution ratio, stored once as that ratio's ``none`` run.
    """
    rows = []
    for run in runs:
        rows.append({**run.record(), **evaluation.metrics(run.scores, run.maps)})
    for ranking in rankings:
        pollution_ratio = float(ranking.attrs["pollution_ratio"])
        (base,) = [
            row for row in rows
            if row["strategy"] == "none" and row["pollution_ratio"] == pollution_ratio
        ]  # fmt: skip
        rows.append(
            {**base, "strategy": ranking.strategy, "refiner": ranking.refiner,
             "run": f"{ranking.strategy}/r=0"}
        )  # fmt: skip
    return rows


@dataclass
class CellJob:
    """What a grid job reads for its (category, seed): the split's sidecar, and, unless the
    category is excluded, its features and test-set evaluation."""

    info: dict
    cell: Cell | None
    evaluation: TestEvaluation | None

    @classmethod
    def load(cls, manifest_path, info_path, cache_path, evaluation: Mapping, input_size: int):
        info = json.loads(Path(info_path).read_text())
        if info["excluded"]:
            log.warning("nothing to fit: %s", info["excluded"])
            return cls(info, None, None)
        cell = Cell(splits.read_manifest(manifest_path), cache_path)
        boxes, canvas = input_boxes(cache_path, cell.test["image_id"].tolist())
        test_evaluation = TestEvaluation(
            cell.test,
            fpr_limit=evaluation["fpr_limit"],
            input_size=input_size,
            resolution=evaluation["resolution"],
            input_boxes=boxes,
            canvas_hw=canvas,
        )
        return cls(info, cell, test_evaluation)

    def attrs(self, detector_name: str, detector: DetectorSpec) -> dict:
        """The attributes of the job's score file."""
        return {
            "detector": detector_name,
            "detector_type": detector.type,
            "detector_params": json.dumps(dict(detector.params), sort_keys=True),
            "random_state": detector.random_state,
            "protocol": self.info["protocol"],
            "seed": self.info["seed"],
            "excluded": self.info["excluded"],
        }

    def write_rows(self, path, rows: Sequence[dict], detector_name: str, detector: DetectorSpec):
        """The job's rows of the results table, as CSV (an excluded category writes none)."""
        category = str(self.cell.manifest["category"].iloc[0]) if self.cell else None
        table = pd.DataFrame(
            [
                {
                    "category": category,
                    "seed": self.info["seed"],
                    "detector": detector_name,
                    "detector_type": detector.type,
                    "protocol": self.info["protocol"],
                    **row,
                }
                for row in rows
            ]
        )
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
