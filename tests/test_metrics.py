"""Metrics against slow, obviously-correct references written here.

Two pixel-metric references: ``loop_reference`` recomputes FPR, PRO and IoU from scratch at every
distinct score (small inputs only); ``full_sort_reference`` is the MVTec AD algorithm as published
(sort every pixel, cumulative sums, last point of each tie run). Both integrate with
``reference_trapezoid``, a transcription of the MVTec AD ``trapezoid``.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from sroc.geometry import resize_maps
from sroc.metrics import (
    PixelGroundTruth,
    average_ranks,
    image_auroc,
    refinement_scores,
    resize_mask_nearest,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


# ---------------------------------------------------------------- references


def reference_trapezoid(x, y, x_max):
    """MVTec AD generic_util.trapezoid: trapezoid rule up to x_max, y interpolated at x_max."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        assert 0 < ins < len(x)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def loop_reference(maps, masks, fpr_limit):
    """One curve point per distinct score, each computed from scratch over every pixel."""
    scores = np.concatenate([np.ravel(m) for m in maps]).astype(np.float64)
    defect = np.concatenate([np.ravel(np.asarray(m) != 0) for m in masks])
    regions = []
    offset = 0
    for mask in masks:
        labelled, n = ndimage.label(np.asarray(mask) != 0, structure=EIGHT_CONNECTED)
        regions += [offset + np.flatnonzero(labelled.ravel() == r) for r in range(1, n + 1)]
        offset += labelled.size
    ok = ~defect
    fprs, pros, ious = [0.0], [0.0], [0.0]
    for threshold in np.unique(scores)[::-1]:
        positive = scores >= threshold
        true_pos = np.sum(positive & defect)
        false_pos = np.sum(positive & ok)
        false_neg = np.sum(~positive & defect)
        fprs.append(false_pos / ok.sum())
        pros.append(np.mean([positive[region].mean() for region in regions]))
        ious.append(true_pos / (true_pos + false_pos + false_neg))
    fprs.append(1.0)
    pros.append(1.0)
    ious.append(defect.sum() / defect.size)
    return (
        reference_trapezoid(fprs, pros, fpr_limit) / fpr_limit,
        reference_trapezoid(fprs, ious, fpr_limit) / fpr_limit,
    )


def full_sort_reference(maps, masks, fpr_limit):
    """The MVTec AD compute_pro as published, plus the IoU curve from the same cumulative sums."""
    fp_change, overlap_change, defect = [], [], []
    n_regions = 0
    for mask in masks:
        labelled, n = ndimage.label(np.asarray(mask) != 0, structure=EIGHT_CONNECTED)
        n_regions += n
        overlap = np.zeros(labelled.shape)
        for r in range(1, n + 1):
            region = labelled == r
            overlap[region] = 1.0 / region.sum()
        fp_change.append((labelled == 0).ravel())
        overlap_change.append(overlap.ravel())
        defect.append((labelled > 0).ravel())
    fp_change = np.concatenate(fp_change)
    overlap_change = np.concatenate(overlap_change)
    defect = np.concatenate(defect)
    scores = np.concatenate([np.ravel(m) for m in maps])
    order = np.argsort(scores)[::-1]
    fps = np.cumsum(fp_change[order], dtype=np.float64)
    fprs = fps / fp_change.sum()
    pros = np.cumsum(overlap_change[order]) / n_regions
    true_pos = np.cumsum(defect[order], dtype=np.float64)
    ious = true_pos / (defect.sum() + fps)
    keep = np.append(np.diff(scores[order]) != 0, True)
    fprs, pros, ious = np.minimum(fprs[keep], 1), np.minimum(pros[keep], 1), ious[keep]
    fprs = np.r_[0, fprs, 1]
    return (
        reference_trapezoid(fprs, np.r_[0, pros, 1], fpr_limit) / fpr_limit,
        reference_trapezoid(fprs, np.r_[0, ious, defect.mean()], fpr_limit) / fpr_limit,
    )


# ---------------------------------------------------------------- inputs


