"""Runs and rankings of the experiment grid, and their storage.

A *run* is one detector fitted on one training set and scored on the test set: the robustness
curve's runs (strategy ``none``, one per pollution ratio), the single-run strategies' (the oracle,
``sroc_auto``: one per cell, at a refinement ratio of their own), and the refined runs (one per
strategy and refinement ratio). A *ranking* is a refinement strategy's score for every image
of the polluted training set with the order in which images are removed.

A score file holds the runs of one job: per run the test image ids, their scores and, when the
dataset has masks, their anomaly maps (float16) on the detector's grid, with the training-set
composition and timings as attributes; per ranking the training image ids, their scores, the
removal order and which images were polluted (a patch-level ranking also every training patch's
score). Every metric, and refinement precision / recall /
F1 at any ratio, can be recomputed from these files without refitting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from sroc import strategies
from sroc.io import atomic_path
from sroc.metrics import refinement_scores

# The columns of runs.parquet that identify the job a row comes from.
KEY_COLUMNS = ("category", "seed", "detector", "detector_type", "protocol")
# The columns of runs.parquet that describe a run; the metrics follow (docs/refinement.md).
RUN_COLUMNS = (
    "strategy",
    "refiner",
    "pollution_ratio",
    "refinement_ratio",
    "run",
    "n_train",
    "n_polluted",
    "n_removed",
    "n_kept",
    "n_removed_polluted",
    "n_kept_polluted",
    "precision",
    "recall",
    "f1",
    "fit_seconds",
    "score_seconds",
)
# The test metrics of a run (sroc.evaluation.TestEvaluation.metrics).
METRIC_COLUMNS = ("image_auroc", "au_pro", "au_iou", "fpr_limit", "pixel_resolution")
# Timings differ from one execution to the next; every other column is reproducible.
TIMING_COLUMNS = ("fit_seconds", "score_seconds")


@dataclass
class Run:
    """One detector fitted on a training set (the polluted set less ``removed_ids``) and scored
    on the test set."""

    strategy: str
    refiner: str
    pollution_ratio: float
    refinement_ratio: float
    training_ids: np.ndarray  # the polluted training set before refinement
    polluted_ids: np.ndarray  # its defective images
    removed_ids: np.ndarray  # what the refinement removed
    test_ids: np.ndarray
    scores: np.ndarray
    maps: np.ndarray | None
    fit_seconds: float
    score_seconds: float

    @property
    def name(self) -> str:
        if self.strategy == "none" or strategies.get(self.strategy).kind == "single_run":
            # One run per pollution ratio.
            return f"{self.strategy}/p={self.pollution_ratio:g}"
        return f"{self.strategy}/r={self.refinement_ratio:g}"

    def record(self) -> dict:
        """The run's row of the results table, less the test metrics."""
        refinement = refinement_scores(self.removed_ids.tolist(), self.polluted_ids.tolist())
        n_train = len(self.training_ids)
        n_removed = refinement["n_removed"]
        return {
            "strategy": self.strategy,
            "refiner": self.refiner,
            "pollution_ratio": self.pollution_ratio,
            "refinement_ratio": self.refinement_ratio,
            "run": self.name,
            "n_train": n_train,
            "n_polluted": refinement["n_polluted"],
            "n_removed": n_removed,
            "n_kept": n_train - n_removed,
            "n_removed_polluted": refinement["n_removed_polluted"],
            "n_kept_polluted": refinement["n_polluted"] - refinement["n_removed_polluted"],
            "precision": refinement["precision"],
            "recall": refinement["recall"],
            "f1": refinement["f1"],
            "fit_seconds": self.fit_seconds,
            "score_seconds": self.score_seconds,
        }


@dataclass
class StoredRanking:
    """A strategy's ranking of the polluted training set, as stored; a patch-level strategy's
    also holds every training patch's score, ``patch_scores`` (N, H, W) float32."""

    strategy: str
    refiner: str
    image_ids: np.ndarray
    scores: np.ndarray
    order: np.ndarray
    polluted: np.ndarray
    attrs: dict = field(default_factory=dict)
    patch_scores: np.ndarray | None = None

    def removed_ids(self, n_removed: int) -> np.ndarray:
        return self.image_ids[self.order[:n_removed]]


def _string_dataset(group: h5py.Group, name: str, values: Sequence[str]) -> None:
    group.create_dataset(name, data=np.asarray(values, dtype=object), dtype=h5py.string_dtype())


