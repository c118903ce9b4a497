"""PatchCore against independent brute-force references (loops over patches, exact search)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_detectors import (
    SHARED_DATA,
    assert_close,
    embedded_category,
    metric_of,
    pairwise,
    random_features,
    ref_adaptive_pool,
    ref_average_3x3,
    ref_bilinear_stack,
    ref_patches,
)

from sroc.detectors import PatchCoreDetector, coreset, greedy_coreset_indices, neighbours, patchcore


@pytest.fixture(scope="module")
def train():
    return random_features(12, seed=1)


@pytest.fixture(scope="module")
def test():
    return random_features(5, seed=2)


def test_greedy_coreset_matches_brute_force_k_center():
    points = np.random.default_rng(3).normal(size=(60, 5)).astype(np.float32)
    starts = np.array([4, 17, 33])
    distances = pairwise(points, points)
    current = distances[:, starts].mean(axis=1)
    expected = []
    for _ in range(12):
        chosen = int(np.argmax(current))
        expected.append(chosen)
        current = np.minimum(current, distances[:, chosen])
    assert greedy_coreset_indices(points, 12, starts).tolist() == sorted(expected)


@pytest.mark.parametrize("groups, rows", [(256, 256), (4, 7), (1, 1), (50, 64)])
@pytest.mark.parametrize("masked", [False, True])
def test_blocked_search_matches_a_full_distance_matrix(groups, rows, masked, monkeypatch):
    """The blocked candidate search (group minima, threshold, exact differences) against a
    full distance matrix and a stable sort. Small integer coordinates make every distance
    exact in float32 and give many ties: they must go to the lower index, as the stable sort's.
    Few groups and rows exercise the padding, several blocks and rows with many candidates."""
    monkeypatch.setattr(neighbours, "_GROUPS", groups)
    monkeypatch.setattr(neighbours, "_CANDIDATE_ROWS", rows)
    rng = np.random.default_rng(12)
    base = rng.integers(-3, 4, size=(203, 6)).astype(np.float32)
    queries = np.concatenate([rng.integers(-3, 4, size=(150, 6)), base[:20]]).astype(np.float32)
    full = ((queries[:, None, :].astype(np.float64) - base[None]) ** 2).sum(-1)
    excluded = None
    if masked:
        excluded = rng.random(full.shape) < 0.4
        excluded[0, :-3] = True  # a query with fewer allowed patches than candidates
        full[excluded] = np.inf
    for k in (1, 3, 5):
        sq, ids = neighbours.nearest_sq_distances(queries, base, k, excluded)
        expected_ids = np.argsort(full, axis=1, kind="stable")[:, :k]
        expected_sq = np.take_along_axis(full, expected_ids, axis=1)
        assert np.array_equal(sq, expected_sq)
        finite = np.isfinite(expected_sq)
        assert np.array_equal(ids[finite], expected_ids[finite])


def test_blocked_search_on_continuous_features_finds_the_nearest():
    rng = np.random.default_rng(13)
    base = rng.normal(size=(3000, 16)).astype(np.float32)
    queries = np.concatenate([rng.normal(size=(600, 16)), base[::100]]).astype(np.float32)
    sq, ids = neighbours.nearest_sq_distances(queries, base, 5)
    full = pairwise(queries, base) ** 2
    expected_ids = np.argsort(full, axis=1, kind="stable")[:, :5]
    assert np.array_equal(ids, expected_ids)
    assert_close(sq, np.take_along_axis(full, expected_ids, axis=1), rtol=1e-6, atol=1e-6)
    assert np.all(sq[600:, 0] == 0)  # a base row finds itself at exactly 0


def test_greedy_step_is_the_in_place_form_of_the_plain_update():
    """One fused step (sgemv into a reused buffer) gives bit for bit the bound of the plain
    float32 expression max(|p|^2 - 2 p.c + |c|^2, 0) and the plain minimum."""
    points = np.random.default_rng(14).normal(size=(500, 32)).astype(np.float32)
    sq_norms = np.einsum("nd,nd->n", points, points)
    bound = np.full(500, np.inf, dtype=np.float32)
    bound[7] = 1e9
    expected = bound.copy()
    chosen = coreset.greedy_steps(points, sq_norms, bound, 0.0, 40)
    plain = []
    for _ in range(40):
        best = int(np.argmax(expected))
        plain.append(best)
        sq = points @ points[best]
        sq = np.maximum(sq * np.float32(-2.0) + sq_norms + sq_norms[best], 0.0)
        expected = np.minimum(expected, sq)
    assert chosen == plain
    assert np.array_equal(bound, expected)


def test_greedy_coreset_with_refreshes_matches_naive_k_center():
    """Many active-set refreshes (2000 points, 125 active, 300 steps) against the naive greedy
    k-center: one full pass over every point per step, float64."""
    points = np.random.default_rng(15).normal(size=(2000, 8)).astype(np.float32)
    starts = np.array([3, 500, 1999])
    p = points.astype(np.float64)
    current = np.sqrt(((p[:, None, :] - p[starts][None]) ** 2).sum(-1)).mean(1)
    expected = []
    for _ in range(300):
        chosen = int(np.argmax(current))
        expected.append(chosen)
        current = np.minimum(current, np.sqrt(((p - p[chosen]) ** 2).sum(-1)))
    assert greedy_coreset_indices(points, 300, starts).tolist() == sorted(expected)


def ref_patchcore_features(features, patch_size, target_dim):
    parts = []
    for stage in features:
        maps = ref_average_3x3(features[stage]) if patch_size == 3 else features[stage]
        parts.append(ref_bilinear_stack(maps, 8, 8))
    patches = ref_patches(np.concatenate(parts, axis=1))  # (n, 64, D)
    if target_dim is not None:
        patches = np.array([ref_adaptive_pool(p, target_dim) for p in patches])
    return patches


def ref_patchcore_scores(test_patches, bank, k, metric, excluded_rows=None):
    maps = []
    for i, patches in enumerate(test_patches):
        distances = pairwise(patches, bank)
        if excluded_rows is not None:
            distances[:, excluded_rows[i]] = np.inf
        maps.append(metric_of(np.sort(distances, axis=1)[:, :k], metric).mean(axis=1))
    maps = np.array(maps).reshape(-1, 8, 8)
    return maps.max(axis=(1, 2)), maps


@pytest.mark.parametrize(
    "patch_size, target_dim, metric",
    [(3, None, "euclidean"), (1, None, "sqeuclidean"), (3, 11, "euclidean")],
)
def test_patchcore_exact_matches_reference(train, test, patch_size, target_dim, metric):
    detector = PatchCoreDetector(
        index="flat", patch_size=patch_size, target_dim=target_dim, metric=metric
    )
    scores, maps = detector.fit(train).score(test)
    bank = ref_patchcore_features(train, patch_size, target_dim).reshape(-1, target_dim or 28)
    expected_scores, expected_maps = ref_patchcore_scores(
        ref_patchcore_features(test, patch_size, target_dim), bank, 5, metric
    )
    assert_close(scores, expected_scores)
    assert_close(maps, expected_maps)


@pytest.mark.parametrize("index, masked", [("flat", True), ("flat", False), ("ivfflat", False)])
def test_patchcore_exclude_self_leaves_each_image_out(train, index, masked, monkeypatch):
    # Exact search masks a chunk's own patches at once, or (large banks) searches per image.
    monkeypatch.setattr(patchcore, "_MASKED_SEARCH_ENTRIES", 2**26 if masked else 0)
    # With every IVF cell probed the IVF search is exhaustive, hence exact.
    detector = PatchCoreDetector(index=index, n_lists=4, n_probes=4, exclude_self=True)
    scores, maps = detector.fit(train).score(train)
    patches = ref_patchcore_features(train, 3, None)
    own_rows = [np.arange(i * 64, (i + 1) * 64) for i in range(12)]
    expected_scores, expected_maps = ref_patchcore_scores(
        patches, patches.reshape(-1, 28), 5, "euclidean", own_rows
    )
    assert_close(scores, expected_scores)
    assert_close(maps, expected_maps)


def test_patchcore_on_its_training_set_counts_itself_at_zero(train):
    _, maps = PatchCoreDetector(index="flat", n_neighbors=1).fit(train).score(train)
    assert np.all(maps == 0)


def test_patchcore_coreset_searches_the_selected_patches(train, test):
    detector = PatchCoreDetector(index="flat", coreset_ratio=0.25, coreset_projection_dim=8).fit(
        train
    )
    kept = detector.memory_indices_
    assert len(kept) == math.ceil(0.25 * 12 * 64) and np.all(np.diff(kept) > 0)
    bank = ref_patchcore_features(train, 3, None).reshape(-1, 28)[kept]
    expected_scores, expected_maps = ref_patchcore_scores(
        ref_patchcore_features(test, 3, None), bank, 5, "euclidean"
    )
    scores, maps = detector.score(test)
    assert_close(scores, expected_scores)
    assert_close(maps, expected_maps)


def test_patchcore_ivf_is_deterministic_and_close_to_exact(train, test):
    bigger_train, bigger_test = random_features(60, seed=5), random_features(10, seed=6)
    runs = [
        PatchCoreDetector(n_lists=16, n_probes=4, random_state=3)
        .fit(bigger_train)
        .score(bigger_test)
        for _ in range(2)
    ]
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    exact = PatchCoreDetector(index="flat").fit(bigger_train).score(bigger_test)
    # An approximate search can only miss neighbours, never find closer ones.
    assert np.all(runs[0][1] >= exact[1] - 1e-5)


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_ivf_default_recall_and_speed_on_real_features(tmp_path):
    import time

    from sroc.backbones import BackboneConfig

    train, test, _ = embedded_category(
        SHARED_DATA / "piped", "PA_BDP01_TL", tmp_path / "cache.h5", BackboneConfig()
    )
    ivf = PatchCoreDetector(n_jobs=2).fit(train)
    exact = PatchCoreDetector(index="flat", n_jobs=2).fit(train)
    patches = ivf.patch_features(test)
    queries = patches[np.random.default_rng(0).choice(len(patches), 3000, replace=False)]
    started = time.perf_counter()
    _, exact_ids = exact.kneighbors(queries)
    exact_seconds = time.perf_counter() - started
    started = time.perf_counter()
    _, ivf_ids = ivf.kneighbors(queries)
    ivf_seconds = time.perf_counter() - started
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ivf_ids, exact_ids, strict=True)])
    assert recall >= 0.95, f"recall@5 {recall:.3f} with {ivf.n_lists_} lists, {ivf.n_probes} probes"
    assert ivf_seconds < exact_seconds


def ref_area_average(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Mean of each integer block of (n, C, H, W) maps."""
    n, c, h, w = maps.shape
    blocks = maps.astype(np.float64).reshape(n, c, height, h // height, width, w // width)
    return blocks.mean(axis=(3, 5))


def ref_stage_patches(features, layer_dim=None, grid=(8, 8)):
    """3x3-averaged stages, each optionally pooled to ``layer_dim`` channels, on ``grid``."""
    parts = []
    for maps in features.values():
        maps = ref_average_3x3(maps)
        if layer_dim is not None:
            n, c, h, w = maps.shape
            vectors = maps.transpose(0, 2, 3, 1).reshape(-1, c)
            maps = ref_adaptive_pool(vectors, layer_dim).reshape(n, h, w, -1).transpose(0, 3, 1, 2)
        if maps.shape[2] > grid[0]:
            maps = ref_area_average(maps, *grid)
        parts.append(ref_bilinear_stack(maps, *grid))
    return ref_patches(np.concatenate(parts, axis=1))


@pytest.mark.parametrize("layer_dim, grid_stage", [(8, None), (None, "s2"), (16, "s2")])
def test_patchcore_layer_pooling_and_grid_stage_match_reference(train, test, layer_dim, grid_stage):
    detector = PatchCoreDetector(index="flat", layer_dim=layer_dim, grid_stage=grid_stage)
    scores, maps = detector.fit(train).score(test)
    grid = (8, 8) if grid_stage is None else (4, 4)
    bank = ref_stage_patches(train, layer_dim, grid)
    queries = ref_stage_patches(test, layer_dim, grid)
    expected = []
    for image in queries:
        patch_scores = np.sort(pairwise(image, bank.reshape(-1, bank.shape[-1])), axis=1)
        expected.append(patch_scores[:, :5].mean(axis=1).reshape(grid))
    expected = np.array(expected)
    assert maps.shape == (5, *grid)
    assert_close(maps, expected)
    assert_close(scores, expected.max(axis=(1, 2)))


def test_patchcore_projection_is_seeded_and_searches_projected_patches(train, test):
    detector = PatchCoreDetector(index="flat", projection_dim=7, random_state=4).fit(train)
    projection = detector.projection_
    assert projection.shape == (28, 7)
    assert np.array_equal(
        projection, PatchCoreDetector(projection_dim=7, random_state=4).fit(train).projection_
    )
    bank = ref_patchcore_features(train, 3, None).reshape(-1, 28) @ projection
    expected_scores, expected_maps = ref_patchcore_scores(
        ref_patchcore_features(test, 3, None) @ projection, bank, 5, "euclidean"
    )
    scores, maps = detector.score(test)
    assert_close(scores, expected_scores, rtol=1e-4, atol=1e-5)
    assert_close(maps, expected_maps, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_patchcore_scores_without_maps_equal_those_with(train, test, exclude_self):
    detector = PatchCoreDetector(n_lists=4, n_probes=2, exclude_self=exclude_self).fit(train)
    queries = detector._validate(train if exclude_self else test, fitting=False)
    scores, maps = detector._score(queries, maps=True)
    image_scores, no_maps = detector._score(queries, maps=False)
    assert no_maps is None
    assert np.array_equal(image_scores, scores)
    assert np.array_equal(image_scores, maps.max(axis=(1, 2)))


@pytest.mark.parametrize(
    "n_train, params",
    [
        # 51,200 patches in 679 IVF cells: faiss's k-means on two threads moved centroids by
        # up to 0.12 here (smaller problems happened to agree).
        (200, {"ivf_train_points_per_list": 256, "n_probes": 2}),
        (100, {"coreset_ratio": 0.1, "projection_dim": 16, "n_lists": 16, "n_probes": 2}),
        # Exact search: BLAS splits the candidate products between threads, never their sums.
        (100, {"coreset_ratio": 0.1, "projection_dim": 16, "index": "flat"}),
    ],
)
def test_patchcore_results_do_not_depend_on_the_thread_count(n_train, params):
    shapes = {"s1": (64, 16, 16), "s2": (96, 8, 8)}
    bigger_train = random_features(n_train, seed=7, shapes=shapes)
    bigger_test = random_features(4, seed=8, shapes=shapes)
    fitted = [PatchCoreDetector(n_jobs=n_jobs, **params).fit(bigger_train) for n_jobs in (1, 2)]
    if fitted[0].index == "ivfflat":
        centroids = [d.index_.quantizer.reconstruct_n(0, d.n_lists_) for d in fitted]
        assert np.array_equal(*centroids)
    runs = [detector.score(bigger_test) for detector in fitted]
    assert np.array_equal(runs[0][0], runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1])


# -- patch-level refinement: excluded_patches ---------------------------------------------------


def some_patches(seed: int, n_images: int = 12, share: float = 0.3) -> np.ndarray:
    """A seeded random share of the full bank's rows, plus every patch of images 2 and 7."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(n_images * 64, size=int(share * n_images * 64), replace=False)
    whole = np.concatenate([np.arange(2 * 64, 3 * 64), np.arange(7 * 64, 8 * 64)])
    return np.union1d(rows, whole)


@pytest.mark.parametrize("coreset_ratio", [None, 0.25])
def test_patch_level_bank_never_holds_a_removed_patch(train, coreset_ratio):
    removed = some_patches(seed=9)
    detector = PatchCoreDetector(
        index="flat", coreset_ratio=coreset_ratio, coreset_projection_dim=8,
        excluded_patches=removed,
    ).fit(train)  # fmt: skip
    # Brute force: the patch feature of every (image, location) pair, image-major.
    patches = ref_patchcore_features(train, 3, None)
    pairs = [(i, loc) for i in range(12) for loc in range(64)]
    kept_pairs = [pair for row, pair in enumerate(pairs) if row not in set(removed.tolist())]
    memory = detector.memory_indices_
    assert not set(memory.tolist()) & set(removed.tolist())
    if coreset_ratio is None:
        assert [pairs[row] for row in memory] == kept_pairs
    else:
        assert len(memory) == math.ceil(coreset_ratio * len(kept_pairs))
        assert set(pairs[row] for row in memory) <= set(kept_pairs)
    # Every memory patch is the feature of a kept pair, and every removed feature is absent.
    expected = np.array([patches[pairs[row]] for row in memory])
    assert_close(detector.memory_bank_, expected)
    removed_features = np.array([patches[pairs[row]] for row in removed])
    assert pairwise(removed_features, detector.memory_bank_).min() > 1e-3


def test_patch_level_coreset_selects_among_the_remaining_patches(train):
    removed = some_patches(seed=10)
    params = {"index": "flat", "coreset_ratio": 0.25, "coreset_projection_dim": None}
    detector = PatchCoreDetector(excluded_patches=removed, **params).fit(train)
    remaining = np.setdiff1d(np.arange(12 * 64), removed)
    bank = ref_patchcore_features(train, 3, None).reshape(-1, 28)[remaining]
    # The same seeded start points, drawn among the remaining patches.
    rng = np.random.default_rng(0)
    starts = rng.choice(len(remaining), size=10, replace=False)
    selected = greedy_coreset_indices(bank, math.ceil(0.25 * len(remaining)), starts)
    assert np.array_equal(detector.memory_indices_, remaining[selected])


@pytest.mark.parametrize("index", ["flat", "ivfflat"])
def test_no_removed_patch_fits_as_the_plain_detector(train, test, index):
    plain = PatchCoreDetector(index=index, n_lists=4, coreset_ratio=0.5).fit(train)
    for removed in (None, [], np.array([], dtype=np.int64)):
        refined = PatchCoreDetector(
            index=index, n_lists=4, coreset_ratio=0.5, excluded_patches=removed
        ).fit(train)
        assert np.array_equal(refined.memory_indices_, plain.memory_indices_)
        for a, b in zip(refined.score(test), plain.score(test), strict=True):
            assert np.array_equal(a, b)


def test_removing_whole_images_equals_fitting_without_them(train, test):
    gone = [2, 7, 8]
    rows = np.concatenate([np.arange(i * 64, (i + 1) * 64) for i in gone])
    refined = PatchCoreDetector(index="flat", excluded_patches=rows).fit(train)
    others = [i for i in range(12) if i not in gone]
    without = PatchCoreDetector(index="flat").fit({s: a[others] for s, a in train.items()})
    for a, b in zip(refined.score(test), without.score(test), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("masked", [True, False])
def test_leave_one_image_out_with_removed_patches(train, masked, monkeypatch):
    # Images 2 and 7 have lost every patch, others some: each image's search still skips
    # exactly its own remaining patches.
    monkeypatch.setattr(patchcore, "_MASKED_SEARCH_ENTRIES", 2**26 if masked else 0)
    removed = some_patches(seed=11)
    detector = PatchCoreDetector(index="flat", exclude_self=True, excluded_patches=removed)
    scores, maps = detector.fit(train).score(train)
    remaining = np.setdiff1d(np.arange(12 * 64), removed)
    patches = ref_patchcore_features(train, 3, None)
    own_rows = [np.flatnonzero(remaining // 64 == i) for i in range(12)]
    expected_scores, expected_maps = ref_patchcore_scores(
        patches, patches.reshape(-1, 28)[remaining], 5, "euclidean", own_rows
    )
    assert_close(scores, expected_scores)
    assert_close(maps, expected_maps)


def test_excluded_patches_errors_name_the_problem(train):
    for rows, message in [
        ([12 * 64], r"\[0, 768\)"),
        ([-1], r"\[0, 768\)"),
        ([0.5], "int rows"),
        (np.arange(12 * 64), "removes all 768"),
    ]:
        with pytest.raises(ValueError, match=message):
            PatchCoreDetector(index="flat", excluded_patches=rows).fit(train)
