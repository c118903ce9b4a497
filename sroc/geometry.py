"""Map geometry shared by the detectors' outputs and the evaluation: resize anomaly maps to a
target size (whole or a box of the grid) and smooth them, in one place."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter


def _as_hw(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        size = (int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {size!r}")
    return size


def _bilinear_taps(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel-centre bilinear sampling of ``in_size`` cells at ``out_size`` points: the two
    source cells of each output point and the weight of the second. Output point i samples
    position (i + 0.5) in_size / out_size - 0.5, clamped to the outermost cell centres (torch's
    ``interpolate(..., mode="bilinear", align_corners=False)``)."""
    centres = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    centres = np.clip(centres, 0.0, in_size - 1)
    low = np.floor(centres).astype(np.intp)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (centres - low).astype(np.float32)


def bilinear_resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample the last two axes of ``values`` to ``size`` = (height, width) by bilinear
    interpolation with half-pixel centres (``align_corners=False``, as torch, PaDiM and
    PatchCore), in float32: one axis, then the other, each output a weighted sum of two
    gathered source values (no product matrix, so no BLAS thread count can change a result)."""
    out = np.asarray(values, dtype=np.float32)
    for axis, out_size in ((-2, int(size[0])), (-1, int(size[1]))):
        in_size = out.shape[axis]
        if in_size == out_size:
            continue
        low, high, fraction = _bilinear_taps(out_size, in_size)
        weight = fraction.reshape((-1, 1) if axis == -2 else (-1,))
        resampled = np.take(out, low, axis=axis)
        resampled *= 1.0 - weight
        resampled += np.take(out, high, axis=axis) * weight
        out = resampled
    return out


def resize_maps(
    maps: np.ndarray, out_hw: int | Sequence[int], sigma: float | Sequence[float] = 0.0
) -> np.ndarray:
    """Bilinearly resize anomaly maps, then smooth them with a Gaussian.

    Parameters
    ----------
    maps : array (n, h, w)
    out_hw : int or (height, width) of the output maps.
    sigma : Gaussian standard deviation in *output* pixels, one value or (sigma_y, sigma_x);
        0 disables smoothing. Use :func:`scale_sigma` to convert a sigma stated at the backbone
        input size (PaDiM and PatchCore use 4 px) to the output size.

    Bilinear interpolation uses half-pixel centres (:func:`bilinear_resize`); the Gaussian is
    scipy's ``gaussian_filter`` (mirror borders, truncated at 4 sigma), the filter PaDiM and
    PatchCore apply.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (n, h, w), got {maps.shape}")
    out_hw = _as_hw(out_hw, "out_hw")
    sigma_yx = (float(sigma), float(sigma)) if np.isscalar(sigma) else tuple(map(float, sigma))
    if len(sigma_yx) != 2 or min(sigma_yx) < 0:
        raise ValueError(f"sigma must be >= 0, one value or a (y, x) pair, got {sigma!r}")
    resized = maps.copy() if maps.shape[1:] == out_hw else bilinear_resize(maps, out_hw)
    if max(sigma_yx) > 0:
        resized = gaussian_filter(resized, sigma=(0.0, *sigma_yx), mode="reflect", truncate=4.0)
    return resized


def _bilinear_weights(out_size: int, start: float, stop: float, in_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of half-pixel-centre bilinear sampling of the span
    [start, stop) of ``in_size`` cells: output pixel i samples position
    start + (i + 0.5) (stop - start) / out_size, clamped to the centres of the outermost cells
    that the span touches, so that no cell outside it contributes (over the full span: torch's
    ``interpolate(..., align_corners=False)``)."""
    centres = start + (np.arange(out_size) + 0.5) * (stop - start) / out_size - 0.5
    first = min(max(math.floor(start), 0), in_size - 1)
    last = min(max(math.ceil(stop) - 1, first), in_size - 1)
    centres = np.clip(centres, first, last)
    low = np.floor(centres).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    fraction = centres - low
    weights = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(weights, (rows, low), 1.0 - fraction)
    np.add.at(weights, (rows, high), fraction)
    return weights


def crop_resize_maps(
    maps: np.ndarray,
    box: Sequence[float],
    out_hw: int | Sequence[int],
    sigma: float | Sequence[float] = 0.0,
) -> np.ndarray:
    """Resize the part ``box`` of anomaly maps to ``out_hw`` bilinearly, then smooth.

    ``box`` is (y0, x0, y1, x1) in grid cells, fractional allowed (cell j spans [j, j + 1)):
    e.g. the image region of a padded input (:meth:`sroc.backbones.InputGeometry.grid_box`),
    whose margins of padding are thereby left out. Sampling and smoothing are those of
    :func:`resize_maps`, which this equals (to rounding) for the box (0, 0, h, w).
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (n, h, w), got {maps.shape}")
    y0, x0, y1, x1 = (float(v) for v in box)
    height, width = maps.shape[1:]
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise ValueError(f"box {tuple(box)} is not a non-empty part of the {height}x{width} grid")
    out_h, out_w = _as_hw(out_hw, "out_hw")
    rows = _bilinear_weights(out_h, y0, y1, height)
    cols = _bilinear_weights(out_w, x0, x1, width)
    # Two matrix products: a three-operand einsum loops over every (o, h, w, p) combination,
    # 550 M multiply-adds for a 48 x 48 map to 600 x 400 pixels.
    resized = rows @ maps.astype(np.float64) @ cols.T
    return resize_maps(resized.astype(np.float32), (out_h, out_w), sigma)


def scale_sigma(
    sigma_input_px: float, input_size: int | Sequence[int], out_hw: int | Sequence[int]
) -> tuple[float, float]:
    """Convert a smoothing sigma stated at the backbone input size to output pixels.

    With ``aspect="squash"`` the backbone sees every image resized to ``input_size`` without
    keeping the aspect ratio, so a Gaussian of ``sigma_input_px`` there covers
    ``sigma_input_px * out_h / in_h`` rows and ``sigma_input_px * out_w / in_w`` columns of a
    map of size ``out_hw``: e.g. 4 px at 380 px is (5.05, 5.05) px on a 480x480 ground truth and
    0.505 cells on the 48x48 feature grid.
    For padded or tiled images pass the image's size on the input, (height, width) of its box.
    """
    in_h, in_w = _as_hw(input_size, "input_size")
    out_h, out_w = _as_hw(out_hw, "out_hw")
    return sigma_input_px * out_h / in_h, sigma_input_px * out_w / in_w