def write_scores(
    path: str | Path,
    attrs: dict,
    runs: Sequence[Run] = (),
    rankings: Sequence[StoredRanking] = (),
) -> None:
    """Write the runs and rankings of one job atomically."""
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as out:
        out.attrs.update({k: v for k, v in attrs.items() if v is not None})
        runs_group = out.create_group("runs")
        for run in runs:
            # "/" in a run name would nest groups: flatten it.
            group = runs_group.create_group(run.name.replace("/", ":"))
            _string_dataset(group, "image_id", run.test_ids)
            group.create_dataset("score", data=np.asarray(run.scores, dtype=np.float64))
            if run.maps is not None:
                group.create_dataset(
                    "map", data=np.asarray(run.maps, dtype=np.float16), compression="gzip",
                    shuffle=True,
                )  # fmt: skip
            _string_dataset(group, "removed_id", run.removed_ids)
            _string_dataset(group, "polluted_id", run.polluted_ids)
            _string_dataset(group, "training_id", run.training_ids)
            group.attrs.update(
                {
                    "strategy": run.strategy,
                    "refiner": run.refiner,
                    "pollution_ratio": run.pollution_ratio,
                    "refinement_ratio": run.refinement_ratio,
                    "fit_seconds": run.fit_seconds,
                    "score_seconds": run.score_seconds,
                }
            )
        rankings_group = out.create_group("rankings")
        for ranking in rankings:
            group = rankings_group.create_group(ranking.strategy)
            _string_dataset(group, "image_id", ranking.image_ids)
            group.create_dataset("score", data=np.asarray(ranking.scores, dtype=np.float64))
            group.create_dataset("order", data=np.asarray(ranking.order, dtype=np.int64))
            group.create_dataset("polluted", data=np.asarray(ranking.polluted, dtype=bool))
            if ranking.patch_scores is not None:
                # float32, as computed: the removed patches are recomputed exactly from them.
                group.create_dataset(
                    "patch_score", data=np.asarray(ranking.patch_scores, dtype=np.float32),
                    compression="gzip", shuffle=True,
                )  # fmt: skip
            group.attrs.update({"refiner": ranking.refiner, **ranking.attrs})


def read_rankings(path: str | Path) -> dict[str, StoredRanking]:
    """The rankings of a score file, by strategy."""
    with h5py.File(path, "r") as source:
        return {
            strategy: StoredRanking(
                strategy=strategy,
                refiner=str(group.attrs["refiner"]),
                image_ids=group["image_id"].asstr()[...],
                scores=group["score"][...],
                order=group["order"][...],
                polluted=group["polluted"][...],
                attrs={k: v for k, v in group.attrs.items() if k != "refiner"},
                patch_scores=group["patch_score"][...] if "patch_score" in group else None,
            )
            for strategy, group in source.get("rankings", {}).items()
        }


def read_score_file_runs(path: str | Path) -> list[Run]:
    """The runs of a score file (maps as float32, None where none were stored)."""
    with h5py.File(path, "r") as source:
        return [
            Run(
                strategy=str(group.attrs["strategy"]),
                refiner=str(group.attrs["refiner"]),
                pollution_ratio=float(group.attrs["pollution_ratio"]),
                refinement_ratio=float(group.attrs["refinement_ratio"]),
                training_ids=group["training_id"].asstr()[...],
                polluted_ids=group["polluted_id"].asstr()[...],
                removed_ids=group["removed_id"].asstr()[...],
                test_ids=group["image_id"].asstr()[...],
                scores=group["score"][...],
                maps=group["map"][...].astype(np.float32) if "map" in group else None,
                fit_seconds=float(group.attrs["fit_seconds"]),
                score_seconds=float(group.attrs["score_seconds"]),
            )
            for group in source["runs"].values()
        ]


def collect_rows(paths: Sequence[str | Path], dataset: str) -> pd.DataFrame:
    """The rows written by the grid's jobs, one table sorted by its keys (so the table does not
    depend on the order jobs ran in). Jobs of excluded categories contribute nothing."""
    tables = []
    for path in paths:
        try:
            tables.append(pd.read_csv(path))
        except pd.errors.EmptyDataError:  # an excluded category's job wrote no row
            continue
    if not tables:
        return pd.DataFrame(columns=["dataset", *KEY_COLUMNS, *RUN_COLUMNS, *METRIC_COLUMNS])
    table = pd.concat(tables, ignore_index=True)
    table.insert(0, "dataset", dataset)
    return table.sort_values(
        ["category", "seed", "detector", "strategy", "pollution_ratio", "refinement_ratio"],
        kind="stable",
    ).reset_index(drop=True)


def write_results_table(
    table: pd.DataFrame, parquet_path: str | Path, csv_path: str | Path
) -> None:
    """Write the results table as Parquet and CSV, each atomically."""
    with atomic_path(parquet_path, suffix=".parquet") as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
