"""The experiment grid of one (category, seed, detector) cell: sections 4.3-4.5 and Appendix B.

Two kinds of job share the cell's work:

- :func:`unrefined_runs_and_rankings` (the ``rank`` job) fits the detector on the training set of
  every pollution ratio (the robustness curve) and scores the test set. The model fitted at the
  refined pollution ratio is also SROC's scorer. The job then runs every configured strategy of
  :mod:`sroc.strategies` on that polluted training set: a ranked strategy stores its ranking, a
  single-run strategy (the oracle, ``sroc_auto``) removes its own selection, refits and scores.
- :func:`refined_runs` (one ``refine`` job per refinement ratio r) removes the round(r N) first
  images of each ranking (for a patch-level ranking, the round(r P) highest of the P training
  patches from the detector's memory bank), refits the detector on the rest and scores the test
  set.

A ranking is computed once and serves every refinement ratio; adding a ratio adds jobs of the
second kind only.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from sroc import refinement, splits, strategies
from sroc.config import DetectorSpec
from sroc.detectors import BaseDetector
from sroc.evaluation import TestEvaluation
from sroc.feature_cache import input_boxes, load_features
from sroc.io import atomic_path
from sroc.plugins import load_plugins
from sroc.runs import Run, StoredRanking, read_rankings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefinementSetup:
    """What the strategies of a cell read besides its features: the detector, the refiner and
    consensus members, the refinement settings they declared, their own parameters, the seed of
    random removal and folds, and the pollution ratio whose training set is refined."""

    detector: DetectorSpec
    pollution_ratio: float
    rng_seed: int
    refiner: DetectorSpec | None = None
    consensus: Sequence[DetectorSpec] = ()
    settings: Mapping = field(default_factory=dict)
    strategy_params: Mapping[str, Mapping] = field(default_factory=dict)

    @classmethod
    def from_params(cls, params: Mapping, threads: int, category: str, seed: int):
        """The setup a rule passes as ``params.setup`` (workflow/rules/common.smk,
        ``refinement_setup``), its detectors on the job's ``threads``."""

        def spec(entry):
            return None if entry is None else DetectorSpec(**entry, n_jobs=threads)

        return cls(
            detector=spec(params["detector"]),
            pollution_ratio=float(params["pollution_ratio"]),
            rng_seed=strategy_seed(category, seed),
            refiner=spec(params.get("refiner")),
            consensus=tuple(spec(member) for member in params.get("consensus") or ()),
            settings=dict(params.get("settings") or {}),
            strategy_params=dict(params.get("strategy_params") or {}),
        )

    def inputs(self, cell: Cell) -> strategies.RankingInputs:
        """The :class:`sroc.strategies.RankingInputs` on the cell's polluted training set, for
        any strategy (see :meth:`for_strategy`; ``fitted`` is left to the caller)."""
        train = cell.training_set(self.pollution_ratio)
        ids = train["image_id"].to_numpy(dtype=str)
        return strategies.RankingInputs(
            features=cell.features_of(ids),
            image_ids=ids,
            polluted=train["polluted"].to_numpy(dtype=bool),
            detector=self.detector,
            fitted=None,
            refiner=self.refiner,
            consensus=tuple(self.consensus),
            settings=dict(self.settings),
            params={},
            rng_seed=self.rng_seed,
        )

    def for_strategy(
        self, inputs: strategies.RankingInputs, strategy: strategies.Strategy
    ) -> strategies.RankingInputs:
        """``inputs`` with ``strategy``'s own parameters: its defaults, then the config's."""
        own = self.strategy_params.get(strategy.name) or {}
        return replace(inputs, params={**strategy.params, **own})


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
    setup: RefinementSetup,
    evaluation: TestEvaluation,
    pollution_ratios: Sequence[float],
    strategy_names: Sequence[str],
) -> tuple[list[Run], list[StoredRanking], list[tuple[str, str]]]:
    """The robustness curve, the rankings of the polluted training set at
    ``setup.pollution_ratio`` and the single-run strategies' runs (see the module docstring).

    Returns the runs, the rankings, and (strategy, refiner) of every strategy with a ratio curve,
    whose r = 0 row is the unrefined model (:func:`result_rows`).
    """
    chosen = [strategies.get(name) for name in strategy_names]
    for strategy in chosen:
        strategy.check_applies_to(setup.detector.type)
    factory = setup.detector.factory()
    refined_ratio = float(setup.pollution_ratio)
    runs, scorer = [], None
    ratios = set(map(float, pollution_ratios))
    if chosen:
        ratios.add(refined_ratio)
    for ratio in sorted(ratios):
        train = cell.training_set(ratio)
        fit = _fit_and_score(factory, cell.features_of(train["image_id"]), cell, evaluation)
        runs.append(_run("none", "none", ratio, 0.0, train, [], cell, fit))
        log.info(
            "pollution %g: fit on %d images (%d polluted) in %.2f s, scored %d test images in "
            "%.2f s",
            ratio, len(train), int(train["polluted"].sum()), fit[3], len(cell.test), fit[4],
        )  # fmt: skip
        if ratio == refined_ratio:
            scorer = fit[0]

    train = cell.training_set(refined_ratio)
    shared = replace(setup.inputs(cell), fitted=scorer)
    rankings, curves = [], []
    for strategy in chosen:
        inputs = setup.for_strategy(shared, strategy)
        if strategy.has_ratio_curve:
            curves.append((strategy.name, strategy.ranked_by(inputs)))
        if strategy.kind == "single_run":
            runs.append(_single_run(strategy, inputs, cell, evaluation, train, refined_ratio))
        elif strategy.kind != "ranked_per_ratio":  # those rank in each ratio's refine job
            rankings.append(_stored_ranking(strategy, inputs, refined_ratio))
    return runs, rankings, curves


