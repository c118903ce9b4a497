"""SoftPatch (Jiang et al., NeurIPS 2022): PatchCore with a position-wise noise discriminator.

For each patch position, the N training images' patches there get an outlier score among those
N (:func:`local_outlier_factors`, :func:`nearest_distance_scores` or
:func:`gaussian_distance_scores`); the patches above the (1 - tau) quantile of all N x P scores
never enter the coreset nor the memory bank, and each memory patch keeps its score as a weight
on the distances it gives at scoring time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from sroc.detectors.base import MB, grid_and_dim, n_workers
from sroc.detectors.linalg import inverse_cholesky, ledoit_wolf
from sroc.detectors.neighbours import apply_metric
from sroc.detectors.patchcore import PatchCoreDetector

DISCRIMINATORS = ("lof", "nearest", "gaussian")
# scikit-learn's LocalOutlierFactor adds this to the mean reachability distance, so that a point
# with more than k duplicates gets a large finite density instead of a division by zero.
_LOF_EPSILON = 1e-10
# Candidates per point whose distance is recomputed by direct differences: margin over k for
# the rounding of the fast expansion |x|^2 + |y|^2 - 2 x.y, which selects them.
_CANDIDATE_MARGIN = 4
# The Gaussian discriminator's ridge, relative to a position's mean variance: Ledoit-Wolf
# shrinkage already makes the covariance of N < D patches invertible, except in degenerate sets
# (two patches, or all patches on one line) where its intensity is 0.
_GAUSSIAN_RELATIVE_RIDGE = 1e-6
# Scratch memory of one block of positions (each float64 array of the block stays below it).
_BLOCK_BYTES = 32 * MB


def _nearest_others(points: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_neighbors`` nearest *other* points of every point within its set.

    ``points`` (B, N, D) float64 holds B sets of N points. Returns (Euclidean distances,
    indices), both (B, N, k), ascending, ties broken by index. A point is never its own
    neighbour, but its duplicates are, at distance 0 (scikit-learn's ``kneighbors()`` on the
    training set). Candidates come from the fast expansion; their distances are recomputed by
    direct differences, so that duplicates lie at exactly 0.
    """
    n_sets, n_points, _ = points.shape
    sq_norms = np.einsum("bnd,bnd->bn", points, points)
    approx = np.matmul(points, points.transpose(0, 2, 1))
    approx *= -2.0
    approx += sq_norms[:, :, None]
    approx += sq_norms[:, None, :]
    diagonal = np.arange(n_points)
    approx[:, diagonal, diagonal] = np.inf
    n_candidates = min(n_neighbors + _CANDIDATE_MARGIN, n_points - 1)
    candidates = np.sort(
        np.argpartition(approx, n_candidates - 1, axis=-1)[..., :n_candidates], axis=-1
    )
    sets = np.arange(n_sets)[:, None]
    exact = np.empty(candidates.shape)
    for rank in range(n_candidates):
        difference = points - points[sets, candidates[..., rank]]
        exact[..., rank] = np.einsum("bnd,bnd->bn", difference, difference)
    order = np.argsort(exact, axis=-1, kind="stable")[..., :n_neighbors]
    distances = np.sqrt(np.take_along_axis(exact, order, axis=-1))
    return distances, np.take_along_axis(candidates, order, axis=-1)


def local_outlier_factors(points: np.ndarray, n_neighbors: int) -> np.ndarray:
    """Local Outlier Factor of every point within its set, (B, N) from ``points`` (B, N, D).

    scikit-learn's ``-LocalOutlierFactor(n_neighbors).fit(X).negative_outlier_factor_`` per set:
    k = min(n_neighbors, N - 1) nearest other points; reachability distance of a to a
    neighbour b, max(k-distance of b, d(a, b)); local reachability density, 1 / (mean
    reachability distance + 1e-10); LOF, the mean ratio of the neighbours' densities to the
    point's. About 1 inside a cluster, larger for an isolated point.
    """
    n_points = points.shape[1]
    if n_points < 2:
        raise ValueError(f"the local outlier factor needs at least 2 points, got {n_points}")
    distances, neighbours = _nearest_others(points, min(n_neighbors, n_points - 1))
    sets = np.arange(points.shape[0])[:, None, None]
    k_distances = distances[..., -1]
    reachability = np.maximum(distances, k_distances[sets, neighbours])
    density = 1.0 / (reachability.mean(axis=-1) + _LOF_EPSILON)
    return (density[sets, neighbours] / density[..., None]).mean(axis=-1)


