"""Mahalanobis distance on pooled features (Rippel et al.) with Grad-CAM localisation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.linalg import solve_triangular

from sroc.detectors.base import (
    MB,
    BaseDetector,
    gap_embedding,
    gap_pooling_flops,
    grid_and_dim,
    upsample_maps,
)
from sroc.detectors.linalg import (
    cholesky_factors,
    leave_one_out_mahalanobis,
    ledoit_wolf,
    whiten,
)


class MahalanobisDetector(BaseDetector, name="mahalanobis", label="Mahalanobis"):
    """Gaussian on global-average-pooled features, one per stage (SROC paper, 3.1.2).

    Image score: sum over stages of sqrt((g - mu)^T S^-1 (g - mu)), g the GAP of the stage and S
    its Ledoit-Wolf covariance. Map: Grad-CAM of that score with respect to the feature map A of
    ``cam_stage``, the deepest used stage. Because g = mean_ij A[:, i, j], the gradient is analytic:
    d score / d A[c, i, j] = (S^-1 (g - mu))_c / (d * H * W) with d the stage's distance, so the
    Grad-CAM weights are alpha = S^-1 (g - mu) / (d * H * W) and the map is
    ReLU(sum_c alpha_c A[c]), bilinearly upsampled to the finest used grid.

    Parameters
    ----------
    stages : stages to use, None for all stages given to fit.
    cam_stage : stage whose feature map Grad-CAM explains; None takes the deepest used stage
        (the last of the fitted features' stages, Grad-CAM's last convolutional layer). Only that
        stage is accepted: a shallower stage also feeds the deeper stages' distances through
        backbone layers that cached features do not include, so its gradient cannot be computed
        here.
    reg_covar : added to the covariance diagonal after shrinkage (0 = Ledoit-Wolf only).
    exclude_self : score() then expects the training features and scores each image against
        the Gaussian of the other images (leave-one-out: mean, covariance and Ledoit-Wolf
        shrinkage recomputed without it, in closed form, see
        :func:`sroc.detectors.linalg.leave_one_out_mahalanobis`); Grad-CAM follows that
        Gaussian. The default (False) follows the paper.
    n_jobs : as in :class:`KNNDetector`.
    random_state : accepted so that every detector takes the same arguments; unused.
    """

    runtime_seconds_per_image = 0.005
    supports_exclude_self = True

    def __init__(
        self,
        stages: Sequence[str] | None = None,
        cam_stage: str | None = None,
        reg_covar: float = 0.0,
        exclude_self: bool = False,
        n_jobs: int | None = None,
        random_state: int | None = None,
    ):
        self.stages = stages
        self.cam_stage = cam_stage
        self.reg_covar = reg_covar
        self.exclude_self = exclude_self
        self.n_jobs = n_jobs
        self.random_state = random_state

    _chunked = True

    def _fit(self, features: dict[str, np.ndarray]) -> None:
        deepest = [s for s in self.input_stages_ if s in self.stages_][-1]
        if self.cam_stage is not None and self.cam_stage not in self.stages_:
            raise ValueError(f"cam_stage {self.cam_stage!r} is not a used stage: {self.stages_}")
        if self.cam_stage not in (None, deepest):
            raise ValueError(
                f"cam_stage {self.cam_stage!r} is not the deepest used stage ({deepest!r}): the "
                f"image score also depends on {self.cam_stage!r} through the backbone layers that "
                "compute the deeper stages, which cached features do not include, so its "
                f"Grad-CAM cannot be computed here. Use cam_stage=None (or {deepest!r}), or "
                f"stages that end at {self.cam_stage!r}"
            )
        if self.exclude_self and self.n_train_ < 3:
            raise ValueError(f"exclude_self needs at least 3 training images, got {self.n_train_}")
        self.cam_stage_ = deepest
        pooled = self._pooled(features)
        self.train_embeddings_ = np.concatenate([pooled[s] for s in self.stages_], axis=1)
        self.means_, self.choleskys_, self.shrinkages_ = {}, {}, {}
        for stage in self.stages_:
            mean, cov, shrinkage = ledoit_wolf(pooled[stage], self.reg_covar)
            self.means_[stage] = mean
            self.choleskys_[stage] = cholesky_factors(cov, f"stage {stage!r}")
            self.shrinkages_[stage] = float(shrinkage)

    def _pooled(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """GAP vectors of each used stage, float64 (n, C)."""
        embedding = gap_embedding(features, self.stages_, self._run_chunks)
        widths = np.cumsum([features[s].shape[1] for s in self.stages_])[:-1]
        return dict(zip(self.stages_, np.split(embedding, widths, axis=1), strict=True))

    def _score(
        self, features: dict[str, np.ndarray], maps: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        pooled = self._pooled(features)
        distances = self._stage_distances
        if self.exclude_self:
            self._check_self_scoring(np.concatenate([pooled[s] for s in self.stages_], axis=1))
            distances = self._left_out_distances
        per_stage = {stage: distances(pooled[stage], stage) for stage in self.stages_}
        scores = np.zeros(next(iter(features.values())).shape[0])
        for stage in self.stages_:
            scores += per_stage[stage][0]
        if not maps:
            return scores, None
        cam = self._grad_cam(features[self.cam_stage_], per_stage[self.cam_stage_][1])
        return scores, upsample_maps(cam, self.grid_hw_, "bilinear")

    def _stage_distances(self, pooled: np.ndarray, stage: str) -> tuple[np.ndarray, np.ndarray]:
        """Mahalanobis distances (n,) of the pooled features (n, C) and the gradient of the
        distance with respect to them, S^-1 (g - mu) / d, shape (n, C)."""
        centred = pooled - self.means_[stage]
        chol = self.choleskys_[stage]
        whitened = whiten(chol, centred)
        distances = np.sqrt(np.einsum("nc,nc->n", whitened, whitened))
        # S^-1 (g - mu) = L^-T L^-1 (g - mu): a second triangular solve, with L^T.
        precision_centred = solve_triangular(chol, whitened.T, trans="T", lower=True).T
        return distances, _gradient(distances, precision_centred)

    def _left_out_distances(self, pooled: np.ndarray, stage: str) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`_stage_distances`, each training image against the Gaussian of the others."""
        sq_distances, precision_offsets = leave_one_out_mahalanobis(pooled, self.reg_covar)
        distances = np.sqrt(np.maximum(sq_distances, 0.0))
        return distances, _gradient(distances, precision_offsets)

    def grad_cam(self, feature_map: np.ndarray) -> np.ndarray:
        """Grad-CAM maps (n, H, W) float32 of the feature maps of ``cam_stage_``."""
        feature_map = np.asarray(feature_map, dtype=np.float32)
        pooled = feature_map.mean(axis=(2, 3), dtype=np.float64)
        return self._grad_cam(feature_map, self._stage_distances(pooled, self.cam_stage_)[1])

    def _grad_cam(self, feature_map: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        """Grad-CAM maps from the gradients (n, C) of the distance w.r.t. the pooled features."""
        weights = gradients / (feature_map.shape[2] * feature_map.shape[3])
        cam = np.einsum("nc,nchw->nhw", weights, feature_map.astype(np.float64))
        return np.maximum(cam, 0.0).astype(np.float32)

    def _estimate_state_mb(self, n_train, n_test, shapes):
        covariances = sum(chw[0] ** 2 for chw in shapes.values()) * 8 * 3 / MB
        locations, _ = grid_and_dim(shapes)
        return covariances + (n_train + n_test) * locations * 4 * 2 / MB

    def fit_flops(self, shapes, n_fit):
        shapes = self.used_shapes(shapes)
        # Per stage: the covariance of the pooled features and its Cholesky factor.
        return n_fit * gap_pooling_flops(shapes) + sum(
            2 * n_fit * c**2 + c**3 / 3 for c, _, _ in shapes.values()
        )

    def score_flops(self, shapes, n_fit, n_score, maps):
        shapes = self.used_shapes(shapes)
        flops = n_score * gap_pooling_flops(shapes)
        flops += sum(n_score * c**2 for c, _, _ in shapes.values())
        if maps:  # Grad-CAM on the coarsest stage: a second triangular solve and a weighting
            c, h, w = min(shapes.values(), key=lambda chw: chw[1] * chw[2])
            flops += n_score * c**2 + 2 * n_score * c * h * w
        return flops


def _gradient(distances: np.ndarray, precision_offsets: np.ndarray) -> np.ndarray:
    """d distance / d pooled = S^-1 (g - mu) / distance. A zero distance has no defined
    gradient; its Grad-CAM map is then zero."""
    safe = np.where(distances > 0, distances, np.inf)
    return precision_offsets / safe[:, None]
