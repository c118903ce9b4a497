"""Detectors against independent brute-force references (loops, scikit-learn, torch autograd)."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf

from sroc import detectors
from sroc.detectors import (
    DETECTORS,
    BaseDetector,
    KNNDetector,
    MahalanobisDetector,
    NotFittedError,
    PaDiMDetector,
    estimate_memory_mb,
    ledoit_wolf,
    make_detector,
    validate_params,
)
from sroc.detectors.base import upsample_maps
from sroc.geometry import bilinear_resize, crop_resize_maps, resize_maps, scale_sigma

RTOL = 1e-5
STAGES = {"s1": (6, 8, 8), "s2": (10, 4, 4), "s3": (12, 2, 2)}


def random_features(n: int, seed: int, shapes=STAGES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Per-channel offsets and scales make the covariances anisotropic, as real features are.
    return {
        name: (
            rng.normal(size=(1, c, 1, 1))
            + rng.uniform(0.5, 2.0, (1, c, 1, 1)) * rng.normal(size=(n, c, h, w))
        ).astype(np.float32)
        for name, (c, h, w) in shapes.items()
    }


@pytest.fixture(scope="module")
def train():
    return random_features(12, seed=1)


@pytest.fixture(scope="module")
def test():
    return random_features(5, seed=2)


# ---------------------------------------------------------------------------------------------
# Brute-force references
# ---------------------------------------------------------------------------------------------


def ref_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres, one output pixel at a time."""
    in_h, in_w = image.shape
    out = np.zeros((out_h, out_w))

    def source(o, n_in, n_out):
        s = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(s)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), s - i0

    for y in range(out_h):
        y0, y1, wy = source(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, wx = source(x, in_w, out_w)
            top = (1 - wx) * image[y0, x0] + wx * image[y0, x1]
            bottom = (1 - wx) * image[y1, x0] + wx * image[y1, x1]
            out[y, x] = (1 - wy) * top + wy * bottom
    return out


def ref_gaussian(image: np.ndarray, sigma_y: float, sigma_x: float) -> np.ndarray:
    """Separable Gaussian, mirror borders (d c b a | a b c d), kernel cut at 4 sigma."""
    out = image.astype(np.float64)
    for axis, sigma in ((0, sigma_y), (1, sigma_x)):
        radius = int(4.0 * sigma + 0.5)
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        taps /= taps.sum()
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        smoothed = np.zeros_like(out)
        for offset, tap in enumerate(taps):
            window = [slice(None), slice(None)]
            window[axis] = slice(offset, offset + out.shape[axis])
            smoothed += tap * padded[tuple(window)]
        out = smoothed
    return out


def ref_nearest(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Replicate each cell of (n, C, h, w) into an integer block."""
    return np.repeat(
        np.repeat(maps, height // maps.shape[2], axis=2), width // maps.shape[3], axis=3
    )


def ref_bilinear_stack(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    if maps.shape[2:] == (height, width):
        return maps.astype(np.float64)
    return np.array([[ref_bilinear(m, height, width) for m in image] for image in maps])


def ref_average_3x3(maps: np.ndarray) -> np.ndarray:
    """3x3 mean with zero padding, padded cells counted: the mean of nine shifted copies."""
    padded = np.pad(maps.astype(np.float64), [(0, 0), (0, 0), (1, 1), (1, 1)])
    h, w = maps.shape[2:]
    return sum(padded[:, :, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9


def ref_adaptive_pool(vectors: np.ndarray, size: int) -> np.ndarray:
    dim = vectors.shape[1]
    out = np.zeros((vectors.shape[0], size))
    for i in range(size):
        start, stop = (i * dim) // size, -((-(i + 1) * dim) // size)
        out[:, i] = vectors[:, start:stop].mean(axis=1)
    return out


def ref_gap(features, stages):
    return np.concatenate([features[s].astype(np.float64).mean(axis=(2, 3)) for s in stages], 1)


def ref_patches(aligned: np.ndarray) -> np.ndarray:
    """(n, D, H, W) -> (n, H*W, D) float64."""
    n, d = aligned.shape[:2]
    return aligned.reshape(n, d, -1).transpose(0, 2, 1).astype(np.float64)


def pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances from direct differences, in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def metric_of(distances: np.ndarray, metric: str) -> np.ndarray:
    return distances if metric == "euclidean" else distances**2


def assert_close(actual, expected, rtol=RTOL, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# Map post-processing and shared pieces
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The numpy kernels that replaced torch's, against torch itself
# ---------------------------------------------------------------------------------------------


def test_importing_the_detectors_loads_neither_torch_nor_scikit_learn():
    """Grid jobs import these modules; torch and scikit-learn cost them 3 s and 500 MB."""
    code = (
        "import sys; import sroc.detectors, sroc.evaluation, sroc.metrics, sroc.geometry; "
        "print(sorted({'torch', 'sklearn', 'faiss'} & set(sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("script", ["rank.py", "refine.py"])
def test_a_grid_jobs_imports_load_neither_torch_nor_scikit_learn(script):
    """The imports of the grid's scripts, read from the scripts themselves, in a fresh process:
    a grid job must not pay torch's and scikit-learn's import (3.5 s and 830 MB before)."""
    import ast

    repo = Path(__file__).resolve().parents[1]
    tree = ast.parse((repo / "scripts" / script).read_text())
    # Every import, the conditional ones too (a refine job that computes imports the library).
    imports = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
    ]
    assert any("sroc" in line for line in imports)
    code = "; ".join(
        ["import sys", *imports, "print(sorted({'torch', 'sklearn', 'faiss'} & set(sys.modules)))"]
    )
    # Snakemake runs a script with its folder importable (scripts/staged_refits.py).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "scripts")])}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "in_hw, out_hw", [((6, 4), (12, 8)), ((5, 7), (13, 9)), ((8, 8), (3, 5)), ((4, 4), (4, 9))]
)
def test_bilinear_resize_equals_torch_interpolate(in_hw, out_hw):
    maps = np.random.default_rng(0).normal(size=(2, 3, *in_hw)).astype(np.float32)
    expected = F.interpolate(
        torch.from_numpy(maps), size=out_hw, mode="bilinear", align_corners=False
    ).numpy()
    np.testing.assert_allclose(bilinear_resize(maps, out_hw), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        upsample_maps(maps, out_hw, "bilinear"), expected, rtol=1e-6, atol=1e-6
    )


def test_nearest_upsampling_equals_torch_on_integer_strides():
    maps = np.random.default_rng(1).normal(size=(2, 3, 6, 4)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(maps), size=(24, 8), mode="nearest").numpy()
    assert np.array_equal(upsample_maps(maps, (24, 8), "nearest"), expected)


@pytest.mark.parametrize("n, size", [(12, 4), (10, 4), (7, 7), (5, 12), (3, 8), (376, 100)])
def test_adaptive_average_pool_equals_torch(n, size):
    rng = np.random.default_rng(n)
    vectors = rng.normal(size=(6, n)).astype(np.float32)
    expected = F.adaptive_avg_pool1d(torch.from_numpy(vectors)[:, None], size)[:, 0].numpy()
    pooled = detectors.base.adaptive_average_pool(vectors, size, axis=1)
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)
    maps = rng.normal(size=(2, 3, n, n + 3)).astype(np.float32)
    grid = (size, max(1, size - 1))
    expected = F.adaptive_avg_pool2d(torch.from_numpy(maps), grid).numpy()
    pooled = detectors.base.adaptive_average_pool(
        detectors.base.adaptive_average_pool(maps, grid[0], axis=-2), grid[1], axis=-1
    )
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [3, 5])
def test_local_average_equals_torch_avg_pool(size):
    maps = np.random.default_rng(size).normal(size=(2, 4, 7, 6)).astype(np.float32)
    expected = F.avg_pool2d(
        torch.from_numpy(maps), size, stride=1, padding=size // 2, count_include_pad=True
    ).numpy()
    actual = detectors.patchcore.local_average(maps, size)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def test_triangular_and_cholesky_kernels_equal_torch():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(4, 6, 6))
    cov = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(6)
    centred = rng.normal(size=(4, 9, 6))
    chol = detectors.cholesky_factors(cov, "test")
    np.testing.assert_allclose(chol, torch.linalg.cholesky(torch.from_numpy(cov)).numpy())
    expected = torch.linalg.solve_triangular(
        torch.from_numpy(chol), torch.from_numpy(centred).mT, upper=False
    ).mT.numpy()
    np.testing.assert_allclose(detectors.whiten(chol, centred), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="singular"):
        detectors.cholesky_factors(np.zeros((2, 3, 3)), "test")


def test_detectors_have_scikit_learn_parameters():
    """get_params/set_params/clone/repr as scikit-learn's BaseEstimator, without it."""
    from sklearn.base import clone

    detector = make_detector("knn", n_neighbors=3, stages=["s1"])
    assert detector.get_params() == {
        **KNNDetector().get_params(),
        "n_neighbors": 3,
        "stages": ["s1"],
    }
    assert repr(detector) == "KNNDetector(n_neighbors=3, stages=['s1'])"
    copy = clone(detector)
    assert copy is not detector and copy.get_params() == detector.get_params()
    assert (
        detector.set_params(metric="sqeuclidean") is detector and detector.metric == "sqeuclidean"
    )
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['k'\]"):
        detector.set_params(k=2)


def test_resize_maps_matches_bilinear_then_gaussian_reference():
    maps = np.random.default_rng(0).random((2, 6, 5)).astype(np.float32)
    out = resize_maps(maps, (15, 11), sigma=(1.5, 0.8))
    expected = [ref_gaussian(ref_bilinear(m, 15, 11), 1.5, 0.8) for m in maps]
    assert out.shape == (2, 15, 11) and out.dtype == np.float32
    assert_close(out, np.array(expected))
    assert_close(resize_maps(maps, 9, 0.0), np.array([ref_bilinear(m, 9, 9) for m in maps]))


def test_scale_sigma_follows_the_resize_of_each_axis():
    assert scale_sigma(4.0, 380, (480, 190)) == pytest.approx((4.0 * 480 / 380, 2.0))
    assert scale_sigma(4.0, 380, 48) == pytest.approx((4.0 * 48 / 380,) * 2)


def test_crop_resize_maps_leaves_out_what_lies_outside_the_box():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 8, 8)).astype(np.float32)
    # The whole grid: plain resize_maps.
    assert_close(
        crop_resize_maps(maps, (0, 0, 8, 8), (15, 11), 1.2), resize_maps(maps, (15, 11), 1.2)
    )
    # Rows 0-1 and 6-7 are padding (a constant far above the map): none of it comes through.
    padded = maps.copy()
    padded[:, :2] = padded[:, 6:] = 100.0
    cropped = crop_resize_maps(padded, (2, 0, 6, 8), (9, 20), (0.7, 1.1))
    assert cropped.max() < 1.0
    assert_close(cropped, resize_maps(maps[:, 2:6], (9, 20), (0.7, 1.1)))
    assert_close(
        crop_resize_maps(maps, (1, 3, 7, 5), (12, 4)),
        np.array([ref_bilinear(m[1:7, 3:5], 12, 4) for m in maps]),
    )
    with pytest.raises(ValueError, match="box"):
        crop_resize_maps(maps, (0, 0, 9, 8), 4)


