"""Time AU-PRO: sroc.metrics.PixelGroundTruth against the MVTec AD reference algorithm.

The baseline is a straightforward transcription of the reference (pro_curve_util.compute_pro and
trapezoid): it labels the ground-truth regions, sorts every pixel score, takes cumulative sums and
keeps the last point of each tie run. It labels inside the timed region, as the reference does.
PixelGroundTruth is built OUTSIDE the timed region, because the workflow labels each test set once
and reuses it for every detector, seed and ratio; its build time is printed separately, with the
speed-up that includes it. The fast path computes AU-IoU as well, the baseline only AU-PRO.

Both run on the same synthetic maps: bilinear upsamplings of low-resolution noise plus defect
signal, like detector output, so nearly every pixel score is distinct. The two results must agree
to 1e-6 or the script exits with status 1. The last line is ``au_pro_speedup: <x>``.

    python benchmarks/metrics.py --n-maps 100 --size 1024
    python benchmarks/metrics.py --quick    # 8 maps of 128x128, seconds: checks it still runs
"""

from __future__ import annotations

import argparse
import sys
import time
from bisect import bisect

import numpy as np
from scipy import ndimage

from sroc.geometry import resize_maps
from sroc.metrics import PixelGroundTruth

DETECTOR_GRID = 48  # the finest feature grid of the default backbone


def synthetic_test_set(n_maps: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks with a few elliptic defects on every other image, and detector-like maps."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_maps, size, size), dtype=bool)
    maps = np.empty((n_maps, size, size), dtype=np.float32)
    rows, cols = np.ogrid[:size, :size]
    for i in range(n_maps):
        if i % 2:
            for _ in range(rng.integers(1, 5)):
                r, c = rng.integers(0, size, 2)
                radius_r, radius_c = rng.uniform(0.005, 0.08, 2) * size
                masks[i] |= ((rows - r) / radius_r) ** 2 + ((cols - c) / radius_c) ** 2 <= 1
        signal = resize_maps(masks[i][None].astype(np.float32), DETECTOR_GRID)[0]
        low_res = 1.5 * signal + rng.random((DETECTOR_GRID, DETECTOR_GRID), dtype=np.float32)
        maps[i] = resize_maps(low_res[None], size)[0]
    return maps, masks


def reference_au_pro(
    anomaly_maps: np.ndarray, ground_truth_maps: np.ndarray, limit: float
) -> float:
    """The MVTec AD compute_pro + trapezoid, with float64 cumulative sums."""
    structure = np.ones((3, 3), dtype=int)
    shape = anomaly_maps.shape
    fp_changes = np.zeros(shape, dtype=np.uint32)
    pro_changes = np.zeros(shape, dtype=np.float64)
    num_ok_pixels = 0
    num_gt_regions = 0
    for index, gt_map in enumerate(ground_truth_maps):
        labeled, n_components = ndimage.label(gt_map, structure)
        num_gt_regions += n_components
        ok_mask = labeled == 0
        num_ok_pixels += np.sum(ok_mask)
        fp_changes[index][ok_mask] = 1
        for k in range(n_components):
            region_mask = labeled == (k + 1)
            pro_changes[index][region_mask] = 1.0 / np.sum(region_mask)

    scores = np.array(anomaly_maps).ravel()
    order = np.argsort(scores).astype(np.uint32)[::-1]
    scores = np.take(scores, order)
    fprs = np.cumsum(np.take(fp_changes.ravel(), order), dtype=np.float64) / num_ok_pixels
    del fp_changes
    pros = np.cumsum(np.take(pro_changes.ravel(), order)) / num_gt_regions
    del pro_changes, order
    keep = np.append(np.diff(scores) != 0, np.True_)
    fprs = np.clip(fprs[keep], None, 1.0)
    pros = np.clip(pros[keep], None, 1.0)
    fprs = np.concatenate(([0.0], fprs, [1.0]))
    pros = np.concatenate(([0.0], pros, [1.0]))
    return trapezoid(fprs, pros, limit) / limit


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def best_time(function, repeats: int):
    """Smallest wall time over repeats (the least disturbed by other processes) and the result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-maps", type=int, default=100, help="test images (default 100)")
    parser.add_argument("--size", type=int, default=1024, help="map side in pixels (default 1024)")
    parser.add_argument("--fpr-limit", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each; best is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="8 maps of 128x128: checks it runs, in seconds"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n_maps, args.size = 8, 128

    maps, masks = synthetic_test_set(args.n_maps, args.size, args.seed)
    print(f"maps: {args.n_maps} x {args.size}x{args.size} float32 = {maps.size:,} pixels")
    print(f"defect pixels: {masks.mean():.2%}; distinct scores: {np.unique(maps).size:,}")

    build_s, ground_truth = best_time(lambda: PixelGroundTruth(masks), 1)
    print(f"PixelGroundTruth built once, outside the timed region: {build_s:.2f} s")
    print(f"regions: {ground_truth.n_regions}")

    fast_s, result = best_time(lambda: ground_truth.evaluate(maps, args.fpr_limit), args.repeats)
    print(f"fast AU-PRO: {result['au_pro']:.12f}  AU-IoU: {result['au_iou']:.12f}  {fast_s:.2f} s")
    baseline_s, expected = best_time(
        lambda: reference_au_pro(maps, masks, args.fpr_limit), args.repeats
    )
    print(f"baseline AU-PRO: {expected:.12f}  {baseline_s:.2f} s (labels inside)")
    difference = abs(result["au_pro"] - expected)
    print(f"absolute difference: {difference:.3e}")
    print(f"speedup including the one-off labelling: {baseline_s / (fast_s + build_s):.2f}")
    print(f"au_pro_speedup: {baseline_s / fast_s:.2f}")
    return 0 if difference <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
