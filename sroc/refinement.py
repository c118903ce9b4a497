"""Training-set refinement: rank the images of a polluted training set, most anomalous first.

Every strategy returns a :class:`Ranking`: a score for each training image (higher = more
anomalous) and the order in which images are removed. One ranking serves every refinement
ratio: removing a fraction r of N images removes the first ``n_removed(N, r)`` of the order,
rounded like the pollution splits so that precision equals recall at r = p. Ties in scores are
broken by :func:`tie_keys`: a seeded hash of each image's file name, which carries no label (the
ids' folders say where an image comes from, ``train/good/`` or ``test/<defect>/``, and an order
by id would favour the polluted images), so the removal order is deterministic and fair.

Strategies (sections 3.2 and 4.5 of the SROC paper, and extensions):

- ``sroc``: fit on all N images, score the same N (self-scoring).
- ``random``: remove in a seeded random order.
- ``cross_validation``: s disjoint folds; fit on s-1 folds, score the held-out one, so every
  image is scored once, by a model that never saw it.
- ``stoc``: fit one model per fold, score every image with all s models and average (STOC, not
  iterated since the features are frozen).
- ``iterative_sroc``: SROC repeated: remove part of the target, refit on what remains, re-score.
- ``consensus``: average of the rank positions of several rankings (e.g. several detectors').
- ``patch_sroc`` (PatchCore only): rank the training *patches* by their leave-one-image-out
  scores and remove the highest patches from the memory bank rather than whole images, so the
  healthy parts of a defective image stay. Its ranking also carries the patch scores; the images
  are ranked by their highest patch score (the ``sroc_loo`` ranking of PatchCore).
- ``ensemble_oob``: sparse memory ensembles (MeDS step 1): B detectors, each fitted on a random
  fraction of the images; each image scored only by the members that did not see it, the
  members' scores turned into rank positions or z-scores and averaged.

A *detector factory* is a zero-argument callable returning a fresh, unfitted detector
(``sroc.detectors``); rankings only need image scores, so detectors score with ``maps=False``.
Cross-validation and STOC score images a model was not fitted on, so their factories must not
set ``exclude_self``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sroc.detectors import BaseDetector
from sroc.splits import round_half_up

DetectorFactory = Callable[[], BaseDetector]
Features = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Ranking:
    """Scores (N,) float64, higher = more anomalous, and the removal order (N,) int64: positions
    into the training set, most anomalous first. ``n_fits`` detectors were fitted, taking
    ``fit_seconds`` in all; scoring took ``score_seconds``. Patch-level strategies also give
    ``patch_scores`` (N, H, W) float32, every training patch's score on the detector's grid."""

    strategy: str
    scores: np.ndarray
    order: np.ndarray
    n_fits: int
    fit_seconds: float
    score_seconds: float
    patch_scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.scores.shape != (n,) or self.order.shape != (n,):
            raise ValueError(
                f"ranking {self.strategy!r}: scores {self.scores.shape} and order "
                f"{self.order.shape} must both have shape (N,)"
            )
        if not np.array_equal(np.sort(self.order), np.arange(n)):
            raise ValueError(f"ranking {self.strategy!r}: order is not a permutation of 0..{n - 1}")
        if self.patch_scores is not None and (
            self.patch_scores.ndim != 3 or len(self.patch_scores) != n
        ):
            raise ValueError(
                f"ranking {self.strategy!r}: patch_scores {self.patch_scores.shape} must have "
                f"shape (N, H, W) with N = {n}"
            )


def n_removed(n_train: int, ratio: float) -> int:
    """Number of images a refinement ratio removes from ``n_train``: round(ratio * n_train),
    halves rounded up, the rounding of the pollution splits (so that at r = p as many images are
    removed as were injected)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"refinement ratio must lie in [0, 1), got {ratio}")
    count = round_half_up(ratio * n_train)
    if count >= n_train:
        raise ValueError(
            f"refinement ratio {ratio} would remove all {n_train} training images; "
            "choose a smaller ratio"
        )
    return count


