"""Evaluation metrics: image AUROC, pixel AU-PRO and AU-IoU up to an FPR limit, and the precision,
recall and F1 of a refinement (which training images were removed versus which were defective).

AU-PRO follows the MVTec AD reference evaluation (pro_curve_util.compute_pro + trapezoid) exactly:
8-connected ground-truth regions, thresholds pooled over every pixel of every image, one curve point
per distinct score (the last point of each tie run), end points (0, 0) and (1, 1), trapezoid rule up
to the FPR limit with linear interpolation at the limit, divided by the limit. AU-IoU integrates the
pooled IoU(t) = TP / (TP + FP + FN) over the same FPR axis in the same way. docs/metrics.md defines
both and the edge cases.

Only the part of the curve below the FPR limit is built: the OK pixel score at which the limit is
crossed is found by selection (np.partition), and only the OK scores at or above it are sorted.
Defect pixels are placed between those sorted thresholds by binary search, so no score is ever
argsorted and the result equals the full-sort reference up to float64 rounding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

DEFAULT_FPR_LIMIT = 0.3
GROUND_TRUTH_RESOLUTION = "ground_truth"

# 8-connectivity, as the MVTec AD reference labels ground-truth regions.
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)


def image_auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of image scores against image labels (0 good, 1 defective).

    Scores are used as given: clamping or min-max normalising them first can create or remove
    ties, and ties change the AUROC (a tied good/defective pair counts one half).
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(
            f"image_auroc needs one label and one score per image as 1-D arrays of equal length; "
            f"got labels of shape {labels.shape} and scores of shape {scores.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(
            f"image labels must be 0 (good) or 1 (defective); got values {np.unique(labels)[:10]}"
        )
    _require_finite(scores, "image scores")
    n_defective = int(np.count_nonzero(labels))
    if n_defective in (0, labels.size):
        raise ValueError(
            f"image AUROC needs good and defective images; got {labels.size - n_defective} good "
            f"and {n_defective} defective: check the test split of this category"
        )
    # Mann-Whitney: the AUROC is the probability that a defective image outscores a good one,
    # ties counting one half, i.e. (rank sum of the defective - its minimum) / pairs with
    # average ranks for ties; scikit-learn's roc_auc_score gives the same (tests compare).
    ranks = average_ranks(scores)
    rank_sum = ranks[labels == 1].sum()
    n_good = labels.size - n_defective
    return float((rank_sum - n_defective * (n_defective + 1) / 2) / (n_defective * n_good))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` (1-D), tied values sharing the mean of their ranks (float64;
    scipy.stats.rankdata's "average")."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # Start of each run of equal values in sorted order, and the run each sorted value is in.
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    stops = np.append(starts[1:], values.size)
    run_of = np.repeat(np.arange(starts.size), stops - starts)
    ranks = np.empty(values.size)
    ranks[order] = ((starts + 1 + stops) / 2.0)[run_of]
    return ranks


def resize_mask_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D boolean mask to ``size`` = (height, width) by nearest neighbour.

    Each output pixel takes the input pixel under its centre (PIL ``NEAREST``, PyTorch
    ``nearest-exact``), so the mask stays binary and is not shifted.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"resize_mask_nearest needs a 2-D mask; got shape {mask.shape}")
    out_h, out_w = _check_size(size)
    rows = _nearest_taps(mask.shape[0], out_h)
    cols = _nearest_taps(mask.shape[1], out_w)
    return mask.astype(bool, copy=False)[np.ix_(rows, cols)]


class PixelGroundTruth:
    """The ground-truth masks of one test set, labelled once and reused for every evaluation.

    Connected defect regions (8-connectivity) are labelled per mask at construction; every later
    ``evaluate`` call (one per detector, seed, pollution and refinement ratio) reuses them.

    Parameters
    ----------
    masks:
        One 2-D mask per test image, in the order the maps will be given (true or non-zero =
        defect). Defect-free images have all-zero masks: their pixels count only towards the FPR.
        Masks may differ in size.
    resolution:
        None (default) evaluates at each mask's own resolution. A (height, width) pair instead
        resizes every mask to that size by nearest neighbour before labelling; maps must then be
        given (or brought with ``resize``) at that size.
    excluded:
        None (default), or one boolean per mask: True marks an image whose ground truth is
        unknown, a defective image without a mask. Its mask only gives the map's shape (its
        content is ignored); its map is still given to ``evaluate`` but left out of every pixel
        metric, so that the image counts neither as defect nor as defect-free.
    """

    def __init__(
        self,
        masks: Sequence[np.ndarray] | np.ndarray,
        resolution: tuple[int, int] | None = None,
        excluded: Sequence[bool] | np.ndarray | None = None,
    ) -> None:
        if len(masks) == 0:
            raise ValueError("PixelGroundTruth needs at least one mask")
        if excluded is None:
            excluded = np.zeros(len(masks), dtype=bool)
        excluded = np.asarray(excluded)
        if excluded.shape != (len(masks),) or excluded.dtype != bool:
            raise ValueError(
                f"excluded must hold one boolean per mask ({len(masks)}); got an array of shape "
                f"{excluded.shape} and dtype {excluded.dtype}"
            )
        self.resolution = None if resolution is None else _check_size(resolution)
        self.excluded = excluded
        shapes = []
        is_defect = [np.zeros(0, dtype=bool)]
        defect_weight = [np.zeros(0)]
        n_regions = 0
        for index, mask in enumerate(masks):
            mask = np.asarray(mask)
            if mask.ndim != 2 or mask.size == 0:
                raise ValueError(f"mask {index} must be a non-empty 2-D array; got {mask.shape}")
            if self.resolution is not None:
                mask = resize_mask_nearest(mask, self.resolution)
            shapes.append(mask.shape)
            if excluded[index]:
                continue
            regions, n_in_mask = ndimage.label(mask != 0, structure=_REGION_STRUCTURE)
            regions = regions.ravel()
            region_sizes = np.bincount(regions)
            in_region = regions > 0
            is_defect.append(in_region)
            # Each region has total weight 1, so the cumulative weight above a threshold divided
            # by the region count is the mean per-region overlap (PRO).
            defect_weight.append(1.0 / region_sizes[regions[in_region]])
            n_regions += n_in_mask
        self.shapes: list[tuple[int, int]] = shapes
        self._ok_mask = ~np.concatenate(is_defect)
        self._defect_index = np.flatnonzero(~self._ok_mask)
        self._defect_weight = np.concatenate(defect_weight)
        self.n_regions = n_regions
        if self.n_excluded:
            logger.warning(
                "%d of %d test images are defective but have no mask: they are left out of "
                "AU-PRO and AU-IoU (image AUROC still uses them)",
                self.n_excluded,
                self.n_images,
            )

    @classmethod
    def from_mask_paths(
        cls,
        mask_paths: Sequence[str],
        image_sizes: Sequence[tuple[int, int]],
        labels: Sequence[int] | np.ndarray,
        resolution: tuple[int, int] | None = None,
    ) -> PixelGroundTruth:
        """Read masks listed as in the dataset index, one per test image.

        ``image_sizes`` are the original (height, width) of each image; a mask file of another
        size is an error (from ``sroc.data.read_mask``). A mask path "" means a defect-free image
        when its label is 0, and an unknown ground truth when its label is 1 (a dataset indexed
        with ``require_masks=False``): that image is excluded from the pixel metrics.
        """
        from sroc.datasets.layout import read_mask

        labels = np.asarray(labels)
        if not len(mask_paths) == len(image_sizes) == len(labels):
            raise ValueError(
                f"got {len(mask_paths)} mask paths, {len(image_sizes)} image sizes and "
                f"{len(labels)} labels; give one of each per test image"
            )
        masks = [
            read_mask(path, expected_hw=tuple(size)) if path else np.zeros(size, dtype=bool)
            for path, size in zip(mask_paths, image_sizes, strict=True)
        ]
        excluded = (labels == 1) & np.array([path == "" for path in mask_paths], dtype=bool)
        return cls(masks, resolution=resolution, excluded=excluded)

    @property
    def n_images(self) -> int:
        """Test images, including those excluded from the pixel metrics."""
        return len(self.shapes)

    @property
    def n_excluded(self) -> int:
        """Test images left out of the pixel metrics (defective, without a mask)."""
        return int(np.count_nonzero(self.excluded))

    @property
    def n_defect_pixels(self) -> int:
        return int(self._defect_index.size)

    @property
    def n_ok_pixels(self) -> int:
        return int(self._ok_mask.size - self._defect_index.size)

    @property
    def resolution_label(self) -> str:
        """ "ground_truth", or "<height>x<width>" when a fixed resolution was configured."""
        if self.resolution is None:
            return GROUND_TRUTH_RESOLUTION
        return f"{self.resolution[0]}x{self.resolution[1]}"

    def evaluate(
        self, maps: Sequence[np.ndarray] | np.ndarray, fpr_limit: float = DEFAULT_FPR_LIMIT
    ) -> dict[str, float | str]:
        """AU-PRO and AU-IoU of ``maps`` (one per mask, same shapes) up to ``fpr_limit``.

        The maps of excluded images are checked for shape and otherwise ignored.

        Returns {"au_pro", "au_iou", "fpr_limit", "pixel_resolution"}. Both areas are NaN, with a
        logged warning, when the test set has no defect pixel (or no OK pixel): they are undefined.
        The maps are read, never modified.
        """
        fpr_limit = _check_fpr_limit(fpr_limit)
        result: dict[str, float | str] = {
            "au_pro": math.nan,
            "au_iou": math.nan,
            "fpr_limit": fpr_limit,
            "pixel_resolution": self.resolution_label,
        }
        scores = self._pooled_scores(maps)
        if self.n_regions == 0 or self.n_ok_pixels == 0:
            logger.warning(
                "pixel metrics undefined: the %d test masks used hold %d defect and %d OK pixels; "
                "AU-PRO and AU-IoU are reported as NaN",
                self.n_images - self.n_excluded,
                self.n_defect_pixels,
                self.n_ok_pixels,
            )
            return result
        result["au_pro"], result["au_iou"] = self._areas(scores, fpr_limit)
        return result

    def _check_count(self, maps: Sequence[np.ndarray] | np.ndarray) -> None:
        if len(maps) != self.n_images:
            raise ValueError(
                f"got {len(maps)} anomaly maps for {self.n_images} ground-truth masks; give one "
                f"map per test image, in the order of the masks"
            )

    def _pooled_scores(self, maps: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """The pixel scores of every image not excluded as one flat array, in mask order (a view
        when maps is one array and no image is excluded)."""
        self._check_count(maps)
        for index, (score_map, shape) in enumerate(zip(maps, self.shapes, strict=True)):
            if np.shape(score_map) != shape:
                raise ValueError(
                    f"anomaly map {index} has shape {np.shape(score_map)} but its ground-truth "
                    f"mask has shape {shape} (pixel resolution: {self.resolution_label}); bring "
                    f"maps to the mask size with sroc.geometry.resize_maps"
                )
        if isinstance(maps, np.ndarray):
            scores = (maps[~self.excluded] if self.n_excluded else maps).reshape(-1)
        else:
            used = [np.ravel(m) for m, out in zip(maps, self.excluded, strict=True) if not out]
            scores = np.concatenate(used or [np.zeros(0)])
        if scores.dtype.kind not in "fiu":
            raise ValueError(f"anomaly maps must hold real numbers; got dtype {scores.dtype}")
        if not np.isfinite(scores).all():
            bad = [i for i, score_map in enumerate(maps) if not np.isfinite(score_map).all()]
            raise ValueError(
                f"anomaly maps {bad[:10]} hold NaN or infinite scores; pixel metrics need finite "
                f"scores (check the detector's output for these test images)"
            )
        return scores

    def _areas(self, scores: np.ndarray, fpr_limit: float) -> tuple[float, float]:
        """Normalised areas under the PRO and IoU curves for FPR in [0, fpr_limit]."""
        n_ok = self.n_ok_pixels
        ok_scores = scores[self._ok_mask]

        # The curve point where the FPR first exceeds the limit belongs to the OK score ranked
        # n_crossing from the top: every distinct threshold above it has an FPR within the limit.
        n_crossing = _smallest_count_above(fpr_limit, n_ok)
        kth = n_ok - n_crossing
        ok_scores.partition(kth)
        crossing_score = ok_scores[kth]
        ok_above = ok_scores[kth:]
        ok_above.sort()
        # OK pixels tied with the crossing score all join at the last, partial segment.
        n_tied_below = int(np.count_nonzero(ok_scores[:kth] == crossing_score))

        # Distinct OK thresholds, descending; widths[i] = OK pixels scoring exactly thresholds[i],
        # fp_end[i] = OK pixels scoring >= thresholds[i] (the FP count of curve point i).
        run_starts = np.flatnonzero(np.r_[True, ok_above[1:] != ok_above[:-1]])
        thresholds = ok_above[run_starts][::-1].copy()
        widths = np.diff(np.r_[run_starts, ok_above.size])[::-1].copy()
        widths[-1] += n_tied_below
        del ok_scores, ok_above, run_starts
        fp_end = np.cumsum(widths)

        # A defect pixel is positive at every threshold at or below its score. first_incl: the
        # first curve point whose threshold is <= its score (it is in that point's end value);
        # first_strict: the first whose threshold is < its score (it is already in that point's
        # start value, before the point's OK pixels are added). Both count OK thresholds above.
        defect_scores = scores[self._defect_index]
        ascending = thresholds[::-1]
        n_thresholds = thresholds.size
        first_incl = n_thresholds - np.searchsorted(ascending, defect_scores, side="right")
        first_strict = n_thresholds - np.searchsorted(ascending, defect_scores, side="left")
        del thresholds, ascending, defect_scores

        pro_start = _cumulative_count(first_strict, n_thresholds, self._defect_weight)
        pro_end = _cumulative_count(first_incl, n_thresholds, self._defect_weight)
        for pro in (pro_start, pro_end):
            np.divide(pro, self.n_regions, out=pro)
            np.minimum(pro, 1.0, out=pro)
        au_pro = _area_to_limit(fp_end, widths, pro_start, pro_end, n_ok, fpr_limit)
        del pro_start, pro_end

        # IoU(t) = TP / (TP + FP + FN) = TP / (defect pixels + FP).
        iou_start = _cumulative_count(first_strict, n_thresholds) / (
            self.n_defect_pixels + fp_end - widths
        )
        iou_end = _cumulative_count(first_incl, n_thresholds) / (self.n_defect_pixels + fp_end)
        au_iou = _area_to_limit(fp_end, widths, iou_start, iou_end, n_ok, fpr_limit)
        return au_pro, au_iou


def _area_to_limit(
    fp_end: np.ndarray,
    widths: np.ndarray,
    y_start: np.ndarray,
    y_end: np.ndarray,
    n_ok: int,
    fpr_limit: float,
) -> float:
    """Trapezoid area under a curve up to FPR = fpr_limit, divided by fpr_limit.

    Segment i runs from (FPR, y) = ((fp_end[i] - widths[i]) / n_ok, y_start[i]) to
    (fp_end[i] / n_ok, y_end[i]); the segments tile [0, fp_end[-1] / n_ok] and all but the last
    end within the limit. The last is cut at the limit with y interpolated linearly, as the
    reference trapezoid does. Points that only add defect pixels have zero width and add nothing.
    """
    full = 0.5 * np.dot(y_start[:-1] + y_end[:-1], widths[:-1]) / n_ok
    x0, x1 = (fp_end[-1] - widths[-1]) / n_ok, fp_end[-1] / n_ok
    y0, y1 = y_start[-1], y_end[-1]
    fraction = min((fpr_limit - x0) / (x1 - x0), 1.0)
    y_cut = y0 + (y1 - y0) * fraction
    partial = 0.5 * (y0 + y_cut) * (fraction * (x1 - x0))
    return float((full + partial) / fpr_limit)


def _cumulative_count(
    first_index: np.ndarray, length: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """result[i] = number (or total weight) of items whose first_index <= i, for i < length."""
    counts = np.bincount(first_index, weights=weights, minlength=length + 1)[:length]
    return np.cumsum(counts, dtype=np.float64 if weights is not None else np.int64)


def _smallest_count_above(fpr_limit: float, n_ok: int) -> int:
    """The smallest count c <= n_ok of OK pixels with c / n_ok > fpr_limit (n_ok if none)."""
    count = max(1, math.floor(fpr_limit * n_ok) + 1)
    # The product above can round either way; settle on the float division the curve uses.
    while count > 1 and (count - 1) / n_ok > fpr_limit:
        count -= 1
    while count < n_ok and count / n_ok <= fpr_limit:
        count += 1
    return min(count, n_ok)


def refinement_scores(
    removed_ids: Iterable[str], polluted_ids: Iterable[str]
) -> dict[str, float | int]:
    """Precision, recall and F1 of a refinement, as in section 4.1 of the paper.

    ``removed_ids`` are the training images the refinement removed; ``polluted_ids`` the defective
    images in the (polluted) training set. precision = defective removed / removed; recall =
    defective removed / defective in train; f1 = 2 TP / (2 TP + FP + FN), which equals the
    harmonic mean of precision and recall whenever both are defined. Undefined values are NaN:
    precision when nothing was removed, recall when nothing was polluted, f1 when both sets are
    empty. The counts are returned too.
    """
    removed = _unique_ids(removed_ids, "removed_ids")
    polluted = _unique_ids(polluted_ids, "polluted_ids")
    n_hit = len(removed & polluted)
    n_removed, n_polluted = len(removed), len(polluted)
    denominator_f1 = n_removed + n_polluted
    return {
        "precision": n_hit / n_removed if n_removed else math.nan,
        "recall": n_hit / n_polluted if n_polluted else math.nan,
        "f1": 2 * n_hit / denominator_f1 if denominator_f1 else math.nan,
        "n_removed": n_removed,
        "n_polluted": n_polluted,
        "n_removed_polluted": n_hit,
    }


def _unique_ids(ids: Iterable[str], name: str) -> set[str]:
    if isinstance(ids, str):
        raise TypeError(f"{name} must be a collection of image ids, not the single string {ids!r}")
    ids = list(ids)
    unique = set(ids)
    if len(unique) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{name} lists images more than once: {repeated[:10]}")
    return unique


def _require_finite(values: np.ndarray, what: str) -> None:
    if values.dtype.kind not in "fiub":
        raise ValueError(f"{what} must be real numbers; got dtype {values.dtype}")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(f"{what} hold NaN or infinite values at positions {bad[:10].tolist()}")


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must lie in (0, 1]; got {fpr_limit} (the paper uses 0.3)")
    return fpr_limit


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"a size is (height, width) in positive whole pixels; got {size}")
    return int(size[0]), int(size[1])


def _nearest_taps(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)