def test_evaluation_resizes_maps_in_the_images_geometry():
    from sroc.evaluation import SMOOTHING_SIGMA_INPUT_PX, TestEvaluation

    sigma = SMOOTHING_SIGMA_INPUT_PX
    test = pd.DataFrame(
        {"image_id": ["a", "b"], "label": [0, 1], "mask_path": ["", ""], "path": ["a", "b"]}
    )
    grid = np.random.default_rng(1).random((8, 8)).astype(np.float32)
    squashed = TestEvaluation(test, input_size=64)
    assert_close(
        squashed.resize_map(grid, squashed.input_boxes[0], (30, 60)),
        resize_maps(grid[None], (30, 60), scale_sigma(sigma, 64, (30, 60)))[0],
    )
    # Padded: a 30 x 60 image is 32 x 64 input pixels at rows 16-48, grid rows 2-6.
    padded = TestEvaluation(
        test, input_size=64, input_boxes=[[16, 0, 32, 64], [0, 0, 64, 64]], canvas_hw=(64, 64)
    )
    assert_close(
        padded.resize_map(grid, padded.input_boxes[0], (30, 60)),
        resize_maps(grid[None, 2:6], (30, 60), scale_sigma(sigma, (32, 64), (30, 60)))[0],
    )
    # Tiled: the 8 x 20 grid spans the 64 x 160 canvas, which is the image.
    wide = np.random.default_rng(2).random((8, 20)).astype(np.float32)
    tiled = TestEvaluation(
        test, input_size=64, input_boxes=[[0, 0, 64, 160]] * 2, canvas_hw=(64, 160)
    )
    assert_close(
        tiled.resize_map(wide, tiled.input_boxes[1], (40, 100)),
        resize_maps(wide[None], (40, 100), scale_sigma(sigma, (64, 160), (40, 100)))[0],
    )


