"""Refinement strategies against independent references: brute-force refits, explicit loops,
and exact rounding with decimals, on small synthetic features with planted polluted images."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pandas as pd
import pytest
from ranking_references import reference_order, reference_tie_key

from sroc.detectors import make_detector
from sroc.metrics import refinement_scores
from sroc.refinement import (
    Ranking,
    consensus_ranking,
    cross_validation_ranking,
    fold_assignment,
    images_of_patches,
    iterative_sroc_ranking,
    kept_positions,
    n_removed,
    patch_removal_order,
    patch_sroc_ranking,
    random_ranking,
    removal_order,
    removed_patches,
    removed_positions,
    sroc_ranking,
    stoc_ranking,
)
from sroc.splits import n_injected

STAGES = {"s1": (6, 8, 8), "s2": (10, 4, 4)}
N_TRAIN, POLLUTION = 50, 0.2
# Defect strength (in units of the noise): SROC with Mahalanobis then finds 98 % of the polluted
# images on average over 30 seeds (90 % at worst), with KNN 96 %: detectable but not trivial.
DEFECT = 2.5
# Small settings so that every detector fits a fold of 10 images in milliseconds.
DETECTOR_PARAMS = {
    "knn": {"n_neighbors": 3},
    "mahalanobis": {},
    "padim": {"n_features": 8},
    "patchcore": {"index": "flat"},
}


def detector(name: str, **params):
    return make_detector(name, **{**DETECTOR_PARAMS[name], **params})


def factory(name: str, **params):
    return lambda: detector(name, **params)


def polluted_features(seed: int, n: int = N_TRAIN, ratio: float = POLLUTION):
    """Gaussian feature maps with anisotropic channels; the first n_injected(n, ratio) images
    carry a defect: a strong random channel direction added on a random 3x3 (s1) / 2x2 (s2)
    region, a different direction and place for each, as defects of mixed types. Image ids are
    shuffled so that id order and position order differ."""
    rng = np.random.default_rng(seed)
    features = {
        name: (
            rng.normal(size=(1, c, 1, 1))
            + rng.uniform(0.5, 2.0, (1, c, 1, 1)) * rng.normal(size=(n, c, h, w))
        ).astype(np.float32)
        for name, (c, h, w) in STAGES.items()
    }
    n_polluted = n_injected(n, ratio)
    for image in range(n_polluted):
        y, x = rng.integers(0, 6, size=2)
        direction = rng.normal(size=6)
        features["s1"][image, :, y : y + 3, x : x + 3] += DEFECT * direction[:, None, None]
        direction = rng.normal(size=10)
        features["s2"][image, :, y // 2 : y // 2 + 2, x // 2 : x // 2 + 2] += (
            DEFECT * direction[:, None, None]
        )
    ids = np.array([f"img{i:03d}" for i in rng.permutation(n)])
    return features, ids, ids[:n_polluted]


def subset(features, positions):
    return {stage: array[np.sort(positions)] for stage, array in features.items()}


class Recording:
    """A real detector that logs which training images it was fitted on and which it scored,
    identified by their feature bytes."""

    def __init__(self, name: str, features, log: list):
        self.detector = detector(name)
        self.position = {features["s1"][i].tobytes(): i for i in range(len(features["s1"]))}
        self.log = log

    def positions(self, features):
        return {self.position[image.tobytes()] for image in features["s1"]}

    def fit(self, features):
        self.fitted = self.positions(features)
        self.detector.fit(features)
        return self

    def score(self, features, maps=True):
        self.log.append((self.fitted, self.positions(features)))
        return self.detector.score(features, maps=maps)


@pytest.fixture(scope="module")
def polluted():
    return polluted_features(seed=3)


# ---------------------------------------------------------------------------------------------
# Patch-level refinement (patch_sroc)
# ---------------------------------------------------------------------------------------------


def reference_loio_patch_scores(features, k=5):
    """Every training patch's mean distance to its k nearest patches of the other images, by
    brute force over PatchCore's patch features (3x3 average, bilinear to the 8x8 grid)."""
    from test_patchcore import ref_patchcore_features, ref_patchcore_scores

    patches = ref_patchcore_features(features, 3, None)
    n = len(patches)
    own = [np.arange(i * 64, (i + 1) * 64) for i in range(n)]
    return ref_patchcore_scores(patches, patches.reshape(n * 64, -1), k, "euclidean", own)[1]


