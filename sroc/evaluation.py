"""Metrics of one test set: image AUROC for every run, AU-PRO and AU-IoU where masks exist.

The ground truth of a test set is read and its regions labelled once, then reused by every run
scored on it. Maps come from the detectors on their feature grid; they are brought to
ground-truth resolution (or to ``resolution`` x ``resolution``) and smoothed here, in one place,
by :func:`sroc.geometry.resize_maps`.

Maps span the backbone's input canvas. For squashed and tiled images the canvas is the image, so
maps are resized as they are; for padded images (``aspect="pad"``) the image's box on the canvas
is cut out first (:func:`sroc.geometry.crop_resize_maps`), leaving the padding out. The
smoothing sigma is converted from input pixels with the image's size on the input.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sroc.datasets.layout import image_size
from sroc.geometry import crop_resize_maps, resize_maps, scale_sigma
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
    input_boxes, canvas_hw : where each test image lies on the backbone input, (n, 4) of (top,
        left, height, width) on a canvas of ``canvas_hw`` input pixels
        (:func:`sroc.embeddings.input_boxes`); None: squashed, every image fills the
        ``input_size`` square.
    """

    def __init__(
        self,
        test: pd.DataFrame,
        fpr_limit: float = 0.3,
        input_size: int = 380,
        resolution: int | None = None,
        input_boxes: np.ndarray | None = None,
        canvas_hw: tuple[int, int] | None = None,
    ):
        self.test = test.reset_index(drop=True)
        self.fpr_limit = fpr_limit
        self.input_size = input_size
        if input_boxes is None:
            canvas_hw = (input_size, input_size)
            input_boxes = np.tile([0, 0, input_size, input_size], (len(self.test), 1))
        self.canvas_hw = tuple(int(v) for v in canvas_hw)
        self.input_boxes = np.asarray(input_boxes, dtype=np.int64).reshape(-1, 4)
        if len(self.input_boxes) != len(self.test):
            raise ValueError(
                f"{len(self.input_boxes)} input boxes for {len(self.test)} test images"
            )
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
            self.resize_map(image_map, box, shape)
            for image_map, box, shape in zip(
                maps, self.input_boxes, self.ground_truth.shapes, strict=True
            )
        ]
        row.update(self.ground_truth.evaluate(resized, fpr_limit=self.fpr_limit))
        return row

    def resize_map(self, image_map: np.ndarray, box: np.ndarray, shape) -> np.ndarray:
        """One map on the feature grid -> its image's region at ``shape``, smoothed."""
        top, left, height, width = (int(v) for v in box)
        image_map = image_map[None].astype(np.float32)
        if (top, left, height, width) == (0, 0, *self.canvas_hw):
            sigma = scale_sigma(SMOOTHING_SIGMA_INPUT_PX, self.canvas_hw, shape)
            return resize_maps(image_map, shape, sigma)[0]
        grid_h, grid_w = image_map.shape[1:]
        scale_y, scale_x = grid_h / self.canvas_hw[0], grid_w / self.canvas_hw[1]
        grid_box = (
            top * scale_y,
            left * scale_x,
            (top + height) * scale_y,
            (left + width) * scale_x,
        )
        sigma = scale_sigma(SMOOTHING_SIGMA_INPUT_PX, (height, width), shape)
        return crop_resize_maps(image_map, grid_box, shape, sigma)[0]
