"""SoftPatch against scikit-learn's LocalOutlierFactor and brute-force numpy references."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import LocalOutlierFactor
from test_detectors import assert_close, pairwise, random_features
from test_patchcore import ref_patchcore_features

from sroc.detectors import (
    DETECTORS,
    PatchCoreDetector,
    SoftPatchDetector,
    make_detector,
    patchcore,
    softpatch,
)

N_TRAIN, LOCATIONS, DIM = 12, 64, 28  # test_detectors.STAGES on PatchCore's 8x8 grid


@pytest.fixture(scope="module")
def train():
    return random_features(N_TRAIN, seed=1)


@pytest.fixture(scope="module")
def test():
    return random_features(5, seed=2)


@pytest.fixture(scope="module")
def by_position(train):
    """The reference patch features (float64) as (positions, images, D)."""
    return ref_patchcore_features(train, 3, None).transpose(1, 0, 2)


def warns_if(condition: bool):
    """scikit-learn's warning (too few samples, too many duplicates) where it is due."""
    return pytest.warns(UserWarning) if condition else contextlib.nullcontext()


def sklearn_lof(points: np.ndarray, k: int) -> np.ndarray:
    return -LocalOutlierFactor(n_neighbors=k).fit(points).negative_outlier_factor_


def ref_nearest(points: np.ndarray) -> np.ndarray:
    """The two smallest of each row of the full distance matrix (the point itself is one of
    them, at 0), summed, plus 1."""
    return np.sort(pairwise(points, points), axis=1)[:, :2].sum(axis=1) + 1.0


def ref_gaussian(points: np.ndarray) -> np.ndarray:
    """sqrt((x - mu)^T C^-1 (x - mu)) + 1 with C scikit-learn's Ledoit-Wolf covariance plus the
    detector's relative ridge, inverted by numpy."""
    estimator = LedoitWolf().fit(points)
    cov = (
        estimator.covariance_
        + softpatch._GAUSSIAN_RELATIVE_RIDGE
        * np.eye(points.shape[1])
        * np.trace(estimator.covariance_)
        / points.shape[1]
    )
    centred = points - estimator.location_
    return np.sqrt(np.einsum("nd,de,ne->n", centred, np.linalg.inv(cov), centred)) + 1.0


# -- the discriminators ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 6, 11, 20])
def test_lof_equals_scikit_learn_per_position(train, by_position, k):
    # k = 11 uses every other image; 20 > N - 1 is cut to N - 1, as scikit-learn does.
    detector = SoftPatchDetector(discriminator="lof", n_neighbors_lof=k, index="flat").fit(train)
    scores = detector.outlier_scores_.reshape(N_TRAIN, LOCATIONS)
    with warns_if(k >= N_TRAIN):
        expected = np.stack([sklearn_lof(points, k) for points in by_position], axis=1)
    assert_close(scores, expected)


def test_lof_equals_scikit_learn_with_duplicate_points():
    rng = np.random.default_rng(4)
    sets = rng.normal(size=(3, 30, 7))
    # Pairs and a triple of duplicates (fewer than k: their k-distance stays positive).
    sets[0, 3] = sets[0, 5]
    sets[0, [7, 8]] = sets[0, 9]
    # A group of k + 3 duplicates: their k-distance is 0, the 1e-10 of the density decides.
    sets[1, :9] = sets[1, 0]
    # Integer coordinates: many exactly tied distances, several duplicates.
    sets[2] = rng.integers(-2, 3, size=(30, 7))
    for index, points in enumerate(sets):
        with warns_if(index == 1):
            expected = sklearn_lof(points, 6)
        assert_close(softpatch.local_outlier_factors(points[None], 6)[0], expected, atol=1e-9)


def test_nearest_and_gaussian_equal_brute_force(train, by_position):
    for name, reference in (("nearest", ref_nearest), ("gaussian", ref_gaussian)):
        detector = SoftPatchDetector(discriminator=name, index="flat").fit(train)
        scores = detector.outlier_scores_.reshape(N_TRAIN, LOCATIONS)
        expected = np.stack([reference(points) for points in by_position], axis=1)
        assert_close(scores, expected)


def test_gaussian_handles_degenerate_positions():
    rng = np.random.default_rng(5)
    identical = np.repeat(rng.normal(size=(1, 1, 6)), 5, axis=1)
    two_points = rng.normal(size=(1, 2, 6))  # Ledoit-Wolf's shrinkage is 0 for two points
    assert np.array_equal(softpatch.gaussian_distance_scores(identical), np.ones((1, 5)))
    scores = softpatch.gaussian_distance_scores(two_points)
    assert np.isfinite(scores).all() and scores[0, 0] == pytest.approx(scores[0, 1])


# -- hard removal --------------------------------------------------------------------------------