def reference_top_patches(patch_scores, ids, count):
    """The ``count`` highest patches as (image, location) pairs, by Python's sort on
    (-score, the image's tie key, location)."""
    n, height, width = patch_scores.shape
    pairs = [(i, loc) for i in range(n) for loc in range(height * width)]
    flat = patch_scores.reshape(n, -1)
    pairs.sort(key=lambda pair: (-float(flat[pair]), reference_tie_key(ids[pair[0]]), pair[1]))
    return pairs[:count]


def test_patch_sroc_scores_every_patch_leaving_its_image_out(polluted):
    features, ids, _ = polluted
    ranking = patch_sroc_ranking(features, ids, factory("patchcore", exclude_self=True))
    assert ranking.strategy == "patch_sroc" and ranking.n_fits == 1
    assert ranking.patch_scores.shape == (N_TRAIN, 8, 8)
    np.testing.assert_allclose(
        ranking.patch_scores, reference_loio_patch_scores(features), rtol=1e-5, atol=1e-5
    )
    # The image ranking is the highest patch score: sroc_loo's ranking of PatchCore.
    np.testing.assert_array_equal(ranking.scores, ranking.patch_scores.max(axis=(1, 2)))
    loo = sroc_ranking(features, ids, factory("patchcore", exclude_self=True))
    np.testing.assert_array_equal(ranking.scores, loo.scores)
    np.testing.assert_array_equal(ranking.order, loo.order)