def random_masks(rng, shapes, defect_free_every=3):
    """Blobs of several sizes (some touching only diagonally); every k-th image defect-free."""
    masks = []
    for i, (h, w) in enumerate(shapes):
        mask = np.zeros((h, w), dtype=bool)
        if i % defect_free_every:
            for _ in range(rng.integers(1, 4)):
                r, c = rng.integers(0, h), rng.integers(0, w)
                mask[r : r + rng.integers(1, 5), c : c + rng.integers(1, 5)] = True
            r, c = rng.integers(0, h - 1), rng.integers(0, w - 1)
            mask[r, c] = mask[r + 1, c + 1] = True  # one 8-connected diagonal pair
        masks.append(mask)
    return masks


def synthetic_maps(rng, masks):
    """Blurred defects plus noise: high where the defects are, like a working detector."""
    return [
        (ndimage.gaussian_filter(m.astype(np.float32), 1.5) + 0.3 * rng.random(m.shape)).astype(
            np.float32
        )
        for m in masks
    ]


SHAPES = [(12, 15), (9, 9), (15, 12), (10, 14), (14, 10), (11, 11)]


def make_case(kind, seed):
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, SHAPES)
    if kind == "random":
        maps = [rng.random(m.shape, dtype=np.float32) for m in masks]
    elif kind == "tied":
        # Few distinct values: long tie runs mixing OK and defect pixels.
        maps = [np.floor(rng.random(m.shape) * 6).astype(np.float32) / 6 for m in masks]
    else:
        maps = synthetic_maps(rng, masks)
    return maps, masks


# ---------------------------------------------------------------- AU-PRO / AU-IoU exactness


@pytest.mark.parametrize("kind", ["random", "tied", "synthetic"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.02, 0.77, 1.0])
def test_areas_equal_loop_reference(kind, seed, fpr_limit):
    maps, masks = make_case(kind, seed)
    expected_pro, expected_iou = loop_reference(maps, masks, fpr_limit)
    result = PixelGroundTruth(masks).evaluate(maps, fpr_limit=fpr_limit)
    assert result["au_pro"] == pytest.approx(expected_pro, abs=1e-6)
    assert result["au_iou"] == pytest.approx(expected_iou, abs=1e-6)
    assert result["fpr_limit"] == fpr_limit
    assert result["pixel_resolution"] == "ground_truth"


@pytest.mark.parametrize("kind", ["random", "tied", "synthetic"])
def test_full_sort_reference_agrees_with_loop_reference(kind):
    """The second reference, used below on inputs too large for the loop, is itself checked."""
    maps, masks = make_case(kind, 5)
    assert full_sort_reference(maps, masks, 0.3) == pytest.approx(
        loop_reference(maps, masks, 0.3), abs=1e-9
    )


@pytest.mark.parametrize("levels", [None, 50, 3])
def test_areas_equal_full_sort_reference_on_larger_maps(levels):
    rng = np.random.default_rng(7)
    shapes = [(64, 64)] * 12 + [(40, 72)] * 4
    masks = random_masks(rng, shapes, defect_free_every=4)
    maps = synthetic_maps(rng, masks)
    if levels:
        maps = [np.round(m * levels) / levels for m in maps]
    expected = full_sort_reference(maps, masks, 0.3)
    result = PixelGroundTruth(masks).evaluate(maps)
    assert (result["au_pro"], result["au_iou"]) == pytest.approx(expected, abs=1e-6)


def test_limit_landing_exactly_on_a_curve_point():
    """1000 OK pixels with distinct scores: FPR 0.3 is a sample point, no interpolation."""
    mask = np.zeros((40, 50), dtype=bool)
    mask[:10] = True
    mask[12:22] = True
    assert np.count_nonzero(~mask) == 1000
    rng = np.random.default_rng(3)
    maps = [rng.permutation(mask.size).reshape(mask.shape).astype(np.float64)]
    expected = loop_reference(maps, [mask], 0.3)
    result = PixelGroundTruth([mask]).evaluate(maps)
    assert (result["au_pro"], result["au_iou"]) == pytest.approx(expected, abs=1e-9)


def test_maps_as_one_array_equal_maps_as_list():
    rng = np.random.default_rng(2)
    masks = np.stack(random_masks(rng, [(10, 10)] * 5))
    maps = np.stack(synthetic_maps(rng, masks))
    ground_truth = PixelGroundTruth(masks)
    assert ground_truth.evaluate(maps) == ground_truth.evaluate(list(maps))