@pytest.mark.parametrize("coreset_ratio", [None, 0.25])
@pytest.mark.parametrize("discriminator", ["lof", "nearest", "gaussian"])
def test_a_removed_patch_is_never_in_the_memory_bank(train, discriminator, coreset_ratio):
    detector = SoftPatchDetector(
        discriminator=discriminator, tau=0.2, index="flat", coreset_ratio=coreset_ratio,
        coreset_projection_dim=8,
    ).fit(train)  # fmt: skip
    scores = detector.outlier_scores_.reshape(-1)
    threshold = np.quantile(scores, 0.8)
    assert detector.outlier_threshold_ == threshold
    allowed = np.flatnonzero(scores <= threshold)
    assert len(allowed) == math.floor((N_TRAIN * LOCATIONS - 1) * 0.8) + 1
    memory = detector.memory_indices_
    if coreset_ratio is None:
        assert np.array_equal(memory, allowed)
    else:
        assert len(memory) == math.ceil(coreset_ratio * len(allowed))
        assert np.isin(memory, allowed).all()
    # Each memory row is the feature of its (image, location) pair; its weight is its score.
    patches = ref_patchcore_features(train, 3, None).reshape(-1, DIM)
    assert_close(detector.memory_bank_, patches[memory])
    assert np.array_equal(detector.memory_weights_, scores[memory].astype(np.float32))
    removed = np.setdiff1d(np.arange(N_TRAIN * LOCATIONS), allowed)
    assert pairwise(patches[removed], detector.memory_bank_).min() > 1e-3


def test_excluded_patches_are_removed_as_well(train):
    excluded = np.random.default_rng(6).choice(N_TRAIN * LOCATIONS, size=200, replace=False)
    detector = SoftPatchDetector(index="flat", excluded_patches=excluded).fit(train)
    # The discriminator still sees every training patch.
    plain = SoftPatchDetector(index="flat").fit(train)
    assert np.array_equal(detector.outlier_scores_, plain.outlier_scores_)
    clean = np.flatnonzero(plain.outlier_scores_.reshape(-1) <= plain.outlier_threshold_)
    assert np.array_equal(detector.memory_indices_, np.setdiff1d(clean, excluded))


# -- scoring -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"index": "flat"},
        {"index": "flat", "metric": "sqeuclidean", "coreset_ratio": 0.3},
        {"index": "ivfflat", "n_lists": 4, "coreset_ratio": 0.5},
        {"index": "flat", "exclude_self": True},
        {"index": "ivfflat", "n_lists": 4, "exclude_self": True},
        {"index": "flat", "excluded_patches": np.arange(0, 768, 5)},
    ],
)
def test_without_removal_nor_weights_it_is_patchcore(train, test, params):
    plain = PatchCoreDetector(**params).fit(train)
    soft = SoftPatchDetector(tau=0.0, soft_weights=False, **params).fit(train)
    assert np.array_equal(soft.memory_indices_, plain.memory_indices_)
    scored = train if params.get("exclude_self") else test
    for a, b in zip(soft.score(scored), plain.score(scored), strict=True):
        assert np.array_equal(a, b)


def ref_soft_scores(test_patches, bank, weights, k, metric="euclidean", own_rows=None):
    """Per test patch: its k nearest memory patches by plain distance, each distance times that
    memory patch's weight, averaged; image score: the maximum."""
    maps = []
    for i, patches in enumerate(test_patches):
        distances = pairwise(patches, bank)
        if own_rows is not None:
            distances[:, own_rows[i]] = np.inf
        nearest = np.argsort(distances, axis=1)[:, :k]
        found = np.take_along_axis(distances, nearest, axis=1)
        if metric == "sqeuclidean":
            found = found**2
        maps.append((found * weights[nearest]).mean(axis=1))
    maps = np.array(maps).reshape(-1, 8, 8)
    return maps.max(axis=(1, 2)), maps


@pytest.mark.parametrize("k, metric", [(1, "euclidean"), (5, "euclidean"), (3, "sqeuclidean")])
def test_soft_weights_multiply_the_matched_memory_patches_distances(train, test, k, metric):
    detector = SoftPatchDetector(n_neighbors=k, metric=metric, index="flat").fit(train)
    scores, maps = detector.score(test)
    memory = detector.memory_indices_
    bank = ref_patchcore_features(train, 3, None).reshape(-1, DIM)[memory]
    weights = detector.outlier_scores_.reshape(-1)[memory]
    expected = ref_soft_scores(ref_patchcore_features(test, 3, None), bank, weights, k, metric)
    assert_close(scores, expected[0])
    assert_close(maps, expected[1])