@pytest.mark.parametrize("ratio", [0.0, 0.013, 0.05, 0.2, 0.45])
def test_patch_sroc_removes_round_r_p_of_the_highest_patches(polluted, ratio):
    features, ids, _ = polluted
    ranking = patch_sroc_ranking(features, ids, factory("patchcore", exclude_self=True))
    n_patches = N_TRAIN * 64
    rows = removed_patches(ranking.patch_scores, ids, ratio)
    exact = int((Decimal(str(ratio)) * n_patches).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    assert len(rows) == exact
    expected = reference_top_patches(ranking.patch_scores, ids, exact)
    assert [(row // 64, row % 64) for row in rows] == expected
    touched = images_of_patches(rows, ranking.patch_scores.shape)
    assert list(touched) == list(dict.fromkeys(image for image, _ in expected))


def test_patch_removal_ties_are_broken_by_the_image_tie_key_then_location():
    scores = np.zeros((3, 1, 2), dtype=np.float32)
    scores[0, 0, 1] = scores[2, 0, 0] = scores[2, 0, 1] = 1.0
    ids = ["c", "x", "a"]
    expected = sorted(
        range(6), key=lambda row: (-scores.reshape(-1)[row], reference_tie_key(ids[row // 2]), row)
    )
    order = list(patch_removal_order(scores, ids))
    assert order == expected
    assert list(images_of_patches(order[:3], scores.shape)) == list(
        dict.fromkeys(row // 2 for row in order[:3])
    )


def test_patch_sroc_needs_a_leave_one_out_patchcore(polluted):
    features, ids, _ = polluted
    for make in (factory("patchcore"), factory("knn", exclude_self=True)):
        with pytest.raises(ValueError, match="with a patch bank .* and exclude_self=True"):
            patch_sroc_ranking(features, ids, make)


# ---------------------------------------------------------------------------------------------
# Removal counts and tie-breaking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_train", [1, 7, 10, 15, 30, 33, 50, 209])
@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.8])
def test_n_removed_rounds_half_up_like_the_splits(n_train, ratio):
    exact = int((Decimal(str(ratio)) * n_train).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    if exact >= n_train:
        with pytest.raises(ValueError, match="would remove all"):
            n_removed(n_train, ratio)
    else:
        assert n_removed(n_train, ratio) == exact == n_injected(n_train, ratio)


@pytest.mark.parametrize("n_train", [10, 15, 33, 50])
def test_precision_equals_recall_when_the_ratio_is_the_pollution_ratio(n_train):
    ids = np.array([f"im{i}" for i in range(n_train)])
    for p in (0.05, 0.1, 0.15, 0.2):
        polluted = ids[: n_injected(n_train, p)]
        for seed in range(5):
            ranking = random_ranking(ids, rng_seed=seed)
            scores = refinement_scores(ids[removed_positions(ranking, p)], polluted)
            assert scores["precision"] == scores["recall"]


def test_removed_and_kept_positions_split_the_order():
    ids = np.array(["b", "e", "a", "d", "c"])
    ranking = random_ranking(ids, rng_seed=1)
    removed, kept = removed_positions(ranking, 0.5), kept_positions(ranking, 0.5)
    assert list(removed) == list(ranking.order[:3])  # round(2.5) = 3
    assert list(kept) == sorted(ranking.order[3:])
    assert len(removed_positions(ranking, 0.0)) == 0 and len(kept_positions(ranking, 0)) == 5


@pytest.mark.parametrize("tie_seed", [0, 7, 123456789])
def test_ties_are_broken_by_a_seeded_hash_of_the_file_name(tie_seed):
    scores = np.array([1.0, 2.0, 2.0, 0.0, 2.0, 1.0])
    ids = np.array(["f", "c", "a", "b", "e", "d"])
    expected = list(reference_order(scores, ids, tie_seed))
    assert list(removal_order(scores, ids, tie_seed)) == expected
    assert [scores[i] for i in expected] == sorted(scores, reverse=True)
    # A pandas column of str (object dtype) is accepted.
    assert list(removal_order(scores, pd.Series(ids).to_numpy(), tie_seed)) == expected


def tied_cell(healthy_prefix: str):
    """20 training images, 16 healthy in folder ``healthy_prefix`` and 4 polluted in
    test/crack, and two rankings that agree on the rest but rank images 14-19 (two healthy, the
    four polluted) in opposite orders: their consensus ties those six, and removing 4 images
    (r = 0.2) cuts through the tie."""
    ids = np.array(
        [f"{healthy_prefix}/{i:03d}.png" for i in range(16)]
        + [f"test/crack/{i:03d}.png" for i in range(16, 20)]
    )
    top, rest = np.arange(14, 20), np.arange(13, -1, -1)
    rankings = []
    for name, order in (("up", np.r_[top, rest]), ("down", np.r_[top[::-1], rest])):
        scores = np.empty(20)
        scores[order] = np.arange(20, 0, -1)
        rankings.append(Ranking(name, scores, order, 0, 0.0, 0.0))
    return ids, rankings


@pytest.mark.parametrize("tie_seed", [0, 1, 2, 3])
def test_renaming_the_origin_folders_leaves_the_removed_images_unchanged(tie_seed):
    removed = []
    for prefix in ("a_first/good", "train/good", "zz_last/good"):  # healthy ids sort first, last
        ids, rankings = tied_cell(prefix)
        consensus = consensus_ranking(rankings, ids, tie_seed)
        order = consensus.order
        assert len(set(consensus.scores[order[:6]])) == 1  # the cut at r = 0.2 falls in a tie
        removed.append({ids[i].split("/")[-1] for i in order[: n_removed(20, 0.2)]})
    assert removed[0] == removed[1] == removed[2]


def test_ties_do_not_favour_the_polluted_images():
    """Over many cells whose cut falls in a tie, polluted images win the tie about as often as
    their share of the tied images: an id order ("test/" < "train/") would give them all."""
    won, share = [], []
    for tie_seed in range(200):
        ids, rankings = tied_cell("train/good")
        consensus = consensus_ranking(rankings, ids, tie_seed)
        order, scores = consensus.order, consensus.scores
        cut = n_removed(20, 0.2)
        tied = np.flatnonzero(scores == scores[order[cut - 1]])
        inside = [i for i in order[:cut] if i in tied]
        won.append(np.mean([ids[i].startswith("test/") for i in inside]))
        share.append(np.mean([ids[i].startswith("test/") for i in tied]))
    assert abs(np.mean(won) - np.mean(share)) < 0.1


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


def test_sroc_scores_the_training_set_with_the_model_fitted_on_it(polluted):
    features, ids, polluted_ids = polluted
    ranking = sroc_ranking(features, ids, factory("mahalanobis"))
    reference = detector("mahalanobis").fit(features).score(features, maps=False)[0]
    np.testing.assert_array_equal(ranking.scores, reference)
    np.testing.assert_array_equal(ranking.order, reference_order(reference, ids))
    assert (ranking.strategy, ranking.n_fits) == ("sroc", 1)
    assert ranking.scores.dtype == np.float64 and ranking.order.dtype == np.int64
    # At r = p, SROC with Mahalanobis finds at least 80 % of the planted polluted images.
    removed = ids[removed_positions(ranking, POLLUTION)]
    assert refinement_scores(removed, polluted_ids)["recall"] >= 0.8


def test_sroc_reuses_an_already_fitted_detector(polluted):
    features, ids, _ = polluted
    fitted = detector("knn").fit(features)
    reused = sroc_ranking(features, ids, factory("knn"), fitted=fitted)
    fresh = sroc_ranking(features, ids, factory("knn"))
    np.testing.assert_array_equal(reused.scores, fresh.scores)
    assert (reused.n_fits, reused.fit_seconds) == (0, 0.0) and fresh.fit_seconds > 0
    # A model fitted on other images is refused, also when their number is the same: every
    # pollution ratio of a split has the same N.
    other = detector("knn").fit(subset(features, np.arange(20)))
    with pytest.raises(ValueError, match="fitted on other features than these 50 images"):
        sroc_ranking(features, ids, factory("knn"), fitted=other)
    others, _, _ = polluted_features(seed=99)
    same_size = detector("knn").fit(others)
    with pytest.raises(ValueError, match="fitted on other features"):
        sroc_ranking(features, ids, factory("knn"), fitted=same_size)
    # So is a model of another class or other parameters than the factory makes.
    with pytest.raises(ValueError, match="not the one the factory makes"):
        sroc_ranking(features, ids, factory("mahalanobis"), fitted=fitted)
    with pytest.raises(ValueError, match="not the one the factory makes"):
        sroc_ranking(features, ids, factory("knn", n_neighbors=4), fitted=fitted)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sroc_with_mahalanobis_removes_most_polluted_images_at_r_equal_p(seed):
    features, ids, polluted_ids = polluted_features(seed=10 + seed)
    ranking = sroc_ranking(features, ids, factory("mahalanobis"))
    removed = ids[removed_positions(ranking, POLLUTION)]
    assert len(removed) == len(polluted_ids) == 10
    assert refinement_scores(removed, polluted_ids)["recall"] >= 0.8


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_random_removal_precision_averages_the_pollution_ratio(ratio):
    ids = np.array([f"img{i:03d}" for i in range(N_TRAIN)])
    polluted_ids = ids[: n_injected(N_TRAIN, POLLUTION)]
    precision = np.array(
        [
            refinement_scores(ids[removed_positions(random_ranking(ids, s), ratio)], polluted_ids)[
                "precision"
            ]
            for s in range(300)
        ]
    )
    standard_error = precision.std(ddof=1) / np.sqrt(len(precision))
    assert abs(precision.mean() - POLLUTION) <= 3 * standard_error
    assert precision.std() > 0  # the seeds do draw different subsets


def test_fold_assignment_is_a_seeded_balanced_partition():
    for n, s in [(50, 5), (23, 5), (7, 7), (9, 2)]:
        folds = fold_assignment(n, s, rng_seed=4)
        sizes = np.bincount(folds, minlength=s)
        assert sizes.sum() == n and sizes.max() - sizes.min() <= 1 and set(folds) == set(range(s))
        np.testing.assert_array_equal(folds, fold_assignment(n, s, rng_seed=4))
    assert not np.array_equal(fold_assignment(50, 5, 0), fold_assignment(50, 5, 1))


@pytest.mark.parametrize("name", sorted(DETECTOR_PARAMS))
def test_cross_validation_never_scores_an_image_with_a_model_fitted_on_it(polluted, name):
    features, ids, _ = polluted
    log: list = []
    ranking = cross_validation_ranking(
        features, ids, lambda: Recording(name, features, log), n_folds=5, rng_seed=7
    )
    everything = set(range(N_TRAIN))
    assert len(log) == 5 and ranking.n_fits == 5
    held_out = [scored for _, scored in log]
    assert sorted(i for scored in held_out for i in scored) == sorted(everything)
    assert max(map(len, held_out)) - min(map(len, held_out)) <= 1
    for fitted, scored in log:
        assert not fitted & scored and fitted | scored == everything
        # Brute force: a fresh model on the other folds scores the held-out fold identically.
        positions = np.array(sorted(scored))
        reference = detector(name).fit(subset(features, np.array(sorted(fitted))))
        np.testing.assert_allclose(
            ranking.scores[positions],
            reference.score(subset(features, positions), maps=False)[0],
            rtol=1e-12,
        )
    np.testing.assert_array_equal(ranking.order, reference_order(ranking.scores, ids))


@pytest.mark.parametrize("name", sorted(DETECTOR_PARAMS))
def test_stoc_averages_one_model_per_fold_over_all_images(polluted, name):
    features, ids, _ = polluted
    log: list = []
    ranking = stoc_ranking(
        features, ids, lambda: Recording(name, features, log), n_folds=5, rng_seed=7
    )
    everything = set(range(N_TRAIN))
    folds = [fitted for fitted, _ in log]
    assert len(log) == 5 and ranking.n_fits == 5
    assert all(scored == everything for _, scored in log)
    assert sorted(i for fold in folds for i in fold) == sorted(everything)
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    # Brute force: the mean of the scores of fresh models, one per fold.
    reference = np.mean(
        [
            detector(name).fit(subset(features, np.array(sorted(fold)))).score(features)[0]
            for fold in folds
        ],
        axis=0,
    )
    np.testing.assert_allclose(ranking.scores, reference, rtol=1e-12)
    np.testing.assert_array_equal(ranking.order, reference_order(ranking.scores, ids))


def test_seeded_strategies_are_deterministic(polluted):
    features, ids, _ = polluted
    make = factory("mahalanobis")
    runs = {
        "random": lambda seed: random_ranking(ids, seed),
        "cross_validation": lambda seed: cross_validation_ranking(features, ids, make, 5, seed),
        "stoc": lambda seed: stoc_ranking(features, ids, make, 5, seed),
    }
    for strategy, run in runs.items():
        first, again, other = run(0), run(0), run(1)
        assert first.strategy == strategy
        np.testing.assert_array_equal(first.order, again.order)
        np.testing.assert_array_equal(first.scores, again.scores)
        assert not np.array_equal(first.scores, other.scores)


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.4])
def test_iterative_sroc_with_one_step_is_sroc(polluted, ratio):
    features, ids, _ = polluted
    iterative = iterative_sroc_ranking(features, ids, factory("mahalanobis"), ratio, n_steps=1)
    sroc = sroc_ranking(features, ids, factory("mahalanobis"))
    np.testing.assert_array_equal(iterative.scores, sroc.scores)
    np.testing.assert_array_equal(iterative.order, sroc.order)
    assert (iterative.strategy, iterative.n_fits) == ("iterative_sroc", 1)


def reference_iterative(features, ids, name, counts):
    """Refit on the kept images, remove the top ones until each cumulative count is reached."""
    kept, removed, scores = list(range(len(ids))), [], {}
    for count in counts:
        positions = np.array(sorted(kept))
        fitted = detector(name).fit(subset(features, positions))
        step = fitted.score(subset(features, positions), maps=False)[0]
        scores.update(zip(positions.tolist(), step.tolist(), strict=True))
        ranked = sorted(kept, key=lambda i: (-scores[i], reference_tie_key(ids[i])))
        take = count - len(removed)
        removed, kept = removed + ranked[:take], ranked[take:]
    return removed, kept, np.array([scores[i] for i in range(len(ids))])


@pytest.mark.parametrize(
    "name, ratio, n_steps, counts",
    [
        # 20 of 50 in 3 steps: round(20/3) = 7, round(40/3) = 13, then 20.
        ("mahalanobis", 0.4, 3, [7, 13, 20]),
        ("knn", 0.2, 2, [5, 10]),
        # 2 of 50 in 5 steps: 0, 1, 1, 2, 2 cumulative: only two steps remove anything.
        ("mahalanobis", 0.04, 5, [1, 2]),
    ],
)
def test_iterative_sroc_refits_on_what_remains(polluted, name, ratio, n_steps, counts):
    features, ids, _ = polluted
    ranking = iterative_sroc_ranking(features, ids, factory(name), ratio, n_steps)
    removed, kept, scores = reference_iterative(features, ids, name, counts)
    assert ranking.n_fits == len(counts) and len(removed) == n_removed(N_TRAIN, ratio)
    assert list(removed_positions(ranking, ratio)) == removed
    np.testing.assert_allclose(ranking.scores, scores, rtol=1e-12)
    # The kept images follow in the order of their last scores.
    assert list(ranking.order[len(removed) :]) == sorted(
        kept, key=lambda i: (-scores[i], reference_tie_key(ids[i]))
    )
    if name == "mahalanobis":  # the refit moves the mean and covariance: every score changes
        sroc = sroc_ranking(features, ids, factory(name))
        assert not np.isclose(ranking.scores[kept], sroc.scores[kept]).any()


def test_consensus_averages_rank_positions(polluted):
    features, ids, _ = polluted
    rankings = [
        sroc_ranking(features, ids, factory(name)) for name in ("mahalanobis", "knn", "padim")
    ]
    consensus = consensus_ranking(rankings, ids)
    mean_position = {
        image: np.mean([list(r.order).index(image) for r in rankings]) for image in range(N_TRAIN)
    }
    expected = sorted(range(N_TRAIN), key=lambda i: (mean_position[i], reference_tie_key(ids[i])))
    assert list(consensus.order) == expected
    np.testing.assert_allclose(
        consensus.scores, [N_TRAIN - 1 - mean_position[i] for i in range(N_TRAIN)]
    )
    assert consensus.strategy == "consensus" and consensus.n_fits == 3
    assert consensus.fit_seconds == pytest.approx(sum(r.fit_seconds for r in rankings))
    # One ranking is its own consensus.
    np.testing.assert_array_equal(consensus_ranking(rankings[:1], ids).order, rankings[0].order)


def test_consensus_of_opposite_rankings_ties_everywhere_and_orders_by_tie_key():
    ids = np.array(["d", "b", "e", "a", "c"])
    forward = random_ranking(ids, rng_seed=2)
    backward = Ranking("reverse", -forward.scores, forward.order[::-1].copy(), 0, 0.0, 0.0)
    consensus = consensus_ranking([forward, backward], ids, tie_seed=5)
    np.testing.assert_array_equal(consensus.scores, np.full(5, 2.0))
    assert list(consensus.order) == list(reference_order(np.zeros(5), ids, tie_seed=5))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_errors_name_the_problem(polluted):
    features, ids, _ = polluted
    make = factory("mahalanobis")
    for n_folds in (1, N_TRAIN + 1):
        with pytest.raises(ValueError, match=f"n_folds must lie between 2 and .*{n_folds}"):
            cross_validation_ranking(features, ids, make, n_folds=n_folds)
        with pytest.raises(ValueError, match="n_folds"):
            stoc_ranking(features, ids, make, n_folds=n_folds)
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"ratio must lie in \[0, 1\)"):
            n_removed(N_TRAIN, ratio)
    ranking = random_ranking(ids, 0)
    with pytest.raises(ValueError, match="ratio"):
        removed_positions(ranking, 1.0)
    with pytest.raises(ValueError, match="got 49 image_ids for 50 images"):
        sroc_ranking(features, ids[:-1], make)
    with pytest.raises(ValueError, match=r"image_ids repeat: \['img001'\]"):
        sroc_ranking(features, np.array(["img001"] * 2 + list(ids[2:])), make)
    with pytest.raises(ValueError, match="must be strings"):
        random_ranking(np.arange(5), 0)
    with pytest.raises(ValueError, match="different numbers of images"):
        sroc_ranking({"s1": features["s1"], "s2": features["s2"][:-1]}, ids, make)
    with pytest.raises(ValueError, match="non-empty dict"):
        stoc_ranking({}, ids, make)
    with pytest.raises(ValueError, match=r"finite; not finite for images \['b'\]"):
        removal_order(np.array([0.0, np.nan]), ["a", "b"])
    for n_steps in (0, 1.5):
        with pytest.raises(ValueError, match="n_steps must be a positive integer"):
            iterative_sroc_ranking(features, ids, make, 0.2, n_steps)
    with pytest.raises(ValueError, match="ratio"):
        iterative_sroc_ranking(features, ids, make, 1.0, 2)
    with pytest.raises(ValueError, match="at least one ranking"):
        consensus_ranking([], ids)
    with pytest.raises(ValueError, match="different numbers of images"):
        consensus_ranking([ranking, random_ranking(ids[:10], 0)], ids)
    with pytest.raises(ValueError, match="got 10 image_ids for 50 images"):
        consensus_ranking([ranking], ids[:10])
    with pytest.raises(ValueError, match="not a permutation"):
        Ranking("sroc", np.zeros(3), np.array([0, 0, 1]), 1, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# patch_sroc in the grid: ranking job, stored ranking, refinement job
# ---------------------------------------------------------------------------------------------


class StubCell:
    """What sroc.experiment reads of a cell: one fixed training set (whatever the pollution ratio),
    its features by id, and a test set."""

    def __init__(self, features, ids, polluted_ids, test_features):
        self.train = pd.DataFrame({"image_id": ids, "polluted": np.isin(ids, polluted_ids)})
        self._features = features
        self._row = {image_id: row for row, image_id in enumerate(ids)}
        self.test = pd.DataFrame({"image_id": [f"t{i}" for i in range(4)]})
        self.test_ids = self.test["image_id"].to_numpy(dtype=str)
        self.test_features = test_features

    def training_set(self, ratio):
        return self.train

    def features_of(self, image_ids):
        rows = np.array([self._row[i] for i in image_ids])
        return {stage: array[rows] for stage, array in self._features.items()}


class ImageLevelEvaluation:
    needs_maps = False


def test_patch_sroc_grid_refits_without_the_top_patches(polluted, tmp_path):
    from sroc import experiment
    from sroc.config import DetectorSpec
    from sroc.runs import read_rankings, write_scores

    features, ids, polluted_ids = polluted
    test_features = polluted_features(seed=4, n=4)[0]
    cell = StubCell(features, ids, polluted_ids, test_features)
    spec = DetectorSpec("patchcore", {"index": "flat"})
    setup = experiment.RefinementSetup(spec, pollution_ratio=0.2, rng_seed=0)
    _, rankings, _ = experiment.unrefined_runs_and_rankings(
        cell, setup, ImageLevelEvaluation(), [0.2], ["patch_sroc"]
    )
    path = tmp_path / "ranked.h5"
    write_scores(path, {}, rankings=rankings)
    stored = read_rankings(path)["patch_sroc"]
    # The stored patch scores are the leave-one-image-out scores, exactly as computed.
    assert np.array_equal(stored.patch_scores, rankings[0].patch_scores)
    np.testing.assert_allclose(
        stored.patch_scores, reference_loio_patch_scores(features), rtol=1e-5, atol=1e-5
    )
    ratio = 0.1
    (run,) = experiment.refined_runs(
        cell, spec, ImageLevelEvaluation(), {"patch_sroc": stored}, ratio
    )
    count = int((Decimal(str(ratio)) * N_TRAIN * 64).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    top = reference_top_patches(stored.patch_scores, ids, count)
    rows = np.array([image * 64 + location for image, location in top])
    expected = make_detector("patchcore", index="flat", excluded_patches=rows).fit(features)
    assert np.array_equal(run.scores, expected.score(test_features, maps=False)[0])
    # Removed images: those that lost at least one patch.
    assert sorted(run.removed_ids) == sorted({ids[image] for image, _ in top})
    record = run.record()
    assert record["n_removed"] == len({image for image, _ in top}) < N_TRAIN
    assert record["run"] == "patch_sroc/r=0.1"


def test_patch_sroc_runs_for_patchcore_only(polluted):
    from sroc import experiment
    from sroc.config import DetectorSpec
    from sroc.strategies import strategies_for

    strategies = ["sroc", "patch_sroc", "oracle"]
    assert strategies_for("patchcore", strategies) == strategies
    assert strategies_for("knn", strategies) == ["sroc", "oracle"]
    features, ids, polluted_ids = polluted
    cell = StubCell(features, ids, polluted_ids, polluted_features(seed=4, n=4)[0])
    spec = DetectorSpec("knn", {"n_neighbors": 3})
    with pytest.raises(ValueError, match="'patch_sroc'.*patch_bank.*'knn'.*strategies_for"):
        experiment.unrefined_runs_and_rankings(
            cell,
            experiment.RefinementSetup(spec, pollution_ratio=0.2, rng_seed=0),
            ImageLevelEvaluation(),
            [0.2],
            ["patch_sroc"],
        )


# ---------------------------------------------------------------------------------------------
# The grid's strategies against independent computations on a small cell
# ---------------------------------------------------------------------------------------------


class RatioCell(StubCell):
    """A StubCell whose training set depends on the pollution ratio: at ratio 0 the polluted
    images are left out (the robustness curve's clean fit), at any other ratio all are in."""

    def training_set(self, ratio):
        return self.train if ratio > 0 else self.train[~self.train["polluted"]]


def grid_cell(polluted):
    from sroc import experiment
    from sroc.config import DetectorSpec

    features, ids, polluted_ids = polluted
    cell = RatioCell(features, ids, polluted_ids, polluted_features(seed=4, n=4)[0])
    knn, mahalanobis = DetectorSpec("knn", {"n_neighbors": 3}), DetectorSpec("mahalanobis")
    setup = experiment.RefinementSetup(
        knn,
        pollution_ratio=POLLUTION,
        rng_seed=11,
        refiner=mahalanobis,
        consensus=(knn, mahalanobis),
        settings={
            "n_folds": 5,
            "iterative_steps": 3,
            "consensus_rankings": ["sroc_loo"],
            "strategy_params": {},
        },
    )
    return cell, setup


def test_every_image_level_strategy_refits_on_exactly_the_kept_images(polluted):
    from sroc import experiment

    features, ids, _ = polluted
    cell, setup = grid_cell(polluted)
    names = ["sroc", "random", "cross_validation", "stoc", "by_refiner", "sroc_loo", "consensus"]
    _, rankings, curves = experiment.unrefined_runs_and_rankings(
        cell, setup, ImageLevelEvaluation(), [0.0, POLLUTION], names
    )
    assert [name for name, _ in curves] == names
    stored = {ranking.strategy: ranking for ranking in rankings}
    ratio = 0.3
    stored.update(
        {
            r.strategy: r
            for r in experiment.per_ratio_rankings(cell, setup, ["iterative_sroc"], ratio)
        }
    )
    runs = experiment.refined_runs(cell, setup.detector, ImageLevelEvaluation(), stored, ratio)
    assert sorted(run.strategy for run in runs) == sorted([*names, "iterative_sroc"])
    count = n_removed(N_TRAIN, ratio)
    for run in runs:
        removed = set(stored[run.strategy].image_ids[stored[run.strategy].order[:count]])
        assert set(run.removed_ids) == removed, run.strategy
        kept = np.flatnonzero(~np.isin(ids, list(removed)))
        fresh = detector("knn").fit(subset(features, kept))
        expected = fresh.score(cell.test_features, maps=False)[0]
        np.testing.assert_array_equal(run.scores, expected, err_msg=run.strategy)


def test_by_refiner_ranks_with_the_refiners_type_and_sroc_with_the_model_fitted_at_p(polluted):
    from sroc import experiment

    features, ids, _ = polluted
    cell, setup = grid_cell(polluted)
    _, rankings, _ = experiment.unrefined_runs_and_rankings(
        cell, setup, ImageLevelEvaluation(), [0.0, POLLUTION], ["sroc", "by_refiner"]
    )
    stored = {ranking.strategy: ranking for ranking in rankings}
    refiner_scores = detector("mahalanobis").fit(features).score(features, maps=False)[0]
    np.testing.assert_array_equal(stored["by_refiner"].scores, refiner_scores)
    assert stored["by_refiner"].refiner == "mahalanobis"
    # SROC scores the training set at p with the robustness curve's model at p (no new fit):
    # not with the clean model fitted at ratio 0.
    at_p = detector("knn").fit(features).score(features, maps=False)[0]
    np.testing.assert_array_equal(stored["sroc"].scores, at_p)
    assert stored["sroc"].attrs["n_fits"] == 0 and stored["sroc"].refiner == "knn"
    clean = detector("knn").fit(subset(features, np.flatnonzero(~cell.train["polluted"])))
    assert not np.array_equal(stored["sroc"].scores, clean.score(features, maps=False)[0])


def test_sroc_loo_and_consensus_use_leave_one_out_members(polluted):
    from sroc import experiment

    features, ids, _ = polluted
    cell, setup = grid_cell(polluted)
    _, rankings, _ = experiment.unrefined_runs_and_rankings(
        cell, setup, ImageLevelEvaluation(), [POLLUTION], ["sroc_loo", "consensus"]
    )
    stored = {ranking.strategy: ranking for ranking in rankings}
    loo = {
        name: detector(name, exclude_self=True).fit(features).score(features, maps=False)[0]
        for name in ("knn", "mahalanobis")
    }
    np.testing.assert_array_equal(stored["sroc_loo"].scores, loo["knn"])
    positions = np.zeros(N_TRAIN)
    for scores in loo.values():
        order = reference_order(scores, ids, setup.rng_seed)
        positions[order] += np.arange(N_TRAIN)
    np.testing.assert_allclose(stored["consensus"].scores, N_TRAIN - 1 - positions / 2)
    assert stored["consensus"].refiner == "knn+mahalanobis"
    expected = reference_order(stored["consensus"].scores, ids, setup.rng_seed)
    np.testing.assert_array_equal(stored["consensus"].order, expected)


def test_iterative_sroc_targets_the_refinement_ratio_not_the_pollution_ratio(polluted):
    from sroc import experiment

    features, ids, _ = polluted
    cell, setup = grid_cell(polluted)
    for ratio in (0.1, 0.3):
        (ranking,) = experiment.per_ratio_rankings(cell, setup, ["iterative_sroc"], ratio)
        expected = iterative_sroc_ranking(features, ids, factory("knn"), ratio, 3, setup.rng_seed)
        np.testing.assert_array_equal(ranking.order, expected.order)