def test_ground_truth_is_reused_across_evaluations():
    maps, masks = make_case("synthetic", 4)
    ground_truth = PixelGroundTruth(masks)
    for seed in range(3):
        shuffled = [
            np.random.default_rng(seed).permutation(m.ravel()).reshape(m.shape) for m in maps
        ]
        expected = loop_reference(shuffled, masks, 0.3)
        result = ground_truth.evaluate(shuffled)
        assert (result["au_pro"], result["au_iou"]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kind", ["random", "tied", "synthetic"])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05])
def test_defective_images_without_a_mask_are_left_out(kind, fpr_limit):
    """Issue 14 item 7: the reference simply drops the excluded images' maps and masks."""
    maps, masks = make_case(kind, 5)
    # Two defective images lose their masks; a detector scores them high, as they are defective.
    excluded = np.zeros(len(masks), dtype=bool)
    excluded[[1, 4]] = True
    assert all(masks[i].any() for i in (1, 4))
    maps = [m + 2.0 * out for m, out in zip(maps, excluded, strict=True)]
    kept = np.flatnonzero(~excluded)
    expected = loop_reference([maps[i] for i in kept], [masks[i] for i in kept], fpr_limit)
    ground_truth = PixelGroundTruth(masks, excluded=excluded)
    result = ground_truth.evaluate(maps, fpr_limit=fpr_limit)
    assert (result["au_pro"], result["au_iou"]) == pytest.approx(expected, abs=1e-12)
    # Counted as defect-free instead (the old behaviour), their hot pixels are false positives.
    blank = [np.zeros_like(m) if out else m for m, out in zip(masks, excluded, strict=True)]
    as_good = PixelGroundTruth(blank).evaluate(maps, fpr_limit=fpr_limit)
    assert as_good["au_pro"] < result["au_pro"]


def test_excluded_images_with_maps_as_one_array():
    rng = np.random.default_rng(3)
    masks = np.stack(random_masks(rng, [(10, 10)] * 5, defect_free_every=99))
    maps = np.stack(synthetic_maps(rng, masks))
    excluded = np.array([False, True, False, False, True])
    ground_truth = PixelGroundTruth(masks, excluded=excluded)
    assert ground_truth.evaluate(maps) == ground_truth.evaluate(list(maps))
    assert ground_truth.evaluate(maps) == PixelGroundTruth(masks[~excluded]).evaluate(
        maps[~excluded]
    )
    with pytest.raises(ValueError, match="anomaly map 1 has shape"):
        ground_truth.evaluate([maps[0], maps[1][:5], *maps[2:]])


def test_every_defective_image_excluded_gives_missing_metrics(caplog):
    masks = [np.zeros((4, 4), bool), np.eye(4, dtype=bool)]
    ground_truth = PixelGroundTruth(masks, excluded=[False, True])
    with caplog.at_level(logging.WARNING, logger="sroc.metrics"):
        result = ground_truth.evaluate(np.random.default_rng(0).random((2, 4, 4)))
    assert math.isnan(result["au_pro"]) and math.isnan(result["au_iou"])
    assert "pixel metrics undefined: the 1 test masks used" in caplog.text
    everything = PixelGroundTruth(masks, excluded=[True, True])
    assert math.isnan(everything.evaluate([np.ones((4, 4))] * 2)["au_pro"])
    with pytest.raises(ValueError, match="excluded must hold one boolean per mask"):
        PixelGroundTruth(masks, excluded=[1, 0])


# ---------------------------------------------------------------- hand cases


def test_perfect_maps_give_au_pro_one():
    maps, masks = make_case("random", 0)
    perfect = [m.astype(np.float32) for m in masks]
    result = PixelGroundTruth(masks).evaluate(perfect)
    assert result["au_pro"] == pytest.approx(1.0, abs=1e-12)
    # The IoU curve falls from 1 at FPR 0 to |GT|/N at FPR 1 across the single tie run of the
    # OK pixels: at the limit it is 1 - 0.3 (1 - |GT|/N); the trapezoid halves the drop.
    defect_fraction = np.mean(np.concatenate([m.ravel() for m in masks]))
    assert result["au_iou"] == pytest.approx(1 - 0.15 * (1 - defect_fraction), abs=1e-12)


def test_constant_map_gives_au_pro_0_15():
    maps, masks = make_case("random", 1)
    constant = [np.full(m.shape, 0.5, np.float32) for m in masks]
    result = PixelGroundTruth(masks).evaluate(constant)
    assert result["au_pro"] == pytest.approx(0.15, abs=1e-12)
    defect_fraction = np.mean(np.concatenate([m.ravel() for m in masks]))
    assert result["au_iou"] == pytest.approx(0.15 * defect_fraction, abs=1e-12)


def test_iid_random_maps_give_about_0_15():
    rng = np.random.default_rng(11)
    masks = random_masks(rng, [(128, 128)] * 20)
    maps = rng.random((20, 128, 128), dtype=np.float32)
    assert PixelGroundTruth(masks).evaluate(maps)["au_pro"] == pytest.approx(0.15, abs=0.01)


def test_defect_free_images_only_move_the_fpr():
    """A defect-free image scoring above every defect delays the PRO curve by its OK share."""
    rng = np.random.default_rng(2)
    masks = random_masks(rng, [(20, 20)] * 4, defect_free_every=99)
    perfect = [m.astype(np.float32) for m in masks]
    empty_mask = np.zeros((10, 20), dtype=bool)
    n_ok = sum(np.count_nonzero(~m) for m in masks) + empty_mask.size
    share = empty_mask.size / n_ok
    assert share < 0.3
    hot = np.full(empty_mask.shape, 2.0, np.float32)
    result = PixelGroundTruth(masks + [empty_mask]).evaluate(perfect + [hot])
    assert result["au_pro"] == pytest.approx((0.3 - share) / 0.3, abs=1e-12)
    # Scoring it below every defect instead changes nothing.
    cold = np.zeros(empty_mask.shape, np.float32)
    result = PixelGroundTruth(masks + [empty_mask]).evaluate(perfect + [cold])
    assert result["au_pro"] == pytest.approx(1.0, abs=1e-12)


def test_regions_are_eight_connected():
    """Two diagonal pixels form one region: PRO weights them 1/2 each, not 1 each."""
    mask = np.zeros((6, 6), dtype=bool)
    mask[1, 1] = mask[2, 2] = True  # one region of two
    mask[4, 4] = True  # a second region
    ground_truth = PixelGroundTruth([mask])
    assert ground_truth.n_regions == 2
    # Only (1, 1) and (4, 4) score high: PRO jumps to (1/2 + 1) / 2 = 0.75 at FPR 0.
    score_map = np.zeros((6, 6))
    score_map[1, 1] = score_map[4, 4] = 1.0
    # Then the diagonal partner joins in the tie run of every other pixel at 0: PRO rises
    # linearly from 0.75 to 1 over FPR 0 -> 1, so at 0.3 it is 0.825.
    expected = 0.5 * (0.75 + 0.825)
    assert ground_truth.evaluate([score_map])["au_pro"] == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- resolution


@pytest.mark.parametrize(
    "in_shape, out_shape", [((100, 60), (48, 48)), ((7, 9), (20, 31)), ((5, 5), (5, 5))]
)
def test_resize_mask_nearest_matches_torch_nearest_exact(in_shape, out_shape):
    torch = pytest.importorskip("torch")
    mask = np.random.default_rng(1).random(in_shape) < 0.3
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(mask.astype(np.float32))[None, None], size=out_shape, mode="nearest-exact"
    )[0, 0].numpy()
    resized = resize_mask_nearest(mask, out_shape)
    assert resized.dtype == bool
    np.testing.assert_array_equal(resized, expected > 0.5)


