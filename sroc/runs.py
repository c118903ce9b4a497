"""Runs: one detector fitted on one training set and scored on the test set, and their storage.

A score file holds, for one (detector, category, seed), one HDF5 group per run (per pollution
ratio): the test image ids, their image scores and their anomaly maps at the detector's
resolution (float16), plus the training composition and timings as attributes. Every metric can
be recomputed from it without refitting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from sroc import splits
from sroc.detectors import make_detector
from sroc.embeddings import load_features
from sroc.io import atomic_path

log = logging.getLogger(__name__)


@dataclass
class RunScores:
    """Scores of one run on the test images."""

    name: str
    image_ids: np.ndarray
    scores: np.ndarray
    maps: np.ndarray
    attrs: dict = field(default_factory=dict)


def select(features: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {stage: array[rows] for stage, array in features.items()}


def pollution_runs(
    detector_type: str,
    detector_params: dict,
    manifest: pd.DataFrame,
    cache_path: str | Path,
    ratios: Sequence[float],
    seed: int,
    n_jobs: int = 1,
) -> list[RunScores]:
    """Fit the detector on the training set of every pollution ratio and score the test set.

    The features of the category are read once; each ratio only selects rows. The detector's
    ``random_state`` is the split seed.
    """
    test = splits.test_set(manifest)
    candidates = manifest[manifest["role"].isin(["train", "pollution"])]
    ids = pd.concat([candidates["image_id"], test["image_id"]]).tolist()
    features, _ = load_features(cache_path, ids)
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    test_rows = np.array([row_of[i] for i in test["image_id"]])
    test_features = select(features, test_rows)

    runs = []
    for ratio in ratios:
        train = splits.training_set(manifest, ratio)
        train_rows = np.array([row_of[i] for i in train["image_id"]])
        detector = make_detector(
            detector_type, random_state=seed, n_jobs=n_jobs, **detector_params
        )
        start = time.perf_counter()
        detector.fit(select(features, train_rows))
        fitted = time.perf_counter()
        scores, maps = detector.score(test_features)
        done = time.perf_counter()
        log.info(
            "ratio %g: fit on %d images (%d polluted) in %.1f s, scored %d test images in %.1f s",
            ratio,
            len(train),
            int(train["polluted"].sum()),
            fitted - start,
            len(test),
            done - fitted,
        )
        runs.append(
            RunScores(
                name=f"pollution={ratio:g}",
                image_ids=test["image_id"].to_numpy(dtype=str),
                scores=np.asarray(scores, dtype=np.float64),
                maps=np.asarray(maps, dtype=np.float16),
                attrs={
                    "strategy": "none",
                    "pollution_ratio": float(ratio),
                    "n_train": len(train),
                    "n_train_polluted": int(train["polluted"].sum()),
                    "fit_seconds": fitted - start,
                    "score_seconds": done - fitted,
                },
            )
        )
    return runs


def write_scores(path: str | Path, runs: Sequence[RunScores], attrs: dict) -> None:
    """Write the runs of one (detector, category, seed) atomically."""
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as out:
            out.attrs.update({k: v for k, v in attrs.items() if v is not None})
            for run in runs:
                group = out.create_group(run.name)
                group.create_dataset(
                    "image_id", data=run.image_ids.astype(object), dtype=h5py.string_dtype()
                )
                group.create_dataset("score", data=run.scores)
                group.create_dataset("map", data=run.maps, compression="gzip", shuffle=True)
                group.attrs.update(run.attrs)


def read_scores(path: str | Path) -> tuple[list[RunScores], dict]:
    """The runs of one score file, in the order they were written, and the file's attributes."""
    with h5py.File(path, "r") as source:
        attrs = dict(source.attrs)
        runs = [
            RunScores(
                name=name,
                image_ids=group["image_id"].asstr()[...],
                scores=group["score"][...],
                maps=group["map"][...].astype(np.float32),
                attrs=dict(group.attrs),
            )
            for name, group in sorted(
                source.items(), key=lambda item: item[1].attrs.get("pollution_ratio", 0)
            )
        ]
    return runs, attrs


def evaluate_runs(
    test: pd.DataFrame,
    score_files: dict[str, str | Path],
    fpr_limit: float = 0.3,
    resolution: int | None = None,
    input_size: int = 380,
    smoothing_sigma: float = 4.0,
) -> pd.DataFrame:
    """Metrics of every run of every detector on one (category, seed) test set.

    The ground truth is read and its regions labelled once, then reused by every run. Maps are
    brought to ground-truth resolution (or to ``resolution`` x ``resolution``) by bilinear
    interpolation and smoothed by a Gaussian of ``smoothing_sigma`` pixels at the backbone input
    size (4 px, as PaDiM and PatchCore), scaled to the target size.
    """
    from sroc.data import image_size
    from sroc.detectors import resize_maps, scale_sigma
    from sroc.metrics import PixelGroundTruth, image_auroc

    ground_truth = None
    if (test["mask_path"] != "").any():
        ground_truth = PixelGroundTruth.from_mask_paths(
            test["mask_path"].tolist(),
            [image_size(path) for path in test["path"]],
            test["label"].to_numpy(),
            resolution=None if resolution is None else (resolution, resolution),
        )
    labels = test["label"].to_numpy()
    test_ids = test["image_id"].to_numpy(dtype=str)
    rows = []
    for detector, path in score_files.items():
        runs, _ = read_scores(path)
        for run in runs:
            if not np.array_equal(run.image_ids, test_ids):
                raise ValueError(f"{path}: run {run.name} was scored on other test images")
            row = {"detector": detector, "run": run.name, **run.attrs}
            row["image_auroc"] = image_auroc(labels, run.scores)
            if ground_truth is None:
                row.update(
                    au_pro=np.nan, au_iou=np.nan, fpr_limit=fpr_limit, pixel_resolution="no masks"
                )
            else:
                maps = [
                    resize_maps(m[None], shape, scale_sigma(smoothing_sigma, input_size, shape))[0]
                    for m, shape in zip(run.maps, ground_truth.shapes, strict=True)
                ]
                row.update(ground_truth.evaluate(maps, fpr_limit=fpr_limit))
            rows.append(row)
    return pd.DataFrame(rows)
