"""PaDiM: one Gaussian per location of the aligned feature grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from sroc.detectors import base
from sroc.detectors.base import _MB, BaseDetector
from sroc.detectors.linalg import cholesky_factors, ledoit_wolf, whiten


class PaDiMDetector(BaseDetector):
    """One Ledoit-Wolf Gaussian per location of the aligned feature grid (SROC paper, 3.1.3).

    The stages are upsampled to the finest used grid by nearest replication (as PaDiM) and
    concatenated; optionally ``n_features`` channels are drawn at random (PaDiM's reduction,
    seeded by ``random_state``). Map: Mahalanobis distance (sqrt) at each location; image
    score: its maximum.

    Parameters
    ----------
    n_features : number of random channels d, None keeps all (no reduction).
    stages : stages to use, None for all stages given to fit.
    reg_covar : added to the covariance diagonal after shrinkage (PaDiM's code uses 0.01).
    max_memory_mb : budget for the fitted per-location Cholesky factors (H*W*d^2 float32)
        plus the chunked scratch space; fit raises before allocating when it is exceeded.
    random_state : seed of the channel subset.
    map_size, map_sigma, n_jobs : as in :class:`KNNDetector`.
    """

    def __init__(
        self,
        n_features: int | None = None,
        stages: Sequence[str] | None = None,
        reg_covar: float = 0.0,
        max_memory_mb: float = 4096.0,
        random_state: int | None = 0,
        map_size: int | Sequence[int] | None = None,
        map_sigma: float = 4.0,
        n_jobs: int | None = None,
    ):
        self.n_features = n_features
        self.stages = stages
        self.reg_covar = reg_covar
        self.max_memory_mb = max_memory_mb
        self.random_state = random_state
        self.map_size = map_size
        self.map_sigma = map_sigma
        self.n_jobs = n_jobs

    def _dimension(self, total: int) -> int:
        if self.n_features is None:
            return total
        if not 1 <= self.n_features <= total:
            raise ValueError(f"n_features={self.n_features} must be in [1, {total}] (or None)")
        return int(self.n_features)

    def _chunk_locations(self, dim: int, n_images: int) -> int:
        # float64 per location: covariance, Cholesky factor, identity and inverse (4 d^2) plus
        # the samples and their centred copy (2 n d).
        per_location = (4 * dim * dim + 2 * n_images * dim) * 8
        return max(1, int(base.WORKSPACE_MB * _MB // per_location))

    def _memory_mb(self, locations: int, dim: int, n_images: int) -> tuple[float, float]:
        state = locations * (dim * dim + dim) * 4 / _MB
        per_location = (4 * dim * dim + 2 * n_images * dim) * 8 / _MB
        return state, max(base.WORKSPACE_MB, per_location)

    def _fit(self, features: dict[str, np.ndarray]) -> None:
        locations = self.grid_hw_[0] * self.grid_hw_[1]
        total = sum(features[s].shape[1] for s in self.stages_)
        dim = self._dimension(total)
        state_mb, workspace_mb = self._memory_mb(locations, dim, self.n_train_)
        if state_mb + workspace_mb > self.max_memory_mb:
            per_dim = locations * 4 / _MB
            largest = int(math.isqrt(max(0, int((self.max_memory_mb - workspace_mb) / per_dim))))
            raise ValueError(
                f"PaDiM needs {state_mb:.0f} MB for {locations} per-location covariances of "
                f"d={dim} features ({locations} x {dim}^2 float32) plus {workspace_mb:.0f} MB of "
                f"scratch, more than max_memory_mb={self.max_memory_mb:.0f}. Set n_features <= "
                f"{largest} (random channel subset), use fewer or coarser stages, or raise "
                "max_memory_mb"
            )
        rng = np.random.default_rng(self.random_state)
        self.channels_ = (
            np.arange(total) if dim == total else np.sort(rng.choice(total, dim, replace=False))
        )
        self.means_ = np.empty((locations, dim))
        self.choleskys_ = np.empty((locations, dim, dim), dtype=np.float32)
        self.shrinkages_ = np.empty(locations)
        step = self._chunk_locations(dim, self.n_train_)
        for start in range(0, locations, step):
            block = slice(start, min(start + step, locations))
            samples = self._location_features(features, block)  # (L, n, d)
            mean, cov, shrinkage = ledoit_wolf(samples, self.reg_covar)
            self.means_[block] = mean
            self.choleskys_[block] = cholesky_factors(
                cov, f"locations {block.start}-{block.stop - 1}"
            )
            self.shrinkages_[block] = shrinkage

    def _location_features(self, features: dict[str, np.ndarray], block: slice) -> np.ndarray:
        """Aligned, channel-subset features of a range of flat locations: (L, n, d) float64.

        Gathering the nearest source cell per stage avoids materialising the whole aligned
        (n, D, H, W) array, whose size would otherwise add to the covariances'."""
        height, width = self.grid_hw_
        flat = np.arange(block.start, block.stop)
        rows, cols = flat // width, flat % width
        parts = []
        for stage in self.stages_:
            stage_h, stage_w = features[stage].shape[2:]
            parts.append(
                features[stage][:, :, (rows * stage_h) // height, (cols * stage_w) // width]
            )
        stacked = np.concatenate(parts, axis=1)[:, self.channels_]  # (n, d, L)
        return stacked.transpose(2, 0, 1).astype(np.float64)

    def _score(self, features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        n_images = next(iter(features.values())).shape[0]
        locations = self.grid_hw_[0] * self.grid_hw_[1]
        distances = np.empty((locations, n_images))
        step = self._chunk_locations(len(self.channels_), n_images)
        for start in range(0, locations, step):
            block = slice(start, min(start + step, locations))
            centred = self._location_features(features, block) - self.means_[block, None, :]
            whitened = whiten(self.choleskys_[block], centred.astype(np.float32))
            distances[block] = np.sqrt(np.einsum("lnd,lnd->ln", whitened, whitened))
        maps = distances.T.reshape(n_images, *self.grid_hw_)
        return maps.max(axis=(1, 2)), maps

    def _estimate_state_mb(self, n_train, n_test, shapes):
        locations, total = self._grid_and_dim(shapes)
        dim = total if self.n_features is None else min(int(self.n_features), total)
        state, workspace = self._memory_mb(locations, dim, max(n_train, n_test))
        return state + workspace + n_test * locations * 8 / _MB