def test_fixed_resolution_resizes_masks_by_nearest_neighbour():
    rng = np.random.default_rng(4)
    masks = random_masks(rng, [(30, 40), (25, 25), (40, 30)])
    ground_truth = PixelGroundTruth(masks, resolution=(16, 16))
    assert ground_truth.shapes == [(16, 16)] * 3
    maps = rng.random((3, 16, 16), dtype=np.float32)
    resized_masks = [resize_mask_nearest(m, (16, 16)) for m in masks]
    result = ground_truth.evaluate(maps)
    expected = loop_reference(maps, resized_masks, 0.3)
    assert (result["au_pro"], result["au_iou"]) == pytest.approx(expected, abs=1e-6)
    assert result["pixel_resolution"] == "16x16"


# ---------------------------------------------------------------- bad input


def test_map_and_mask_of_different_shapes_is_an_error():
    ground_truth = PixelGroundTruth([np.zeros((8, 8), bool), np.ones((6, 9), bool)])
    with pytest.raises(ValueError, match=r"anomaly map 1 has shape \(6, 8\).*\(6, 9\).*resize"):
        ground_truth.evaluate([np.zeros((8, 8)), np.zeros((6, 8))])
    with pytest.raises(ValueError, match="got 1 anomaly maps for 2"):
        ground_truth.evaluate([np.zeros((8, 8))])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_an_error(bad):
    ground_truth = PixelGroundTruth([np.zeros((4, 4), bool), np.eye(4, dtype=bool)])
    maps = np.zeros((2, 4, 4))
    maps[1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"anomaly maps \[1\] hold NaN or infinite"):
        ground_truth.evaluate(maps)


