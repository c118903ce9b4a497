"""PaDiM: one Gaussian per location of the aligned feature grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.linalg.blas import strmm

from sroc.detectors import base
from sroc.detectors.base import (
    IMAGE_CHUNK,
    MB,
    BaseDetector,
    gap_embedding,
    grid_and_dim,
    n_workers,
)
from sroc.detectors.linalg import (
    inverse_cholesky,
    leave_one_out_mahalanobis,
    shrunk_covariance,
)

# Each chunk of locations gets this share of the scratch budget (WORKSPACE_MB), so that a few
# chunks run at once within it; the share, not n_jobs, sets the chunks.
_SCRATCH_SHARES = 8


class PaDiMDetector(BaseDetector, name="padim", label="PaDiM"):
    """One Ledoit-Wolf Gaussian per location of the aligned feature grid (SROC paper, 3.1.3).

    The stages are upsampled to the finest used grid by nearest replication (as PaDiM) and
    concatenated; optionally ``n_features`` channels are drawn at random (PaDiM's reduction,
    seeded by ``random_state``). Map: Mahalanobis distance (sqrt) at each location; image
    score: its maximum.

    Parameters
    ----------
    n_features : number of random channels d, None keeps all (no reduction; see
        docs/detectors.md for the paper's setting).
    stages : stages to use, None for all stages given to fit.
    reg_covar : added to the covariance diagonal after shrinkage (PaDiM's code uses 0.01).
    max_memory_mb : budget for the fitted per-location whitening matrices (H*W*d^2 float32)
        plus the chunked scratch space; fit raises before allocating when it is exceeded.
    random_state : seed of the channel subset.
    exclude_self : score() then expects the training features and scores each image against
        the per-location Gaussians of the other images (leave-one-out, mean, covariance and
        Ledoit-Wolf shrinkage recomputed in closed form, in float64, see
        :func:`sroc.detectors.linalg.leave_one_out_mahalanobis`). The default (False) follows
        the paper.
    n_jobs : as in :class:`KNNDetector`.

    Arithmetic: the per-location sums over images (Gram matrices when fitting, whitening when
    scoring) are float32 matrix products, the dominant cost; their rounding (about 1e-7 of
    the entries) is far below the Ledoit-Wolf shrinkage floor. Means, the shrinkage closed form,
    the Cholesky factors and their inverses L^-1 run in float64, which costs O(H*W*d^3), little
    next to the products, and keeps the inverse accurate for ill-conditioned covariances (d
    close to or above the number of images). Scoring multiplies by the stored L^-1 (float32)
    with BLAS's triangular product (trmm), half the work of a general one. Samples are centred on
    each stage's own grid, before the coarse cells are replicated onto the finest one.
    """

    runtime_seconds_per_image = 0.02
    supports_exclude_self = True

    def __init__(
        self,
        n_features: int | None = None,
        stages: Sequence[str] | None = None,
        reg_covar: float = 0.0,
        max_memory_mb: float = 4096.0,
        random_state: int | None = 0,
        exclude_self: bool = False,
        n_jobs: int | None = None,
    ):
        self.exclude_self = exclude_self
        self.n_features = n_features
        self.stages = stages
        self.reg_covar = reg_covar
        self.max_memory_mb = max_memory_mb
        self.random_state = random_state
        self.n_jobs = n_jobs

    _chunked = True

    def _dimension(self, total: int) -> int:
        if self.n_features is None:
            return total
        if not 1 <= self.n_features <= total:
            raise ValueError(f"n_features={self.n_features} must be in [1, {total}] (or None)")
        return int(self.n_features)

    @staticmethod
    def _location_bytes(dim: int, n_images: int) -> int:
        # Per location of a chunk: the gathered samples and the indexed stage part that is being
        # copied into them (float32), the float32 Gram matrix and the float64 covariance,
        # shrunk copy, factor and inverse.
        return 2 * n_images * dim * 4 + dim * dim * 4 + 4 * dim * dim * 8

    def _chunk_locations(self, dim: int, n_images: int) -> int:
        """Locations per chunk: a fixed share of the scratch budget, independent of n_jobs."""
        chunk_bytes = base.WORKSPACE_MB * MB / _SCRATCH_SHARES
        return max(1, int(chunk_bytes // self._location_bytes(dim, n_images)))

    def _memory_mb(self, locations: int, dim: int, n_images: int) -> tuple[float, float]:
        """Fitted state and scratch: the chunks running at once and the location-major copy of
        the selected channels (at most the features' size, as d <= D)."""
        state = locations * (dim * dim * 4 + dim * 8) / MB
        chunk_locations = min(self._chunk_locations(dim, n_images), locations)
        chunk = chunk_locations * self._location_bytes(dim, n_images)
        workers = n_workers(self.n_jobs)
        return state, (workers * chunk + n_images * locations * dim * 4) / MB

    def _fit(self, features: dict[str, np.ndarray]) -> None:
        locations = self.grid_hw_[0] * self.grid_hw_[1]
        total = sum(features[s].shape[1] for s in self.stages_)
        dim = self._dimension(total)
        state_mb, workspace_mb = self._memory_mb(locations, dim, self.n_train_)
        if state_mb + workspace_mb > self.max_memory_mb:
            per_dim = locations * 4 / MB
            largest = int(math.isqrt(max(0, int((self.max_memory_mb - workspace_mb) / per_dim))))
            raise ValueError(
                f"PaDiM needs {state_mb:.0f} MB for {locations} per-location covariances of "
                f"d={dim} features ({locations} x {dim}^2 float32) plus {workspace_mb:.0f} MB of "
                f"scratch, more than max_memory_mb={self.max_memory_mb:.0f}. Set n_features <= "
                f"{largest} (random channel subset), use fewer or coarser stages, or raise "
                "max_memory_mb"
            )
        if self.exclude_self:
            if self.n_train_ < 3:
                raise ValueError(
                    f"exclude_self needs at least 3 training images, got {self.n_train_}"
                )
            self.train_embeddings_ = gap_embedding(features, self.stages_, self._run_chunks)
        rng = np.random.default_rng(self.random_state)
        self.channels_ = (
            np.arange(total) if dim == total else np.sort(rng.choice(total, dim, replace=False))
        )
        self.whitenings_ = np.empty((locations, dim, dim), dtype=np.float32)
        self.shrinkages_ = np.empty(locations)
        samples = self._location_major(features)
        # Per-cell means of each stage, in float64, before the coarse cells are replicated; the
        # samples are centred on their stage's grid, where they are fewer than after gathering.
        self.cell_means_ = [
            np.einsum("lnc->lc", part, dtype=np.float64) / self.n_train_ for part in samples
        ]
        self._centre(samples)

        def fit_block(block: slice) -> None:
            x = self._gather(samples, block)  # (L, n, d), centred
            scatter = np.matmul(x.transpose(0, 2, 1), x)
            sq_norms = np.einsum("lnd,lnd->ln", x, x).astype(np.float64)
            cov, self.shrinkages_[block] = shrunk_covariance(
                scatter, (sq_norms**2).sum(-1), self.n_train_, self.reg_covar
            )
            inverse_cholesky(
                cov, f"locations {block.start}-{block.stop - 1}", out=self.whitenings_[block]
            )

        self._run_chunks(fit_block, locations, self._chunk_locations(dim, self.n_train_))

    @property
    def means_(self) -> np.ndarray:
        """The Gaussians' means, (H*W, d) float64, from the per-cell means of each stage."""
        return self._gather(self.cell_means_, slice(0, self.grid_hw_[0] * self.grid_hw_[1]))

    def _centre(self, samples: list[np.ndarray]) -> None:
        """Subtract the fitted per-cell means from location-major samples, in place."""
        for part, mean in zip(samples, self.cell_means_, strict=True):
            part -= mean[:, None, :].astype(np.float32)

    def _location_major(self, features: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The selected channels of each stage on the stage's own grid, location-major with the
        channels last: [(h*w, n, c) float32]; copied by chunks of images, in parallel. Each
        location's (n, c) block is then contiguous: its transpose is the column-major matrix
        that BLAS takes without a copy."""
        n_images = next(iter(features.values())).shape[0]
        out, selections, offset = [], [], 0
        for stage in self.stages_:
            _, channels, height, width = features[stage].shape
            local = self.channels_[
                (self.channels_ >= offset) & (self.channels_ < offset + channels)
            ]
            selections.append(local - offset)
            offset += channels
            out.append(np.empty((height * width, n_images, len(local)), dtype=np.float32))

        def copy_block(block: slice) -> None:
            for stage, local, target in zip(self.stages_, selections, out, strict=True):
                part = features[stage][block][:, local]
                target[:, block] = part.reshape(part.shape[0], len(local), -1).transpose(2, 0, 1)

        self._run_chunks(copy_block, n_images, IMAGE_CHUNK)
        return out

    def _gather(self, parts: list[np.ndarray], block: slice) -> np.ndarray:
        """Aligned values of a range of flat locations of the finest grid from per-stage arrays
        indexed by the stage's cells (first axis), concatenated along the channel axis (last):
        each location takes its stage's nearest cell (PaDiM's embedding_concat replicates
        coarse cells)."""
        height, width = self.grid_hw_
        flat = np.arange(block.start, block.stop)
        rows, cols = flat // width, flat % width
        widths = [part.shape[-1] for part in parts]
        out = np.empty((len(flat), *parts[0].shape[1:-1], sum(widths)), dtype=parts[0].dtype)
        offset = 0
        for stage, part, channels in zip(self.stages_, parts, widths, strict=True):
            stage_h, stage_w = self.feature_shapes_[stage][1:]
            if (stage_h, stage_w) == (height, width):
                cells = block  # the finest grid itself: a view, no index
            else:
                cells = ((rows * stage_h) // height) * stage_w + (cols * stage_w) // width
            out[..., offset : offset + channels] = part[cells]
            offset += channels
        return out

    def _score(
        self, features: dict[str, np.ndarray], maps: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        n_images = next(iter(features.values())).shape[0]
        locations = self.grid_hw_[0] * self.grid_hw_[1]
        if self.exclude_self:
            self._check_self_scoring(gap_embedding(features, self.stages_, self._run_chunks))
        samples = self._location_major(features)
        distances = np.empty((locations, n_images), dtype=np.float32)

        def left_out_block(block: slice) -> None:
            x = self._gather(samples, block)  # (L, n, d)
            sq_distances, _ = leave_one_out_mahalanobis(x, self.reg_covar)
            distances[block] = np.sqrt(np.maximum(sq_distances, 0.0))

        def score_block(block: slice) -> None:
            x = self._gather(samples, block)  # (L, n, d), centred
            for location, whitening in zip(x, self.whitenings_[block], strict=True):
                # x W^T in place: W = L^-1 is triangular, so BLAS's trmm does half a product's
                # work; both operands are the column-major transposes of C-ordered blocks.
                strmm(1.0, whitening.T, location.T, lower=0, trans_a=1, overwrite_b=1)
            distances[block] = np.sqrt(np.einsum("lnd,lnd->ln", x, x))

        chunk = self._chunk_locations(len(self.channels_), n_images)
        if self.exclude_self:
            # float64 samples, projections and eigenvectors: about 3x a chunk's usual scratch.
            self._run_chunks(left_out_block, locations, max(1, chunk // 3))
        else:
            self._centre(samples)
            self._run_chunks(score_block, locations, chunk)
        scores = distances.max(axis=0).astype(np.float64)
        if not maps:
            return scores, None
        return scores, np.ascontiguousarray(distances.T).reshape(n_images, *self.grid_hw_)

    def _estimate_state_mb(self, n_train, n_test, shapes):
        locations, total = grid_and_dim(shapes)
        dim = total if self.n_features is None else min(int(self.n_features), total)
        state, workspace = self._memory_mb(locations, dim, max(n_train, n_test))
        # Distances (float32) and the maps, their transposed copy.
        return state + workspace + 2 * n_test * locations * 4 / MB

    def _flop_dim(self, shapes) -> tuple[int, int]:
        """Locations of the grid and the Gaussians' dimension d."""
        locations, channels = grid_and_dim(self.used_shapes(shapes))
        return locations, channels if self.n_features is None else int(self.n_features)

    def fit_flops(self, shapes, n_fit):
        locations, dim = self._flop_dim(shapes)
        return locations * (2 * n_fit * dim**2 + dim**3 / 3)  # covariance and Cholesky

    def score_flops(self, shapes, n_fit, n_score, maps):
        locations, dim = self._flop_dim(shapes)
        return locations * n_score * dim**2  # a triangular product per location; maps come free