@pytest.mark.parametrize("masked", [True, False])
def test_leave_one_image_out_with_soft_weights(train, masked, monkeypatch):
    monkeypatch.setattr(patchcore, "_MASKED_SEARCH_ENTRIES", 2**26 if masked else 0)
    detector = SoftPatchDetector(index="flat", exclude_self=True, n_neighbors=2).fit(train)
    scores, maps = detector.score(train)
    memory = detector.memory_indices_
    patches = ref_patchcore_features(train, 3, None)
    own_rows = [np.flatnonzero(memory // LOCATIONS == i) for i in range(N_TRAIN)]
    weights = detector.outlier_scores_.reshape(-1)[memory]
    expected = ref_soft_scores(
        patches, patches.reshape(-1, DIM)[memory], weights, 2, "euclidean", own_rows
    )
    assert_close(scores, expected[0])
    assert_close(maps, expected[1])


@pytest.mark.parametrize("discriminator", ["lof", "gaussian"])
def test_results_do_not_depend_on_the_thread_count(discriminator, monkeypatch):
    # Blocks of 16 positions (of 256), so that two threads discriminate blocks at once.
    monkeypatch.setattr(softpatch, "_BLOCK_BYTES", 16 * 8 * 100 * 100)
    shapes = {"s1": (64, 16, 16), "s2": (96, 8, 8)}
    bigger_train = random_features(100, seed=7, shapes=shapes)
    bigger_test = random_features(4, seed=8, shapes=shapes)
    params = {"coreset_ratio": 0.1, "projection_dim": 16, "n_lists": 16, "n_probes": 2}
    fitted = [
        SoftPatchDetector(discriminator=discriminator, n_jobs=n_jobs, **params).fit(bigger_train)
        for n_jobs in (1, 2)
    ]
    assert np.array_equal(fitted[0].outlier_scores_, fitted[1].outlier_scores_)
    assert np.array_equal(fitted[0].memory_indices_, fitted[1].memory_indices_)
    runs = [detector.score(bigger_test) for detector in fitted]
    assert np.array_equal(runs[0][0], runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1])


def test_blocks_of_positions_give_the_same_scores(train, monkeypatch):
    whole = SoftPatchDetector(index="flat").fit(train).outlier_scores_
    monkeypatch.setattr(softpatch, "_BLOCK_BYTES", 1)  # one position per block
    assert np.array_equal(SoftPatchDetector(index="flat").fit(train).outlier_scores_, whole)


# -- registration, parameters, costs -------------------------------------------------------------


def test_registered_after_patchcore_with_patchcore_capabilities():
    names = list(DETECTORS)
    assert names.index("softpatch") == names.index("patchcore") + 1
    assert SoftPatchDetector.label == "SoftPatch"
    assert SoftPatchDetector.supports_exclude_self and SoftPatchDetector.has_patch_bank
    detector = make_detector("softpatch", discriminator="nearest", tau=0.1)
    assert repr(detector) == "SoftPatchDetector(discriminator='nearest', tau=0.1)"
    assert set(PatchCoreDetector._get_param_names()) < set(detector._get_param_names())


@pytest.mark.parametrize(
    "params, message",
    [
        ({"discriminator": "knn"}, "discriminator must be one of"),
        ({"n_neighbors_lof": 0}, "n_neighbors_lof must be a positive int"),
        ({"tau": 1.0}, r"tau .* must be in \[0, 1\)"),
        ({"tau": -0.1}, r"tau .* must be in \[0, 1\)"),
    ],
)
def test_parameter_errors_name_the_parameter(train, params, message):
    with pytest.raises(ValueError, match=message):
        SoftPatchDetector(index="flat", **params).fit(train)


def test_removing_every_patch_is_an_error(train):
    clean = SoftPatchDetector(index="flat").fit(train)
    noisy = np.flatnonzero(clean.outlier_scores_.reshape(-1) > clean.outlier_threshold_)
    others = np.setdiff1d(np.arange(N_TRAIN * LOCATIONS), noisy)
    with pytest.raises(ValueError, match="remove all 768 training patches"):
        SoftPatchDetector(index="flat", excluded_patches=others).fit(train)


def test_costs_add_the_discriminator_to_patchcores(train):
    shapes = {s: a.shape[1:] for s, a in train.items()}
    plain = PatchCoreDetector(index="flat").fit(train)
    for discriminator, extra in (
        ("lof", LOCATIONS * 2 * N_TRAIN**2 * DIM),
        ("gaussian", LOCATIONS * (4 * N_TRAIN * DIM**2 + DIM**3)),
    ):
        soft = SoftPatchDetector(discriminator=discriminator, index="flat").fit(train)
        assert soft.fit_flops(shapes, N_TRAIN) == plain.fit_flops(shapes, N_TRAIN) + extra
    assert (
        soft.score_flops(shapes, N_TRAIN, 5, True)
        == plain.score_flops(shapes, N_TRAIN, 5, True) + 5 * LOCATIONS * 5
    )
    assert soft.estimate_memory_mb(N_TRAIN, 5, shapes) > plain.estimate_memory_mb(
        N_TRAIN, 5, shapes
    )