def test_no_defective_pixels_gives_missing_metrics_and_a_warning(caplog):
    ground_truth = PixelGroundTruth([np.zeros((4, 4), bool)] * 3)
    with caplog.at_level(logging.WARNING, logger="sroc.metrics"):
        result = ground_truth.evaluate(np.random.default_rng(0).random((3, 4, 4)))
    assert math.isnan(result["au_pro"]) and math.isnan(result["au_iou"])
    assert "pixel metrics undefined" in caplog.text


@pytest.mark.parametrize("limit", [0, -0.1, 1.5, np.nan])
def test_fpr_limit_outside_unit_interval_is_an_error(limit):
    ground_truth = PixelGroundTruth([np.eye(4, dtype=bool)])
    with pytest.raises(ValueError, match="fpr_limit"):
        ground_truth.evaluate([np.zeros((4, 4))], fpr_limit=limit)


# ---------------------------------------------------------------- image AUROC


def pairwise_auroc(labels, scores):
    """Probability that a defective image outscores a good one, ties counting one half."""
    good = scores[labels == 0]
    defective = scores[labels == 1]
    wins = sum((d > g) + 0.5 * (d == g) for d in defective for g in good)
    return wins / (len(good) * len(defective))


@pytest.mark.parametrize("seed", range(3))
def test_image_auroc_equals_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(labels, 1.0), 1)  # rounding makes ties
    assert image_auroc(labels, scores) == pytest.approx(pairwise_auroc(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_equals_scikit_learn_with_ties(seed):
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    labels[:2] = (0, 1)
    scores = rng.integers(0, 6, 200).astype(float) if seed % 2 else rng.normal(labels, 1.0)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert np.array_equal(average_ranks(scores), rankdata(scores))


def test_image_auroc_changes_when_scores_are_clamped():
    """Why scores are never clamped first: clamping ties distinct scores."""
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.5, 1.2, 2.0, 3.0])
    assert image_auroc(labels, scores) == 1.0
    assert image_auroc(labels, np.minimum(scores, 1.0)) == 0.75


@pytest.mark.parametrize(
    "labels, scores, message",
    [
        ([0, 1, 1], [0.1, np.nan, 0.3], "NaN or infinite"),
        ([0, 0, 0], [0.1, 0.2, 0.3], "good and defective"),
        ([0, 2, 1], [0.1, 0.2, 0.3], "must be 0"),
        ([0, 1], [0.1, 0.2, 0.3], "equal length"),
    ],
)
def test_image_auroc_bad_input(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        image_auroc(labels, scores)


# ---------------------------------------------------------------- refinement scores


def test_refinement_scores_by_hand():
    scores = refinement_scores(["a", "b", "c"], ["b", "c", "d", "e"])
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4)
    harmonic = 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)
    assert scores["f1"] == pytest.approx(harmonic)
    assert (scores["n_removed"], scores["n_polluted"], scores["n_removed_polluted"]) == (3, 4, 2)