def removed_positions(ranking: Ranking, ratio: float) -> np.ndarray:
    """Positions removed at ``ratio``, in removal order (most anomalous first)."""
    return ranking.order[: n_removed(len(ranking.order), ratio)]


def kept_positions(ranking: Ranking, ratio: float) -> np.ndarray:
    """Positions kept at ``ratio``, ascending, so the refined set keeps the training order."""
    return np.sort(ranking.order[n_removed(len(ranking.order), ratio) :])


def tie_keys(image_ids: Sequence[str], tie_seed: int) -> np.ndarray:
    """Two keys per image (N, 2) uint64 that order tied scores without any label: a hash, keyed
    by ``tie_seed``, of the image's file name (the part after the last "/"), then of its whole
    id. The folders of an id name its origin (``train/good/`` or ``test/<defect>/``): the first
    key ignores them, so renaming them changes no order unless two tied images share a file
    name; the second key, a pseudo-random order, decides only those."""
    key = int(tie_seed).to_bytes(8, "little", signed=True)

    def digest(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, key=key).digest())

    ids = _check_ids(image_ids, None)
    return np.array(
        [(digest(str(i).rsplit("/", 1)[-1]), digest(str(i))) for i in ids], dtype=np.uint64
    ).reshape(len(ids), 2)


def removal_order(scores: np.ndarray, image_ids: Sequence[str], tie_seed: int = 0) -> np.ndarray:
    """Positions sorted by score descending, ties broken by :func:`tie_keys` (int64)."""
    scores = np.asarray(scores, dtype=np.float64)
    ids = _check_ids(image_ids, len(scores))
    if not np.isfinite(scores).all():
        bad = ids[~np.isfinite(scores)]
        raise ValueError(f"scores must be finite; not finite for images {bad[:10].tolist()}")
    keys = tie_keys(ids, tie_seed)
    # lexsort sorts by its last key first.
    return np.lexsort((keys[:, 1], keys[:, 0], -scores)).astype(np.int64)


def fold_assignment(n_train: int, n_folds: int, rng_seed: int) -> np.ndarray:
    """Fold (0..n_folds-1) of each of ``n_train`` images: a seeded random partition whose fold
    sizes differ by at most one."""
    if not 2 <= n_folds <= n_train:
        raise ValueError(
            f"n_folds must lie between 2 and the number of training images ({n_train}), "
            f"got {n_folds}"
        )
    folds = np.empty(n_train, dtype=np.int64)
    folds[np.random.default_rng(rng_seed).permutation(n_train)] = np.arange(n_train) % n_folds
    return folds


def sroc_ranking(
    features: Features,
    image_ids: Sequence[str],
    factory: DetectorFactory,
    fitted: BaseDetector | None = None,
    tie_seed: int = 0,
) -> Ranking:
    """SROC (section 3.2): fit a detector on all N training images and score the same images.

    ``fitted`` is a detector that ``factory`` makes, already fitted on exactly these
    ``features`` (e.g. the model of the robustness curve at this pollution ratio); it is reused
    instead of fitting a new one. Ties are broken with ``tie_seed`` (:func:`tie_keys`).
    """
    check_inputs(features, image_ids)
    fit_seconds, n_fits = 0.0, 0
    if fitted is None:
        fitted, fit_seconds = fit_timed(factory, features)
        n_fits = 1
    else:
        _check_reusable(fitted, factory(), features)
    scores, score_seconds = score_timed(fitted, features)
    return Ranking(
        "sroc",
        scores,
        removal_order(scores, image_ids, tie_seed),
        n_fits,
        fit_seconds,
        score_seconds,
    )