def _stored_ranking(
    strategy: strategies.Strategy,
    inputs: strategies.RankingInputs,
    pollution_ratio: float,
    *target_ratio: float,
) -> StoredRanking:
    """Run ``strategy``'s ranking (at ``target_ratio`` for a per-ratio strategy) and keep it."""
    start = time.perf_counter()
    ranking = strategy.function(inputs, *target_ratio)
    log.info(
        "ranking %s: %d fits in %.2f s", strategy.name, ranking.n_fits, time.perf_counter() - start
    )
    return StoredRanking(
        strategy=strategy.name,
        refiner=strategy.ranked_by(inputs),
        image_ids=inputs.image_ids,
        scores=ranking.scores,
        order=ranking.order,
        polluted=inputs.polluted,
        attrs={
            "pollution_ratio": float(pollution_ratio),
            # The seed of the ranking's tie-break, which the refine jobs' patch removal reuses.
            "tie_seed": int(inputs.rng_seed),
            "n_fits": ranking.n_fits,
            "fit_seconds": ranking.fit_seconds,
            "score_seconds": ranking.score_seconds,
        },
        patch_scores=ranking.patch_scores,
    )


def per_ratio_rankings(
    cell: Cell, setup: RefinementSetup, strategy_names: Sequence[str], ratio: float
) -> list[StoredRanking]:
    """The rankings of the per-ratio strategies among ``strategy_names`` (kind
    ``ranked_per_ratio``), each computed for refinement ratio ``ratio``."""
    chosen = [strategies.get(name) for name in strategy_names]
    chosen = [strategy for strategy in chosen if strategy.kind == "ranked_per_ratio"]
    if not chosen:
        return []
    shared = setup.inputs(cell)
    rankings = []
    for strategy in chosen:
        strategy.check_applies_to(setup.detector.type)
        inputs = setup.for_strategy(shared, strategy)
        rankings.append(_stored_ranking(strategy, inputs, setup.pollution_ratio, ratio))
    return rankings