WIDE = {"s1": (6, 4, 12), "s2": (10, 2, 6), "s3": (12, 1, 3)}


@pytest.mark.parametrize(
    "name, params",
    [
        ("knn", {}),
        ("mahalanobis", {}),
        ("padim", {"n_features": 20}),
        ("patchcore", {"index": "flat"}),
        ("softpatch", {"index": "flat"}),
    ],
)
def test_detectors_work_on_non_square_grids(name, params):
    """Tiled images give wide grids (H != W): maps keep that shape, and scoring the transposed
    features gives the transposed maps and the same image scores."""
    train, test = random_features(12, seed=1, shapes=WIDE), random_features(4, seed=2, shapes=WIDE)
    scores, maps = make_detector(name, **params).fit(train).score(test)
    assert maps.shape == (4, 4, 12)

    def transposed(features):
        return {s: np.ascontiguousarray(v.transpose(0, 1, 3, 2)) for s, v in features.items()}

    t_scores, t_maps = make_detector(name, **params).fit(transposed(train)).score(transposed(test))
    assert t_maps.shape == (4, 12, 4)
    assert_close(t_scores, scores, rtol=1e-4)
    assert_close(t_maps, maps.transpose(0, 2, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_samples", [5, 40])
def test_ledoit_wolf_matches_scikit_learn(n_samples):
    rng = np.random.default_rng(n_samples)
    batch = rng.normal(size=(3, n_samples, 7)) * rng.uniform(0.1, 3.0, 7)
    mean, cov, shrinkage = ledoit_wolf(batch)
    for i, samples in enumerate(batch):
        reference = LedoitWolf().fit(samples)
        assert_close(mean[i], reference.location_, atol=1e-12)
        assert_close(cov[i], reference.covariance_, rtol=1e-10, atol=1e-12)
        assert shrinkage[i] == pytest.approx(reference.shrinkage_, rel=1e-10)


# ---------------------------------------------------------------------------------------------
# KNN / SPADE
# ---------------------------------------------------------------------------------------------


def ref_onto_grid(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(n, C, h, w) maps on a (height, width) grid: integer blocks averaged when finer,
    replicated when coarser."""
    n, c, h, w = maps.shape
    if h > height:
        return maps.reshape(n, c, height, h // height, width, w // width).mean(axis=(3, 5))
    return ref_nearest(maps, height, width)


def ref_knn(train, test, k, metric, gallery, kappa, exclude_self=False, grid_stage="s1"):
    stages = list(train)
    train_embed, test_embed = ref_gap(train, stages), ref_gap(test, stages)
    height, width = train[grid_stage].shape[2:]
    align = lambda f: np.concatenate([ref_onto_grid(f[s], height, width) for s in stages], axis=1)  # noqa: E731
    train_patches, test_patches = ref_patches(align(train)), ref_patches(align(test))
    scores, maps = [], []
    for i in range(len(test_embed)):
        distances = np.linalg.norm(train_embed - test_embed[i], axis=1)
        if exclude_self:
            distances[i] = np.inf
        neighbours = np.argsort(distances)[:k]
        scores.append(metric_of(distances[neighbours], metric).mean())
        if gallery == "same_location":
            per_image = np.linalg.norm(train_patches[neighbours] - test_patches[i][None], axis=2)
            patch = metric_of(per_image, metric).mean(axis=0)
        else:
            pool = train_patches[neighbours].reshape(-1, test_patches.shape[2])
            nearest = np.sort(pairwise(test_patches[i], pool), axis=1)[:, :kappa]
            patch = metric_of(nearest, metric).mean(axis=1)
        maps.append(patch.reshape(height, width))
    return np.array(scores), np.array(maps)


@pytest.mark.parametrize(
    "metric, gallery, kappa",
    [
        ("euclidean", "all_locations", 1),
        ("sqeuclidean", "all_locations", 3),
        ("euclidean", "same_location", 1),
    ],
)
def test_knn_matches_reference(train, test, metric, gallery, kappa):
    detector = KNNDetector(n_neighbors=5, metric=metric, gallery=gallery, n_patch_neighbors=kappa)
    scores, maps = detector.fit(train).score(test)
    expected_scores, expected_maps = ref_knn(train, test, 5, metric, gallery, kappa)
    assert maps.shape == (5, 8, 8)
    assert_close(scores, expected_scores)
    assert_close(maps, expected_maps)


@pytest.mark.parametrize("grid_stage", ["s2", "s3"])
def test_knn_maps_on_a_coarser_grid_match_reference(train, test, grid_stage):
    """grid_stage puts the maps on a coarser stage's grid, finer stages area-averaged onto it;
    the image scores are those of the finest grid."""
    fine_scores, _ = KNNDetector(n_neighbors=5).fit(train).score(test)
    scores, maps = KNNDetector(n_neighbors=5, grid_stage=grid_stage).fit(train).score(test)
    expected_scores, expected_maps = ref_knn(
        train, test, 5, "euclidean", "all_locations", 1, grid_stage=grid_stage
    )
    assert maps.shape == (5, *train[grid_stage].shape[2:])
    assert_close(scores, fine_scores)
    assert_close(scores, expected_scores)
    assert_close(maps, expected_maps)
    with pytest.raises(ValueError, match="grid_stage='s9' is not among the used stages"):
        KNNDetector(grid_stage="s9").fit(train)


def test_knn_on_its_training_set_finds_itself_unless_excluded(train):
    scores, maps = KNNDetector(n_neighbors=3).fit(train).score(train)
    expected_scores, _ = ref_knn(train, train, 3, "euclidean", "all_locations", 1)
    assert_close(scores, expected_scores)
    assert np.all(maps == 0)  # each patch finds itself in its own image, at exactly 0
    excluded = KNNDetector(n_neighbors=3, exclude_self=True).fit(train)
    scores, maps = excluded.score(train)
    expected_scores, expected_maps = ref_knn(train, train, 3, "euclidean", "all_locations", 1, True)
    assert_close(scores, expected_scores)
    assert_close(maps, expected_maps)


def test_exclude_self_rejects_other_images(train, test):
    for name in ("knn", "patchcore"):
        detector = make_detector(name, exclude_self=True, n_neighbors=2).fit(train)
        with pytest.raises(ValueError, match="exclude_self"):
            detector.score(test)


# ---------------------------------------------------------------------------------------------
# Mahalanobis and its Grad-CAM
# ---------------------------------------------------------------------------------------------


def test_mahalanobis_scores_match_scikit_learn(train, test):
    scores, _ = MahalanobisDetector().fit(train).score(test)
    expected = np.zeros(5)
    for stage in train:
        model = LedoitWolf().fit(train[stage].astype(np.float64).mean(axis=(2, 3)))
        centred = test[stage].astype(np.float64).mean(axis=(2, 3)) - model.location_
        precision = np.linalg.inv(model.covariance_)
        expected += np.sqrt(np.einsum("nc,cd,nd->n", centred, precision, centred))
    assert_close(scores, expected)


def backbone_chain(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """A three-stage CNN (s1 -> s2 -> s3, each stage computed from the previous one) with the
    shapes of STAGES: Grad-CAM of a shallow stage must back-propagate through the deeper ones."""
    generator = torch.Generator().manual_seed(0)
    weights = [
        torch.randn(c_out, c_in, 3, 3, generator=generator, dtype=torch.float64) / 4
        for c_in, c_out in ((3, 6), (6, 10), (10, 12))
    ]
    stages, x = {}, images
    for name, weight in zip(STAGES, weights, strict=True):
        x = torch.tanh(F.conv2d(x, weight, padding=1, stride=1 if name == "s1" else 2))
        if x.requires_grad:
            x.retain_grad()
        stages[name] = x
    return stages


@pytest.mark.parametrize("stages", [None, ["s1"], ["s1", "s2"]])
def test_mahalanobis_grad_cam_matches_autograd_through_the_stage_chain(stages):
    rng = np.random.default_rng(4)
    train_images, test_images = (torch.from_numpy(rng.normal(size=(n, 3, 8, 8))) for n in (30, 5))
    with torch.no_grad():
        train = {s: a.numpy().astype(np.float32) for s, a in backbone_chain(train_images).items()}
    test_chain = backbone_chain(test_images.requires_grad_())
    test = {s: a.detach().numpy().astype(np.float32) for s, a in test_chain.items()}
    used = stages or list(STAGES)
    detector = MahalanobisDetector(stages=stages).fit(train)
    total = 0
    for stage in used:
        model = LedoitWolf().fit(train[stage].astype(np.float64).mean(axis=(2, 3)))
        precision = torch.from_numpy(np.linalg.inv(model.covariance_))
        centred = test_chain[stage].mean(dim=(2, 3)) - torch.from_numpy(model.location_)
        total = total + torch.sqrt(torch.einsum("nc,cd,nd->n", centred, precision, centred))
    total.sum().backward()  # images are independent: each image's gradient is its own score's
    target = used[-1]  # the deepest used stage
    activation = test_chain[target].detach()
    weights = test_chain[target].grad.mean(dim=(2, 3))
    cam = torch.relu(torch.einsum("nc,nchw->nhw", weights, activation)).numpy()
    assert detector.cam_stage_ == target and cam.max() > 0
    assert_close(detector.grad_cam(test[target]), cam)
    _, maps = detector.score(test)
    assert_close(maps, np.array([ref_bilinear(c, 8, 8) for c in cam]))
    for shallower in used[:-1]:  # its gradient needs the backbone: refused
        with pytest.raises(ValueError, match=f"cam_stage '{shallower}' is not the deepest"):
            MahalanobisDetector(stages=stages, cam_stage=shallower).fit(train)


@pytest.mark.parametrize("reg_covar", [0.0, 0.05])
def test_mahalanobis_exclude_self_equals_refits_without_each_image(train, reg_covar):
    detector = MahalanobisDetector(exclude_self=True, reg_covar=reg_covar).fit(train)
    scores, maps = detector.score(train)
    for i in range(12):
        others = {s: np.delete(a, i, axis=0) for s, a in train.items()}
        alone = {s: a[i : i + 1] for s, a in train.items()}
        refit_scores, refit_maps = MahalanobisDetector(reg_covar=reg_covar).fit(others).score(alone)
        assert_close(scores[i], refit_scores[0], rtol=1e-6, atol=1e-9)
        assert_close(maps[i], refit_maps[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exclude_self"):
        detector.score({s: a[:5] for s, a in train.items()})


# ---------------------------------------------------------------------------------------------
# PaDiM
# ---------------------------------------------------------------------------------------------


def ref_padim(train, test, channels):
    stages = list(train)
    align = lambda f: np.concatenate([ref_nearest(f[s], 8, 8) for s in stages], 1)[:, channels]  # noqa: E731
    train_patches, test_patches = ref_patches(align(train)), ref_patches(align(test))
    maps = np.zeros((len(test_patches), 64))
    for location in range(64):
        model = LedoitWolf().fit(train_patches[:, location])
        precision = np.linalg.inv(model.covariance_)
        centred = test_patches[:, location] - model.location_
        maps[:, location] = np.sqrt(np.einsum("nc,cd,nd->n", centred, precision, centred))
    maps = maps.reshape(-1, 8, 8)
    return maps.max(axis=(1, 2)), maps


@pytest.mark.parametrize("n_features", [None, 9])
def test_padim_matches_reference(train, test, n_features):
    detector = PaDiMDetector(n_features=n_features, random_state=7).fit(train)
    channels = detector.channels_
    assert len(channels) == (n_features or 28) and np.all(np.diff(channels) > 0)
    scores, maps = detector.score(test)
    expected_scores, expected_maps = ref_padim(train, test, channels)
    assert_close(scores, expected_scores)
    assert_close(maps, expected_maps)


def test_padim_exclude_self_equals_refits_without_each_image(train):
    detector = PaDiMDetector(n_features=9, exclude_self=True).fit(train)
    scores, maps = detector.score(train)
    for i in range(12):
        others = {s: np.delete(a, i, axis=0) for s, a in train.items()}
        alone = {s: a[i : i + 1] for s, a in train.items()}
        # float64 reference: LedoitWolf refitted on the 11 other images at every location.
        refit_scores, refit_maps = ref_padim(others, alone, detector.channels_)
        assert_close(scores[i], refit_scores[0], rtol=1e-6, atol=1e-9)
        assert_close(maps[i], refit_maps[0], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="exclude_self"):
        detector.score({s: a[:5] for s, a in train.items()})


def test_padim_channel_subset_is_seeded(train):
    first = PaDiMDetector(n_features=9, random_state=7).fit(train).channels_
    again = PaDiMDetector(n_features=9, random_state=7).fit(train).channels_
    other = PaDiMDetector(n_features=9, random_state=8).fit(train).channels_
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_padim_chunked_computation_gives_the_same_result(train, test, monkeypatch):
    whole = PaDiMDetector().fit(train).score(test)
    monkeypatch.setattr(detectors.base, "WORKSPACE_MB", 1e-6)  # one location per chunk
    chunked = PaDiMDetector().fit(train).score(test)
    assert_close(chunked[0], whole[0], rtol=1e-12)
    assert_close(chunked[1], whole[1], rtol=1e-6)


def test_padim_memory_budget_error_names_the_numbers_and_the_fix(train, test):
    # The 64 per-location matrices alone take 0.2 MB.
    detector = PaDiMDetector(max_memory_mb=0.1)
    with pytest.raises(ValueError, match=r"64 per-location covariances of d=28.*n_features <="):
        detector.fit(train)
    with pytest.raises(NotFittedError):  # a failed fit leaves nothing half-usable
        detector.score(test)


# ---------------------------------------------------------------------------------------------
# Interface: registry, map size, input checks, memory estimates
# ---------------------------------------------------------------------------------------------


# The library's own detectors; other test files register toys of their own.
BUILT_IN = {name: cls for name, cls in DETECTORS.items() if cls.__module__.startswith("sroc.")}


def test_registry_and_parameter_errors():
    assert set(BUILT_IN) == {"knn", "mahalanobis", "padim", "patchcore", "softpatch"}
    assert isinstance(make_detector("padim", n_features=3), PaDiMDetector)
    for name in BUILT_IN:  # the workflow passes the run seed to every detector
        make_detector(name, random_state=4)
    with pytest.raises(ValueError, match=r"unknown detector type 'spade'.*\['knn', 'mahal"):
        make_detector("spade")
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['k'\]"):
        make_detector("knn", k=5)
    for name in ("knn", "mahalanobis", "padim"):  # maps are resized and smoothed once, outside
        with pytest.raises(ValueError, match=r"no parameter\(s\) \['map_sigma', 'map_size'\]"):
            make_detector(name, map_size=20, map_sigma=1.5)


class _PooledGaussian(BaseDetector):
    """A toy detector, as a user's plugin would write one: an isotropic Gaussian on the pooled
    features; image score, the distance to the mean; no maps."""

    runtime_seconds_per_image = 0.001
    supports_exclude_self = True

    def __init__(self, scale: float = 1.0, stages=None, exclude_self=False, n_jobs=None):
        self.scale = scale
        self.stages = stages
        self.exclude_self = exclude_self
        self.n_jobs = n_jobs

    def _fit(self, features):
        self.mean_ = detectors.base.gap_embedding(features, self.stages_).mean(axis=0)

    def _score(self, features, maps):
        embeddings = detectors.base.gap_embedding(features, self.stages_)
        return self.scale * np.linalg.norm(embeddings - self.mean_, axis=1), None

    def _estimate_state_mb(self, n_train, n_test, shapes):
        return (n_train + n_test) * sum(chw[0] for chw in shapes.values()) * 8 / 2**20

    def fit_flops(self, shapes, n_fit):
        return n_fit * detectors.base.gap_pooling_flops(self.used_shapes(shapes))

    def score_flops(self, shapes, n_fit, n_score, maps):
        return n_score * detectors.base.gap_pooling_flops(self.used_shapes(shapes))


@pytest.fixture
def toy_detector():
    """The toy class registered as "toy_gaussian" for one test, then unregistered."""
    cls = type("ToyGaussian", (_PooledGaussian,), {}, name="toy_gaussian", label="Toy")
    yield cls
    del DETECTORS["toy_gaussian"]


def test_a_class_defined_anywhere_registers_itself(toy_detector, train, test):
    assert DETECTORS["toy_gaussian"] is toy_detector
    assert detectors.detector_class("toy_gaussian") is toy_detector
    assert (toy_detector.name, toy_detector.label) == ("toy_gaussian", "Toy")
    assert _PooledGaussian not in DETECTORS.values()  # no name: an abstract base
    detector = make_detector("toy_gaussian", scale=2.0, stages=["s1"])
    scores, maps = detector.fit(train).score(test, maps=False)
    assert maps is None and scores.shape == (5,) and np.all(scores > 0)
    validate_params("toy_gaussian", {"scale": 3.0}, "detectors[4] (toy)")
    with pytest.raises(ValueError, match=r"detectors\[4\].*'n_jobs'"):
        validate_params("toy_gaussian", {"n_jobs": 2}, "detectors[4] (toy)")
    with pytest.raises(ValueError, match=r"toy_gaussian has no parameter 'k'.*'scale'"):
        validate_params("toy_gaussian", {"k": 3}, "detectors[4] (toy)")
    shapes = {s: a.shape[1:] for s, a in train.items()}
    estimate = estimate_memory_mb("toy_gaussian", {"stages": ["s1"]}, 12, 5, shapes)
    assert estimate > detectors.INTERPRETER_OVERHEAD_MB


def test_a_duplicate_or_incomplete_detector_fails_at_definition():
    with pytest.raises(ValueError, match=r"'knn' is already registered by .*KNNDetector"):
        type("OtherKNN", (_PooledGaussian,), {}, name="knn", label="KNN")
    with pytest.raises(ValueError, match="label"):
        type("Unlabelled", (_PooledGaussian,), {}, name="unlabelled")
    with pytest.raises(ValueError, match="runtime_seconds_per_image"):
        type("Costless", (BaseDetector,), {}, name="costless", label="Costless")
    with pytest.raises(ValueError, match="has_patch_bank is True but __init__ takes no "):
        type("NoBank", (_PooledGaussian,), {"has_patch_bank": True}, name="nobank", label="B")
    assert not {"unlabelled", "costless", "nobank"} & set(DETECTORS)
    assert DETECTORS["knn"] is KNNDetector


def test_every_registered_detector_describes_itself(train, test):
    """Label, runtime cost, capabilities and FLOP models: what the workflow, the refinement
    strategies and the runtime projection ask a detector class."""
    labels = {name: cls.label for name, cls in BUILT_IN.items()}
    assert labels == {
        "knn": "KNN",
        "mahalanobis": "Mahalanobis",
        "padim": "PaDiM",
        "patchcore": "PatchCore",
        "softpatch": "SoftPatch",
    }
    shapes = {s: a.shape[1:] for s, a in train.items()}
    for name, cls in BUILT_IN.items():
        assert cls.name == name
        assert cls.runtime_seconds_per_image > 0
        assert cls.supports_exclude_self and "exclude_self" in cls._get_param_names()
        assert cls.has_patch_bank == (name in ("patchcore", "softpatch"))
        assert cls.has_patch_bank == ("excluded_patches" in cls._get_param_names())
        detector = make_detector(name).fit(train)
        for flops in (
            detector.fit_flops(shapes, 12),
            detector.score_flops(shapes, 12, 5, True),
            detector.score_flops(shapes, 12, 5, False),
        ):
            assert math.isfinite(flops) and flops > 0, name
        assert detector.score_flops(shapes, 12, 10, True) > detector.score_flops(
            shapes, 12, 5, True
        )
    with pytest.raises(NotImplementedError, match="no FLOP model"):
        BaseDetector.fit_flops(make_detector("knn"), shapes, 12)


@pytest.mark.parametrize("name", ["knn", "mahalanobis", "padim"])
def test_image_only_scoring_computes_no_map(train, test, name, monkeypatch):
    scores, maps = make_detector(name).fit(train).score(test)
    assert maps.shape == (5, 8, 8)

    def no_maps(*args, **kwargs):
        raise AssertionError("a map was computed")

    # KNN aligns no patch (neither when fitting nor scoring), Mahalanobis runs no Grad-CAM.
    monkeypatch.setattr(detectors.knn, "align_stages", no_maps)
    monkeypatch.setattr(MahalanobisDetector, "_grad_cam", no_maps)
    detector = make_detector(name).fit(train)
    image_scores, no_map = detector.score(test, maps=False)
    assert no_map is None and image_scores.dtype == np.float64
    assert np.array_equal(image_scores, scores)
    if name == "knn":  # the gallery is not held: only the GAP embeddings and the input
        assert detector.train_features_["s1"] is train["s1"]
        assert not any(k.startswith("train_patches") for k in vars(detector))


@pytest.mark.parametrize("name", ["knn", "mahalanobis", "padim"])
def test_outputs_do_not_depend_on_the_thread_count(train, test, name, monkeypatch):
    monkeypatch.setattr(detectors.base, "WORKSPACE_MB", 0.05)  # many chunks run concurrently
    params = {"n_features": 20} if name == "padim" else {}
    runs = [make_detector(name, n_jobs=n_jobs, **params).fit(train) for n_jobs in (1, 2, None)]
    for reference, other in itertools.pairwise([run.score(test) for run in runs]):
        assert np.array_equal(reference[0], other[0]) and np.array_equal(reference[1], other[1])
    left_out = [
        make_detector(name, n_jobs=n_jobs, exclude_self=True, **params).fit(train).score(train)
        for n_jobs in (1, 2)
    ]
    assert np.array_equal(left_out[0][0], left_out[1][0])
    assert np.array_equal(left_out[0][1], left_out[1][1])


def test_validate_params_names_the_entry_and_the_key():
    validate_params("padim", {"n_features": 100, "stages": ["s1"]}, "detectors[2] (padim)")
    for key in ("random_state", "n_jobs"):
        with pytest.raises(ValueError, match=rf"detectors\[2\] \(padim\).*'{key}'"):
            validate_params("padim", {key: 1}, "detectors[2] (padim)")
    for key in ("map_size", "map_sigma"):
        with pytest.raises(ValueError, match=rf"detectors\[0\] \(knn\).*'{key}'"):
            validate_params("knn", {key: 20}, "detectors[0] (knn)")
    with pytest.raises(ValueError, match=r"detectors\[1\].*'k'.*n_neighbors"):
        validate_params("knn", {"k": 5}, "detectors[1] (knn)")
    with pytest.raises(ValueError, match=r"detectors\[3\].*unknown detector type 'spade'"):
        validate_params("spade", {}, "detectors[3] (spade)")


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_input_errors_name_the_problem(train, test, name):
    detector = make_detector(name, stages=["s1", "s2"])
    with pytest.raises(NotFittedError, match="not fitted"):
        detector.score(test)
    detector.fit(train)
    assert detector.stages_ == ["s1", "s2"]
    with pytest.raises(ValueError, match=r"lack stage\(s\) \['s2'\]"):
        detector.score({"s1": test["s1"]})
    with pytest.raises(ValueError, match="differ from those seen in fit"):
        detector.score({**test, "s2": test["s2"][:, :4]})
    with pytest.raises(ValueError, match="NaN"):
        detector.score({**test, "s1": np.full_like(test["s1"], np.nan)})


def test_memory_estimates_cover_the_fitted_state(train, test):
    shapes = {s: a.shape[1:] for s, a in train.items()}
    inputs_mb = (12 + 5) * sum(math.prod(v) for v in shapes.values()) * 4 / 2**20
    fitted = {
        "knn": lambda d: d.train_embeddings_.nbytes,
        "padim": lambda d: d.whitenings_.nbytes + d.means_.nbytes,
        "patchcore": lambda d: 2 * d.memory_bank_.nbytes,
        "mahalanobis": lambda d: sum(w.nbytes for w in d.choleskys_.values()),
    }
    for name, state_bytes in fitted.items():
        detector = make_detector(name).fit(train)
        estimate = estimate_memory_mb(name, {}, 12, 5, shapes)
        assert (
            estimate - detectors.INTERPRETER_OVERHEAD_MB - inputs_mb
            >= state_bytes(detector) / 2**20
        )
    big = {"blocks.2": (48, 48, 48), "blocks.4": (120, 24, 24), "blocks.5": (208, 12, 12)}
    assert estimate_memory_mb("patchcore", {}, 400, 100, big) > estimate_memory_mb(
        "patchcore", {}, 200, 100, big
    )
    padim = estimate_memory_mb("padim", {}, 200, 100, big)
    assert padim > 2304 * 376**2 * 4 / 2**20  # the per-location matrices dominate


# ---------------------------------------------------------------------------------------------
# Real features: localisation on the synthetic dataset, IVF recall on ../shared/data
# ---------------------------------------------------------------------------------------------

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def embedded_category(root: Path, category: str, cache: Path, config) -> tuple[dict, dict, object]:
    """Features of one category's train and test images, and the test metadata."""
    from sroc.datasets.layout import index_category
    from sroc.embeddings import build_cache
    from sroc.feature_cache import load_features

    build_cache(index_category(root, category), cache, config, threads=2, progress=False)
    features, metadata = load_features(cache)
    is_train = (metadata["origin"] == "train").to_numpy()
    train = {s: a[is_train] for s, a in features.items()}
    test = {s: a[~is_train] for s, a in features.items()}
    return train, test, metadata[~is_train].reset_index(drop=True)


@pytest.fixture(scope="module")
def synthetic_features(tmp_path_factory):
    from sroc.backbones import BackboneConfig
    from sroc.datasets import make_synthetic_dataset

    folder = tmp_path_factory.mktemp("synthetic")
    root = make_synthetic_dataset(
        folder / "data",
        categories=("grid_texture",),
        n_train=30,
        n_test_good=5,
        n_test_per_defect=5,
    )
    config = BackboneConfig(name="tf_efficientnet_lite0", input_size=224, runtime="torch")
    return (*embedded_category(root, "grid_texture", folder / "cache.h5", config), config)


@pytest.mark.slow
@pytest.mark.parametrize("name, params", [("padim", {"n_features": 100}), ("patchcore", {})])
def test_maps_localise_synthetic_defects(synthetic_features, name, params):
    from sklearn.metrics import roc_auc_score

    from sroc.datasets.layout import read_mask

    train, test, metadata = synthetic_features[:3]
    input_size = synthetic_features[3].input_size
    _, maps = make_detector(name, **params).fit(train).score(test)
    masks, upsampled = [], []
    for grid_map, mask_path, height, width in zip(
        maps, metadata["mask_path"], metadata["height"], metadata["width"], strict=True
    ):
        shape = (int(height), int(width))
        masks.append(read_mask(mask_path) if mask_path else np.zeros(shape, dtype=bool))
        sigma = scale_sigma(4.0, input_size, shape)
        upsampled.append(resize_maps(grid_map[None], shape, sigma)[0])
    pixel_auroc = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([u.ravel() for u in upsampled])
    )
    assert pixel_auroc > 0.9, f"{name}: pixel AUROC {pixel_auroc:.3f}"