def _check_reusable(fitted: BaseDetector, fresh: BaseDetector, features: Features) -> None:
    """A ValueError unless ``fitted`` is what ``fresh`` becomes when fitted on ``features``:
    the same class and hyper-parameters, fitted on these very features."""
    mine, theirs = fitted.get_params(), fresh.get_params()
    same = type(fitted) is type(fresh) and all(
        np.array_equal(mine[key], theirs[key])
        if isinstance(mine[key], np.ndarray) or isinstance(theirs[key], np.ndarray)
        else mine[key] == theirs[key]
        for key in mine
    )
    if not same:
        raise ValueError(
            f"the fitted detector {fitted!r} is not the one the factory makes ({fresh!r}): "
            "pass a detector of the factory's class and parameters, or fitted=None"
        )
    if not fitted.was_fitted_on(features):
        raise ValueError(
            f"the fitted detector {fitted!r} was fitted on other features than these "
            f"{len(next(iter(features.values())))} images: pass the detector fitted on this "
            "training set, or fitted=None"
        )


def patch_sroc_ranking(
    features: Features, image_ids: Sequence[str], factory: DetectorFactory, tie_seed: int = 0
) -> Ranking:
    """Patch-level SROC (PatchCore only): every training patch scored leave-one-image-out.

    ``factory`` must make a detector with a patch memory bank (``has_patch_bank``, e.g.
    :class:`~sroc.detectors.PatchCoreDetector`) and ``exclude_self=True``: it is fitted on all
    N images and scores the same N, each image's patches searched among the other images'
    memory patches. The ranking's ``patch_scores`` are those patch scores (N, H, W); its image
    scores, each image's highest patch score, order the images as ``sroc_loo`` does (they are
    the same numbers). :func:`removed_patches` gives the patches a refinement ratio removes; a
    detector fitted with ``excluded_patches=removed_patches(...)`` keeps every other patch.
    """
    n = len(check_inputs(features, image_ids))
    detector = factory()
    if not type(detector).has_patch_bank or not getattr(detector, "exclude_self", False):
        raise ValueError(
            f"patch_sroc ranks the patches of a memory bank: the factory must make a detector "
            f"with a patch bank (e.g. PatchCoreDetector) and exclude_self=True, got {detector!r}"
        )
    start = time.perf_counter()
    detector.fit(features)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores, maps = detector.score(features, maps=True)
    score_seconds = time.perf_counter() - start
    if len(scores) != n:
        raise ValueError(f"the detector scored {len(scores)} images, not the {n} given")
    return Ranking(
        "patch_sroc",
        np.asarray(scores, dtype=np.float64),
        removal_order(scores, image_ids, tie_seed),
        1,
        fit_seconds,
        score_seconds,
        patch_scores=np.asarray(maps, dtype=np.float32),
    )


def patch_removal_order(
    patch_scores: np.ndarray, image_ids: Sequence[str], tie_seed: int = 0
) -> np.ndarray:
    """Rows of the image-major patch bank (image i, location l: row ``i * H * W + l``) sorted by
    patch score descending, ties broken by the image's :func:`tie_keys`, then by location
    (int64)."""
    patch_scores = np.asarray(patch_scores)
    if patch_scores.ndim != 3:
        raise ValueError(f"patch_scores must have shape (N, H, W), got {patch_scores.shape}")
    n, height, width = patch_scores.shape
    ids = _check_ids(image_ids, n)
    flat = patch_scores.reshape(-1).astype(np.float64)
    if not np.isfinite(flat).all():
        raise ValueError("patch scores must be finite")
    keys = tie_keys(ids, tie_seed)
    locations = height * width
    rows = np.arange(n * locations)
    images = rows // locations
    # lexsort sorts by its last key first.
    return np.lexsort((rows % locations, keys[images, 1], keys[images, 0], -flat)).astype(np.int64)


def removed_patches(
    patch_scores: np.ndarray, image_ids: Sequence[str], ratio: float, tie_seed: int = 0
) -> np.ndarray:
    """Rows of the patch bank removed at ``ratio``: the ``n_removed(N * H * W, ratio)`` highest
    patch scores (round half up, as for images), in removal order."""
    order = patch_removal_order(patch_scores, image_ids, tie_seed)
    return order[: n_removed(len(order), ratio)]