def _single_run(
    strategy: strategies.Strategy,
    inputs: strategies.RankingInputs,
    cell: Cell,
    evaluation: TestEvaluation,
    train: pd.DataFrame,
    pollution_ratio: float,
) -> Run:
    """A single-run strategy's run: remove what it selects, refit on the rest, score."""
    selection = strategy.function(inputs)
    removed = inputs.image_ids[selection.removed]
    kept = np.delete(inputs.image_ids, selection.removed)
    fit = _fit_and_score(inputs.detector.factory(), cell.features_of(kept), cell, evaluation)
    log.info(
        "%s: removed %d images (ratio %.3f), fit in %.2f s",
        strategy.name, len(removed), selection.ratio, fit[3],
    )  # fmt: skip
    return _run(
        strategy.name, strategy.ranked_by(inputs), pollution_ratio, selection.ratio, train,
        removed, cell, fit,
    )  # fmt: skip


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
            rows = refinement.removed_patches(
                ranking.patch_scores, ranking.image_ids, ratio, int(ranking.attrs["tie_seed"])
            )
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
    curves: Sequence[tuple[str, str]] = (),
    pollution_ratio: float | None = None,
) -> list[dict]:
    """The rows of the results table for ``runs``, with their test metrics.

    Each (strategy, refiner) of ``curves`` also gets its r = 0 row: nothing is removed, so it is
    the unrefined model at the refined ``pollution_ratio``, stored once as that ratio's ``none``
    run.
    """
    rows = []
    for run in runs:
        rows.append({**run.record(), **evaluation.metrics(run.scores, run.maps)})
    for strategy, refiner in curves:
        (base,) = [
            row for row in rows
            if row["strategy"] == "none" and row["pollution_ratio"] == float(pollution_ratio)
        ]  # fmt: skip
        rows.append({**base, "strategy": strategy, "refiner": refiner, "run": f"{strategy}/r=0"})
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

    @classmethod
    def for_rule(cls, input, params, threads: int, category: str):
        """The job of a grid rule (rank, refine) and its :class:`RefinementSetup`, from the rule's
        ``input`` (manifest, info, cache) and ``params`` (plugins, setup, evaluation,
        input_size), its detectors on ``threads``; the config's plugin files are loaded first."""
        load_plugins(params.plugins)
        job = cls.load(
            input.manifest, input.info, input.cache, params.evaluation, params.input_size
        )
        setup = RefinementSetup.from_params(params.setup, threads, category, job.info["seed"])
        return job, setup

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


# --------------------------------------------------------------------------------------------
# The refine job's work, and the share of it that the rank job does (docs/refinement.md, "The
# grid and its jobs")

# A rank job also refits its cell's refinement ratios, one after the other, while the refits it
# projects stay within this many seconds: cheap refits then cost no process of their own (a
# fresh Python, the imports and the feature load, about 1-2 s), and expensive ones keep their
# own job, which runs in parallel with the cell's other ratios.
STAGED_REFITS_SECONDS = 30.0


def refine_job(
    job: CellJob,
    setup: RefinementSetup,
    strategy_names: Sequence[str],
    ratio: float,
    ranked_path: str | Path,
) -> tuple[list[Run], list[dict], list[StoredRanking]]:
    """What the ``refine`` job at ``ratio`` computes: the per-ratio strategies' rankings, then a
    refit on what every ranking of ``ranked_path`` (and those) keeps; the runs, their rows and the
    per-ratio rankings. Nothing for an excluded category."""
    if job.cell is None:
        return [], [], []
    own = per_ratio_rankings(job.cell, setup, strategy_names, ratio)
    rankings = read_rankings(ranked_path)
    rankings.update({ranking.strategy: ranking for ranking in own})
    refitted = refined_runs(job.cell, setup.detector, job.evaluation, rankings, ratio)
    return refitted, result_rows(refitted, job.evaluation), own


def projected_refine_seconds(fitted: Sequence[Run], n_refits: int) -> float:
    """A refine job's refits, projected from the robustness curve's runs (``strategy`` none) of
    the rank job: ``n_refits`` times their mean fit and test-scoring seconds."""
    curve = [run.fit_seconds + run.score_seconds for run in fitted if run.strategy == "none"]
    return n_refits * float(np.mean(curve)) if curve else 0.0