def test_refinement_f1_equals_harmonic_mean_on_every_small_case():
    universe = ["a", "b", "c", "d"]
    subsets = [list(c) for k in range(1, 5) for c in combinations(universe, k)]
    for removed in subsets:
        for polluted in subsets:
            scores = refinement_scores(removed, polluted)
            p, r = scores["precision"], scores["recall"]
            assert scores["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)


def test_refinement_edge_cases():
    nothing_removed = refinement_scores([], ["a", "b"])
    assert math.isnan(nothing_removed["precision"])
    assert nothing_removed["recall"] == 0 and nothing_removed["f1"] == 0
    nothing_polluted = refinement_scores(["a"], [])
    assert math.isnan(nothing_polluted["recall"])
    assert nothing_polluted["precision"] == 0 and nothing_polluted["f1"] == 0
    neither = refinement_scores([], [])
    assert all(math.isnan(neither[k]) for k in ("precision", "recall", "f1"))


def test_refinement_bad_input():
    with pytest.raises(ValueError, match="more than once.*'a'"):
        refinement_scores(["a", "a"], ["a"])
    with pytest.raises(TypeError, match="single string"):
        refinement_scores("train/good/000", ["a"])


# ---------------------------------------------------------------- mask files


def test_from_mask_paths_reads_masks_and_fills_defect_free_images(tmp_path):
    pytest.importorskip("sroc.datasets.layout")
    mask = np.zeros((9, 12), dtype=np.uint8)
    mask[2:4, 3:8] = 255
    mask_path = tmp_path / "000_mask.png"
    Image.fromarray(mask).save(mask_path)
    ground_truth = PixelGroundTruth.from_mask_paths(
        [str(mask_path), ""], [(9, 12), (5, 7)], labels=[1, 0]
    )
    assert ground_truth.shapes == [(9, 12), (5, 7)]
    assert ground_truth.n_defect_pixels == 10 and ground_truth.n_regions == 1
    assert ground_truth.n_ok_pixels == 9 * 12 - 10 + 5 * 7 and ground_truth.n_excluded == 0
    with pytest.raises(ValueError, match="9x12"):
        PixelGroundTruth.from_mask_paths([str(mask_path)], [(9, 13)], labels=[1])


def test_from_mask_paths_excludes_defective_images_without_a_mask(tmp_path, caplog):
    mask = np.zeros((9, 12), dtype=np.uint8)
    mask[2:4, 3:8] = 255
    mask_path = tmp_path / "000_mask.png"
    Image.fromarray(mask).save(mask_path)
    with caplog.at_level(logging.WARNING, logger="sroc.metrics"):
        ground_truth = PixelGroundTruth.from_mask_paths(
            [str(mask_path), "", ""], [(9, 12), (6, 6), (5, 7)], labels=[1, 1, 0]
        )
    assert "1 of 3 test images are defective but have no mask" in caplog.text
    assert ground_truth.excluded.tolist() == [False, True, False]
    assert ground_truth.shapes == [(9, 12), (6, 6), (5, 7)]  # the excluded map's shape is kept
    assert ground_truth.n_ok_pixels == 9 * 12 - 10 + 5 * 7
    with pytest.raises(ValueError, match="2 mask paths, 2 image sizes and 1 labels"):
        PixelGroundTruth.from_mask_paths(["", ""], [(5, 5), (5, 5)], labels=[0])


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is absent")
@pytest.mark.parametrize("category", ["piped/PA_BDP01_TL", "magnetic_tile/magnetic_tile"])
def test_real_masks_with_upsampled_maps_equal_full_sort_reference(category):
    """Real masks (varying sizes, tiny regions, empty masks) and detector-like low-res maps."""
    root = SHARED_DATA / category
    mask_files = sorted((root / "ground_truth").rglob("*_mask.png"))[:12]
    masks = [np.asarray(Image.open(f).convert("L")) > 127 for f in mask_files]
    good_files = sorted((root / "test" / "good").iterdir())[:6]
    masks += [np.zeros(Image.open(f).size[::-1], dtype=bool) for f in good_files]
    rng = np.random.default_rng(0)
    low_res = [
        resize_maps(m[None].astype(np.float32), 12)[0] + rng.random((12, 12), dtype=np.float32)
        for m in masks
    ]
    ground_truth = PixelGroundTruth(masks)
    maps = [resize_maps(m[None], mask.shape)[0] for m, mask in zip(low_res, masks, strict=True)]
    expected = full_sort_reference(maps, masks, 0.3)
    result = ground_truth.evaluate(maps)
    assert (result["au_pro"], result["au_iou"]) == pytest.approx(expected, abs=1e-6)