def images_of_patches(rows: np.ndarray, patch_scores_shape: Sequence[int]) -> np.ndarray:
    """Positions of the images that ``rows`` of the patch bank belong to, each once, in the order
    of their first row (for removal-ordered rows: the order the images were first touched)."""
    _, height, width = patch_scores_shape
    images = np.asarray(rows, dtype=np.int64) // (height * width)
    _, first = np.unique(images, return_index=True)
    return images[np.sort(first)]


def random_ranking(image_ids: Sequence[str], rng_seed: int) -> Ranking:
    """Seeded random removal order; the scores are the uniform draws that order it."""
    ids = _check_ids(image_ids, None)
    scores = np.random.default_rng(rng_seed).random(len(ids))
    return Ranking("random", scores, removal_order(scores, ids, rng_seed), 0, 0.0, 0.0)


def cross_validation_ranking(
    features: Features,
    image_ids: Sequence[str],
    factory: DetectorFactory,
    n_folds: int = 5,
    rng_seed: int = 0,
) -> Ranking:
    """Cross-validation (section 4.5): fit on n_folds - 1 folds and score the held-out fold, for
    every fold, so each image is scored once by a model that was not fitted on it."""
    n = len(check_inputs(features, image_ids))
    folds = fold_assignment(n, n_folds, rng_seed)
    scores = np.empty(n, dtype=np.float64)
    fit_seconds = score_seconds = 0.0
    for fold in range(n_folds):
        held_out = np.flatnonzero(folds == fold)
        detector, seconds = fit_timed(
            factory, subset_features(features, np.flatnonzero(folds != fold))
        )
        fit_seconds += seconds
        scores[held_out], seconds = score_timed(detector, subset_features(features, held_out))
        score_seconds += seconds
    return Ranking(
        "cross_validation",
        scores,
        removal_order(scores, image_ids, rng_seed),
        n_folds,
        fit_seconds,
        score_seconds,
    )


def stoc_ranking(
    features: Features,
    image_ids: Sequence[str],
    factory: DetectorFactory,
    n_folds: int = 5,
    rng_seed: int = 0,
) -> Ranking:
    """STOC-style (section 4.5): fit one model on each fold, score all N images with each of the
    n_folds models and average the scores. Not iterated: the features are frozen."""
    n = len(check_inputs(features, image_ids))
    folds = fold_assignment(n, n_folds, rng_seed)
    total = np.zeros(n, dtype=np.float64)
    fit_seconds = score_seconds = 0.0
    for fold in range(n_folds):
        detector, seconds = fit_timed(
            factory, subset_features(features, np.flatnonzero(folds == fold))
        )
        fit_seconds += seconds
        scores, seconds = score_timed(detector, features)
        total += scores
        score_seconds += seconds
    scores = total / n_folds
    return Ranking(
        "stoc",
        scores,
        removal_order(scores, image_ids, rng_seed),
        n_folds,
        fit_seconds,
        score_seconds,
    )


def iterative_sroc_ranking(
    features: Features,
    image_ids: Sequence[str],
    factory: DetectorFactory,
    ratio: float,
    n_steps: int,
    tie_seed: int = 0,
) -> Ranking:
    """SROC in ``n_steps`` steps: each step fits on the images still kept, scores them and
    removes the highest, until n_removed(N, ratio) are removed (after step t, the round-half-up
    of t / n_steps of the target; steps that would remove nothing are skipped).

    The order lists the removed images in removal order, then the kept ones by their last score;
    an image's score is the one it had when it was removed, or its last one if kept. One step is
    SROC. The ranking depends on ``ratio``: ratios above it continue with the last scores.
    """
    ids = check_inputs(features, image_ids)
    n = len(ids)
    if not isinstance(n_steps, int | np.integer) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    target = n_removed(n, ratio)
    cumulative = [round_half_up(step * target / n_steps) for step in range(1, n_steps + 1)]
    # One fit per distinct count; a single fit scores everything when nothing is removed.
    cumulative = sorted(set(cumulative) - {0}) or [0]
    scores = np.empty(n, dtype=np.float64)
    kept = np.arange(n)
    removed: list[np.ndarray] = []
    fit_seconds = score_seconds = 0.0
    for count in cumulative:
        kept_features = subset_features(features, kept)
        detector, seconds = fit_timed(factory, kept_features)
        fit_seconds += seconds
        scores[kept], seconds = score_timed(detector, kept_features)
        score_seconds += seconds
        step_order = kept[removal_order(scores[kept], ids[kept], tie_seed)]
        n_now = count - (n - len(kept))
        removed.append(step_order[:n_now])
        kept = np.sort(step_order[n_now:])
    order = np.concatenate([*removed, kept[removal_order(scores[kept], ids[kept], tie_seed)]])
    return Ranking("iterative_sroc", scores, order, len(cumulative), fit_seconds, score_seconds)