def nearest_distance_scores(points: np.ndarray) -> np.ndarray:
    """Sum of the distances of every point to the 2 nearest points of its set (itself, at 0,
    and the nearest other point), plus 1 as in SoftPatch's code: (B, N) from (B, N, D)."""
    if points.shape[1] < 2:
        raise ValueError(
            f"the nearest-distance score needs at least 2 points, got {points.shape[1]}"
        )
    return _nearest_others(points, 1)[0][..., 0] + 1.0


def gaussian_distance_scores(points: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of every point to the Gaussian fitted on its set, plus 1 (as
    SoftPatch's code): (B, N) from (B, N, D).

    Covariance: Ledoit-Wolf shrinkage (as this project's Mahalanobis and PaDiM detectors; N
    patches in D > N dimensions have a singular sample covariance), plus a ridge of 1e-6 times
    the set's mean variance for the degenerate sets where the shrinkage intensity is 0. A set of
    identical points has distance 0 under any covariance: it gets the identity.
    """
    # Shifted so that each set's first point is the origin (the distances do not change): a set
    # of identical points then has an exact zero mean and covariance, not rounding noise whose
    # own Gaussian would make the points look apart.
    points = points - points[:, :1]
    mean, covariance, _ = ledoit_wolf(points)
    dim = points.shape[-1]
    mean_variance = np.einsum("bii->b", covariance) / dim
    diagonal = np.arange(dim)
    covariance[:, diagonal, diagonal] += (_GAUSSIAN_RELATIVE_RIDGE * mean_variance)[:, None]
    covariance[mean_variance == 0] = np.eye(dim)
    whitening = inverse_cholesky(covariance, "the patches at one position")
    whitened = np.matmul(points - mean[:, None, :], whitening.transpose(0, 2, 1))
    return np.sqrt(np.einsum("bnd,bnd->bn", whitened, whitened)) + 1.0


class SoftPatchDetector(PatchCoreDetector, name="softpatch", label="SoftPatch"):
    """PatchCore trained on noisy data: position-wise noise discrimination, hard removal of the
    noisiest patches and soft weights at scoring (Jiang et al., NeurIPS 2022).

    1. **Noise discriminator.** The full training bank (PatchCore's patch features, after
       ``projection_dim`` when set) holds N images x P positions. At each position, the N
       patches there get an outlier score among those N (``discriminator``): "lof", the Local
       Outlier Factor with ``n_neighbors_lof`` neighbours (scikit-learn's definition); "nearest",
       the distance to the nearest other patch (the sum of the distances to the 2 nearest, one
       being the patch itself) plus 1; "gaussian", the Mahalanobis distance to a Gaussian fitted
       on the N patches (Ledoit-Wolf covariance) plus 1. ``outlier_scores_`` (N, H, W) keeps them.
       The scores are float64 per position; the discriminator runs single-threaded on blocks of
       positions whose size depends on the data only, so they do not depend on ``n_jobs``.
    2. **Hard removal.** The patches whose score lies above the (1 - ``tau``) quantile of all
       N x P scores (``outlier_threshold_``, linear interpolation) never enter the coreset nor
       the memory bank: about ``tau`` of the patches. ``tau=0`` removes none.
    3. **Soft weights** (``soft_weights=True``). Each memory patch keeps its score as a weight
       (``memory_weights_``, aligned with ``memory_bank_``). A test patch's distance to each of
       its ``n_neighbors`` nearest memory patches (found by the unweighted distance) is
       multiplied by that memory patch's weight before the mean: with ``n_neighbors=1``, exactly
       SoftPatch's score, the distance to the matched memory patch times its weight. Image score:
       the maximum weighted patch score.

    With ``tau=0`` and ``soft_weights=False`` it scores exactly as :class:`PatchCoreDetector`
    with the same parameters (tested). The published runs use ``n_neighbors=1``, a 10 % coreset
    and ``tau=0.15`` on 3x3-aggregated WideResNet-50 features; the defaults here follow this
    project's PatchCore (``n_neighbors=5``, no coreset), so that the two differ only by the
    SoftPatch parameters.

    ``excluded_patches`` (patch-level refinement) removes rows in addition: the discriminator and
    its quantile still see all N x P training patches. With ``exclude_self=True`` each training
    image's patches are left out of its own searches, as PatchCore's; the discriminator, fitted
    once on all N images, is not refitted without the image (its other patches' weights and
    removals still saw it).

    Parameters
    ----------
    discriminator : "lof" (default, the paper's best), "nearest" or "gaussian".
    n_neighbors_lof : k of the Local Outlier Factor (6, the published command line's default;
        docs/detectors.md); at most N - 1 is used.
    tau : share of all training patches removed as noise, in [0, 1); 0.15 as published.
    soft_weights : weigh the distances by the matched memory patches' outlier scores.
    Other parameters : as :class:`PatchCoreDetector`.
    """

    # PatchCore's 0.1 plus the discriminator. Measured on one core of the loaded 2-core machine,
    # LOF on 576 positions of 128 dims: 0.5 s for 100 images, 6.4 s for 400 (0.016 s per image,
    # growing linearly with N); "nearest" and "gaussian" cost less. On the synthetic grid's cells
    # the fit plus scoring took as long as PatchCore's, within the noise.
    runtime_seconds_per_image = 0.13

    def __init__(
        self,
        discriminator: str = "lof",
        n_neighbors_lof: int = 6,
        tau: float = 0.15,
        soft_weights: bool = True,
        n_neighbors: int = 5,
        metric: str = "euclidean",
        index: str = "ivfflat",
        n_lists: int | None = None,
        n_probes: int = 40,
        ivf_train_points_per_list: int = 16,
        patch_size: int = 3,
        layer_dim: int | None = None,
        target_dim: int | None = None,
        projection_dim: int | None = None,
        grid_stage: str | None = None,
        upsample: str = "bilinear",
        coreset_ratio: float | None = None,
        coreset_projection_dim: int | None = 128,
        stages: Sequence[str] | None = None,
        exclude_self: bool = False,
        excluded_patches: np.ndarray | Sequence[int] | None = None,
        n_jobs: int | None = None,
        random_state: int | None = 0,
    ):
        super().__init__(
            n_neighbors=n_neighbors,
            metric=metric,
            index=index,
            n_lists=n_lists,
            n_probes=n_probes,
            ivf_train_points_per_list=ivf_train_points_per_list,
            patch_size=patch_size,
            layer_dim=layer_dim,
            target_dim=target_dim,
            projection_dim=projection_dim,
            grid_stage=grid_stage,
            upsample=upsample,
            coreset_ratio=coreset_ratio,
            coreset_projection_dim=coreset_projection_dim,
            stages=stages,
            exclude_self=exclude_self,
            excluded_patches=excluded_patches,
            n_jobs=n_jobs,
            random_state=random_state,
        )
        self.discriminator = discriminator
        self.n_neighbors_lof = n_neighbors_lof
        self.tau = tau
        self.soft_weights = soft_weights

    def _check_params(self, total_dim: int) -> None:
        super()._check_params(total_dim)
        if self.discriminator not in DISCRIMINATORS:
            raise ValueError(
                f"discriminator must be one of {DISCRIMINATORS}, got {self.discriminator!r}"
            )
        if isinstance(self.n_neighbors_lof, bool) or not (
            isinstance(self.n_neighbors_lof, int | np.integer) and self.n_neighbors_lof >= 1
        ):
            raise ValueError(
                f"n_neighbors_lof must be a positive int, got {self.n_neighbors_lof!r}"
            )
        if not 0 <= self.tau < 1:
            raise ValueError(
                f"tau (the share of patches removed) must be in [0, 1), got {self.tau}"
            )

    # -- fit -----------------------------------------------------------------------------------

    def _fit(self, features: dict[str, np.ndarray]) -> None:
        super()._fit(features)
        scores = self.outlier_scores_.reshape(-1)
        self.memory_weights_ = scores[self.memory_indices_].astype(np.float32)

    def _allowed_patches(self, bank: np.ndarray) -> np.ndarray:
        remaining = super()._allowed_patches(bank)
        height, width = self.grid_hw_
        scores = self._outlier_scores(bank.reshape(self.n_train_, height * width, -1))
        self.outlier_scores_ = scores.reshape(self.n_train_, height, width)
        self.outlier_threshold_ = float(np.quantile(scores, 1.0 - self.tau))
        allowed = remaining[scores.reshape(-1)[remaining] <= self.outlier_threshold_]
        if allowed.size == 0:
            raise ValueError(
                f"tau={self.tau} and excluded_patches together remove all {bank.shape[0]} "
                "training patches: lower tau or exclude fewer patches"
            )
        return allowed

    def _outlier_scores(self, by_image: np.ndarray) -> np.ndarray:
        """The discriminator's score of every training patch among the patches at its position:
        (N, P) float64 from the bank as (N images, P positions, D)."""
        n_images, n_positions, dim = by_image.shape
        scores = np.empty((n_positions, n_images))

        def discriminate(block: slice) -> None:
            points = by_image[:, block].transpose(1, 0, 2).astype(np.float64)
            if self.discriminator == "lof":
                scores[block] = local_outlier_factors(points, int(self.n_neighbors_lof))
            elif self.discriminator == "nearest":
                scores[block] = nearest_distance_scores(points)
            else:
                scores[block] = gaussian_distance_scores(points)

        # Single-threaded kernels on blocks fixed by the data: the same numbers for any n_jobs.
        with threadpool_limits(limits=1):
            self._run_chunks(discriminate, n_positions, self._positions_per_block(n_images, dim))
        return scores.T

    def _positions_per_block(self, n_images: int, dim: int) -> int:
        """Positions discriminated at once: a block's largest float64 arrays (points, pairwise
        distances, covariances) stay within _BLOCK_BYTES."""
        per_position = 8 * max(n_images * dim, n_images * n_images, dim * dim)
        return max(1, int(_BLOCK_BYTES // per_position))

    # -- score ---------------------------------------------------------------------------------

    def _patch_scores(self, sq_distances: np.ndarray, ids: np.ndarray) -> np.ndarray:
        if not self.soft_weights:
            return super()._patch_scores(sq_distances, ids)
        distances = apply_metric(sq_distances, self.metric)
        return (distances * self.memory_weights_[ids]).mean(axis=-1)

    # -- memory and FLOP models ----------------------------------------------------------------

    def _estimate_state_mb(self, n_train, n_test, shapes):
        locations, _ = grid_and_dim(shapes)
        # The outlier scores (float64, and their position-major copy) and, per worker, a block's
        # few float64 arrays of _BLOCK_BYTES at most.
        scores_mb = 2 * n_train * locations * 8 / MB
        block_mb = 4 * _BLOCK_BYTES / MB * min(n_workers(self.n_jobs), locations)
        return super()._estimate_state_mb(n_train, n_test, shapes) + scores_mb + block_mb

    def _discriminator_flops(self, n_fit: float) -> float:
        """FLOPs of the discriminator on ``n_fit`` images at every fitted patch position."""
        locations = math.prod(self.grid_hw_)
        dim = int(self.memory_bank_.shape[1])
        if self.discriminator == "gaussian":
            # Scatter matrix and whitening products (2 N D^2 each), Cholesky and triangular
            # inverse (about D^3 together).
            per_position = 4 * n_fit * dim**2 + dim**3
        else:
            # Pairwise products among the N patches; the neighbourhoods cost O(N k D).
            per_position = 2 * n_fit**2 * dim
        return locations * per_position

    def fit_flops(self, shapes, n_fit):
        # PatchCore's model counts the coreset over all patches, not the (1 - tau) share left:
        # an upper bound.
        return super().fit_flops(shapes, n_fit) + self._discriminator_flops(n_fit)

    def score_flops(self, shapes, n_fit, n_score, maps):
        flops = super().score_flops(shapes, n_fit, n_score, maps)
        if self.soft_weights:
            flops += n_score * math.prod(self.grid_hw_) * self.n_neighbors
        return flops
