"""Metrics of one test set: image AUROC for every run, AU-PRO and AU-IoU where masks exist.

The ground truth of a test set is read and its regions labelled once, then reused by every run
scored on it. Maps come from the detectors on their feature grid; they are brought to
ground-truth resolution (or to ``resolution`` x ``resolution``) and smoothed here, in one place,
by :func:`sroc.detectors.resize_maps`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sroc.data import image_size
from sroc.detectors import resize_maps, scale_sigma
from sroc.metrics import PixelGroundTruth, image_auroc

# PaDiM and PatchCore smooth their maps with a Gaussian of 4 px at the backbone input size.
SMOOTHING_SIGMA_INPUT_PX = 4.0
NO_MASKS = "no masks"


class TestEvaluation:
    """Evaluates runs scored on the test set ``test`` (rows of a split manifest).

    Parameters
    ----------
    test : the test images, in the order the scores and maps are given.
    fpr_limit : integration limit of AU-PRO and AU-IoU (the paper: 0.3).
    input_size : backbone input size, to convert the smoothing sigma to ground-truth pixels.
    resolution : None compares at ground-truth resolution; an int resizes masks and maps to it.
    """

    def __init__(
        self,
        test: pd.DataFrame,
        fpr_limit: float = 0.3,
        input_size: int = 380,
        resolution: int | None = None,
    ):
        self.test = test.reset_index(drop=True)
        self.fpr_limit = fpr_limit
        self.input_size = input_size
        self.labels = self.test["label"].to_numpy()
        self.image_ids = self.test["image_id"].to_numpy(dtype=str)
        self.ground_truth = None
        if (self.test["mask_path"] != "").any():
            self.ground_truth = PixelGroundTruth.from_mask_paths(
                self.test["mask_path"].tolist(),
                [image_size(path) for path in self.test["path"]],
                labels=self.labels,
                resolution=None if resolution is None else (resolution, resolution),
            )

    @property
    def needs_maps(self) -> bool:
        """Whether any metric uses anomaly maps: only pixel metrics do, and only with masks."""
        return self.ground_truth is not None

    def metrics(self, scores: np.ndarray, maps: np.ndarray | None) -> dict[str, float | str]:
        """Image AUROC, and AU-PRO / AU-IoU of the maps (NaN, "no masks", without ground truth)."""
        row: dict[str, float | str] = {"image_auroc": image_auroc(self.labels, scores)}
        if self.ground_truth is None:
            row.update(au_pro=math.nan, au_iou=math.nan, fpr_limit=self.fpr_limit)
            row["pixel_resolution"] = NO_MASKS
            return row
        if maps is None:
            raise ValueError("this test set has masks: score it with maps=True")
        resized = [
            resize_maps(
                image_map[None].astype(np.float32),
                shape,
                scale_sigma(SMOOTHING_SIGMA_INPUT_PX, self.input_size, shape),
            )[0]
            for image_map, shape in zip(maps, self.ground_truth.shapes, strict=True)
        ]
        row.update(self.ground_truth.evaluate(resized, fpr_limit=self.fpr_limit))
        return row
