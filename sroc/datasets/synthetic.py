"""Seeded synthetic textures with defects and masks, in MVTec AD layout."""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from sroc.datasets.folders import building_directory, publish_directory, refuse_existing
from sroc.datasets.layout import GOOD, MASK_STEM_SUFFIX, DatasetError


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled Gaussian noise on a (cells+1)^2 grid: smooth, about unit scale."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    t = np.linspace(0.0, cells, size)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    along_x = grid[:, i] * (1 - f) + grid[:, i + 1] * f
    return along_x[i, :] * (1 - f)[:, None] + along_x[i + 1, :] * f[:, None]


def _rotated_coordinates(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, rotated by a small random angle and shifted by a random phase."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    angle = np.deg2rad(rng.uniform(-4.0, 4.0))
    shift = rng.uniform(0.0, size, 2)
    u = np.cos(angle) * x + np.sin(angle) * y + shift[0]
    v = -np.sin(angle) * x + np.cos(angle) * y + shift[1]
    return u, v


def _blend(base: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    return base * (1 - alpha[:, :, None]) + np.asarray(colour, float) * alpha[:, :, None]


def _grid_texture(rng, size, palette) -> np.ndarray:
    """Lines of a square grid, period ~size/8, with a wobble along each line."""
    scale = size / 128
    u, v = _rotated_coordinates(rng, size)
    period = size / 8 * rng.uniform(0.93, 1.07)
    u = u + 1.2 * scale * _smooth_noise(rng, size, 4)
    v = v + 1.2 * scale * _smooth_noise(rng, size, 4)
    half_width = max(0.6, 1.3 * scale)
    distance = np.minimum(np.abs(u % period - period / 2), np.abs(v % period - period / 2))
    lines = np.clip(half_width + 0.5 - distance, 0, 1)
    return _blend(np.broadcast_to(palette[0], (size, size, 3)), palette[1], lines)


def _dot_texture(rng, size, palette) -> np.ndarray:
    """Round dots on a hexagonal lattice, period ~size/9, radii jittered by smooth noise."""
    u, v = _rotated_coordinates(rng, size)
    period = size / 9 * rng.uniform(0.93, 1.07)
    row_height = period * np.sqrt(3) / 2
    nearest_row = np.round(v / row_height)
    distance = np.full((size, size), np.inf)
    for row_offset in (-1, 0, 1):
        row = nearest_row + row_offset
        stagger = (row % 2) * period / 2
        centre_u = np.round((u - stagger) / period) * period + stagger
        distance = np.minimum(distance, np.hypot(u - centre_u, v - row * row_height))
    radius = period * (0.3 + 0.03 * _smooth_noise(rng, size, 5))
    dots = np.clip(radius + 0.5 - distance, 0, 1)
    return _blend(np.broadcast_to(palette[0], (size, size, 3)), palette[1], dots)


def _stripe_texture(rng, size, palette) -> np.ndarray:
    """Wood-like bands, period ~size/6, warped by smooth noise."""
    u, _ = _rotated_coordinates(rng, size)
    period = size / 6 * rng.uniform(0.93, 1.07)
    warped = u + 0.25 * period * _smooth_noise(rng, size, 3)
    bands = 0.5 + 0.5 * np.sin(2 * np.pi * warped / period)
    return _blend(np.broadcast_to(palette[0], (size, size, 3)), palette[1], bands)


SYNTHETIC_TEXTURES = {
    "grid_texture": _grid_texture,
    "dot_texture": _dot_texture,
    "stripe_texture": _stripe_texture,
}


def _polyline_distance(points: np.ndarray, size: int) -> np.ndarray:
    """Distance of every pixel centre to a polyline given by (n, 2) points (x, y)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    pixels = np.stack([x, y], axis=-1)[:, :, None, :]
    start, end = points[:-1], points[1:]
    segment = end - start
    t = np.clip(((pixels - start) * segment).sum(-1) / (segment**2).sum(-1), 0, 1)
    closest = start + t[..., None] * segment
    return np.sqrt(((pixels - closest) ** 2).sum(-1)).min(axis=-1)


def _contrast_colour(texture: np.ndarray, dark, bright):
    return dark if texture.mean() > 110 else bright


def _scratch(rng, texture, defect_scale):
    """A thin, slightly curved line across about a third of the image (``defect_scale`` times
    as wide and, up to 90 % of the image, as long)."""
    size = texture.shape[0]
    scale = size / 128 * defect_scale
    length = min(0.9, rng.uniform(0.3, 0.45) * defect_scale) * size
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    centre = rng.uniform(0.3, 0.7, 2) * size
    s = np.linspace(-0.5, 0.5, 17)[:, None]
    bend = rng.uniform(-0.08, 0.08) * length * (1 - 4 * s**2)
    points = centre + s * length * direction + bend * normal
    half_width = max(0.8, rng.uniform(1.0, 1.6) * scale)
    alpha = np.clip(half_width + 0.5 - _polyline_distance(points, size), 0, 1)
    return alpha, _contrast_colour(texture, (20, 20, 24), (245, 245, 240))


def _blob_alpha(rng, size, radius, edge):
    """A filled blob with a wavy outline; ``edge`` is the width of its soft border in pixels."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    margin = min(radius * 1.4 + 1, size / 2)  # a blob wider than the image is centred
    cx, cy = rng.uniform(margin, size - margin, 2)
    theta = np.arctan2(y - cy, x - cx)
    phases = rng.uniform(0, 2 * np.pi, 2)
    outline = radius * (
        1 + 0.18 * np.sin(3 * theta + phases[0]) + 0.1 * np.sin(5 * theta + phases[1])
    )
    return np.clip((outline - np.hypot(x - cx, y - cy)) / edge + 0.5, 0, 1)


def _spot(rng, texture, defect_scale):
    """An opaque, roughly round blob of 10-18 px diameter at 128 px (times ``defect_scale``)."""
    size = texture.shape[0]
    radius = max(2.0, rng.uniform(5, 9) * size / 128 * defect_scale)
    alpha = _blob_alpha(rng, size, radius, 1.0)
    return alpha, _contrast_colour(texture, (70, 40, 20), (235, 215, 140))


_STAIN_COLOURS = ((210, 40, 30), (30, 70, 210), (40, 170, 60))


def _stain(rng, texture, defect_scale):
    """A large translucent colour stain: the texture shows through, shifted in hue; 20-30 px
    across at 128 px (times ``defect_scale``)."""
    size = texture.shape[0]
    radius = max(3.0, rng.uniform(10, 15) * size / 128 * defect_scale)
    alpha = _blob_alpha(rng, size, radius, 1.5)
    # One of the two stain colours farthest from the texture's mean colour, so it always shows.
    mean = texture.reshape(-1, 3).mean(axis=0)
    candidates = sorted(_STAIN_COLOURS, key=lambda c: -np.linalg.norm(np.subtract(c, mean)))
    return 0.6 * alpha, candidates[rng.integers(2)]


SYNTHETIC_DEFECTS = {"scratch": _scratch, "spot": _spot, "stain": _stain}


def _stable_id(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _palette(seed: int, category: str) -> tuple[np.ndarray, np.ndarray]:
    """Background and pattern colours of a category: dark-on-light or light-on-dark."""
    rng = np.random.default_rng([seed, _stable_id(category)])
    light = rng.uniform(150, 210, 3)
    dark = rng.uniform(40, 100, 3)
    return (light, dark) if rng.random() < 0.5 else (dark, light)


def _texture_of(category: str):
    if category in SYNTHETIC_TEXTURES:
        return SYNTHETIC_TEXTURES[category]
    textures = list(SYNTHETIC_TEXTURES.values())
    return textures[_stable_id(category) % len(textures)]


def _synthetic_image(seed, category, role, index, size, palette, defect_type, defect_scale):
    rng = np.random.default_rng([seed, _stable_id(category), _stable_id(role), index])
    image = _texture_of(category)(rng, size, palette)
    # Per-image illumination and sensor noise, so that no two good images are identical.
    image = image * (1 + 0.05 * _smooth_noise(rng, size, 2))[:, :, None]
    mask = None
    if defect_type is not None:
        alpha, colour = SYNTHETIC_DEFECTS[defect_type](rng, image, defect_scale)
        image = _blend(image, colour, alpha)
        mask = alpha >= 0.5 * alpha.max()
    image = image + rng.normal(0.0, 3.0, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DatasetError(f"synthetic {name}: {value!r}; it must be an integer >= {minimum}.")


def make_synthetic_dataset(
    root: str | os.PathLike,
    categories: Sequence[str] = ("grid_texture", "dot_texture"),
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 30,
    n_test_good: int = 10,
    n_test_per_defect: int = 8,
    defect_types: Sequence[str] = ("scratch", "spot", "stain"),
    defect_scale: float = 1.0,
) -> Path:
    """Write a seeded synthetic dataset in MVTec AD layout at ``root`` and return it.

    Each category is a regular texture with random phase, small rotation, line wobble,
    illumination and noise: ``grid_texture``, ``dot_texture`` and ``stripe_texture`` by name; any
    other name gets one of them chosen by a stable hash of the name. Defect types: ``scratch``
    (thin curved line), ``spot`` (opaque blob) and ``stain`` (translucent colour blob), one per
    defective image, with its 0/255 mask. ``defect_scale`` multiplies the defects' size: at 1 a
    spot covers about 1 % of the image, which global average pooling mostly averages away.
    The same arguments give byte-identical files.
    """
    root = Path(root)
    categories = list(categories)
    defect_types = list(defect_types)
    if (
        not categories
        or len(set(categories)) != len(categories)
        or any(not c or c.startswith(".") or re.search(r"[\\/]", c) for c in categories)
    ):
        raise DatasetError(
            f"synthetic categories {categories!r}: give distinct, non-empty folder names "
            "(no slash, not starting with a dot)."
        )
    unknown = [d for d in defect_types if d not in SYNTHETIC_DEFECTS]
    if unknown or len(set(defect_types)) != len(defect_types):
        raise DatasetError(
            f"synthetic defect_types {defect_types!r}: use distinct names among "
            f"{', '.join(SYNTHETIC_DEFECTS)}."
        )
    _check_count("seed", seed, 0)
    _check_count("image_size", image_size, 16)
    _check_count("n_train", n_train, 1)
    _check_count("n_test_good", n_test_good, 0)
    _check_count("n_test_per_defect", n_test_per_defect, 1 if defect_types else 0)
    numeric = isinstance(defect_scale, int | float) and not isinstance(defect_scale, bool)
    if not numeric or not 0 < defect_scale <= 4:
        raise DatasetError(f"synthetic defect_scale {defect_scale!r}: give a number in (0, 4].")
    refuse_existing(root)
    with building_directory(root) as building:
        for category in categories:
            palette = _palette(seed, category)
            plan = [("train", GOOD, n_train), ("test", GOOD, n_test_good)]
            plan += [("test", d, n_test_per_defect) for d in defect_types]
            for origin, folder, count in plan:
                for index in range(count):
                    defect = None if folder == GOOD else folder
                    image, mask = _synthetic_image(
                        seed,
                        category,
                        f"{origin}/{folder}",
                        index,
                        image_size,
                        palette,
                        defect,
                        defect_scale,
                    )
                    name = f"{index:03d}"
                    _save_png(image, building / category / origin / folder / f"{name}.png")
                    if mask is not None:
                        _save_png(
                            mask.astype(np.uint8) * 255,
                            building
                            / category
                            / "ground_truth"
                            / folder
                            / f"{name}{MASK_STEM_SUFFIX}.png",
                        )
        publish_directory(building, root)
    return root


def _save_png(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