def consensus_ranking(
    rankings: Sequence[Ranking], image_ids: Sequence[str], tie_seed: int = 0
) -> Ranking:
    """Consensus of several rankings of the same training set (e.g. several detectors' SROC
    self-scores): images ordered by their mean rank position, ties broken by :func:`tie_keys`
    (mean positions move in steps of 1 / len(rankings): ties are common).

    The score is N - 1 minus the mean position, so higher is still more anomalous. Fits and
    seconds are summed over the rankings.
    """
    if not rankings:
        raise ValueError("consensus_ranking needs at least one ranking")
    n = len(rankings[0].order)
    if len({len(r.order) for r in rankings}) != 1:
        sizes = [f"{r.strategy}: {len(r.order)}" for r in rankings]
        raise ValueError(f"rankings cover different numbers of images: {sizes}")
    _check_ids(image_ids, n)
    positions = np.zeros(n, dtype=np.float64)
    for ranking in rankings:
        positions[ranking.order] += np.arange(n)
    scores = (n - 1) - positions / len(rankings)
    return Ranking(
        "consensus",
        scores,
        removal_order(scores, image_ids, tie_seed),
        sum(r.n_fits for r in rankings),
        sum(r.fit_seconds for r in rankings),
        sum(r.score_seconds for r in rankings),
    )


def _check_ids(image_ids: Sequence[str], n: int | None) -> np.ndarray:
    """The ids as a 1-D str array, checked: one unique string per image."""
    ids = np.asarray(image_ids)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError(
            f"image_ids must be a non-empty 1-D sequence of str, got shape {ids.shape}"
        )
    if ids.dtype.kind == "O" and all(isinstance(i, str) for i in ids):
        ids = ids.astype(str)  # e.g. a pandas column of str
    if ids.dtype.kind != "U":
        raise ValueError(f"image_ids must be strings (ids sort as text), got dtype {ids.dtype}")
    if n is not None and len(ids) != n:
        raise ValueError(f"got {len(ids)} image_ids for {n} images: give one id per image")
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        raise ValueError(f"image_ids repeat: {unique[counts > 1][:10].tolist()}")
    return ids


def check_inputs(features: Features, image_ids: Sequence[str]) -> np.ndarray:
    """The checked ids, after checking that every stage and the ids agree on the number N of
    training images."""
    if not isinstance(features, Mapping) or not features:
        raise ValueError("features must be a non-empty dict {stage_name: (N, C, H, W) array}")
    counts = {stage: len(array) for stage, array in features.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"feature stages hold different numbers of images: {counts}")
    return _check_ids(image_ids, next(iter(counts.values())))


def subset_features(features: Features, positions: np.ndarray) -> dict[str, np.ndarray]:
    return {stage: array[positions] for stage, array in features.items()}


def fit_timed(factory: DetectorFactory, features: Features) -> tuple[BaseDetector, float]:
    start = time.perf_counter()
    detector = factory().fit(features)
    return detector, time.perf_counter() - start


def score_timed(detector: BaseDetector, features: Features) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    scores, _ = detector.score(features, maps=False)
    return np.asarray(scores, dtype=np.float64), time.perf_counter() - start
