"""Shallow one-class detectors on frozen CNN features (section 3.1 of the SROC paper).

Every detector follows scikit-learn conventions: hyper-parameters in ``__init__``, fitted state
in attributes ending with ``_``. ``fit(features)`` takes the cached feature maps of the training
images, ``score(features)`` returns ``(image_scores (n,) float64, maps (n, h, w) float32)``.
``features`` is a dict ``{stage_name: array (n_images, C, H, W)}`` ordered from the finest to the
coarsest stage. Nothing here runs the backbone.

Anomaly maps are returned on the finest grid among the stages a detector uses (48x48 for
tf_efficientnet_lite2 at 380 px), unsmoothed, unless ``map_size`` is set; the evaluation brings
them to ground-truth size with :func:`resize_maps` (see docs/detectors.md for the smoothing).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

# Resident memory of a Python process that imported numpy, torch, faiss, scikit-learn and h5py
# (measured: about 640 MB); added to every estimate so the workflow can declare mem_mb directly.
INTERPRETER_OVERHEAD_MB = 700.0
# Scratch memory that chunked computations aim to stay under.
WORKSPACE_MB = 256.0
# Images processed at once where whole images are aligned or turned into patch features.
_IMAGE_CHUNK = 16
# Query patches searched at once by PatchCore.
_QUERY_CHUNK = 8192
_MB = 1024.0**2
_METRICS = ("euclidean", "sqeuclidean")
_UPSAMPLE_MODES = ("nearest", "bilinear")


# ---------------------------------------------------------------------------------------------
# Map post-processing
# ---------------------------------------------------------------------------------------------


def _as_hw(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        size = (int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {size!r}")
    return size


def resize_maps(
    maps: np.ndarray, out_hw: int | Sequence[int], sigma: float | Sequence[float] = 0.0
) -> np.ndarray:
    """Bilinearly resize anomaly maps, then smooth them with a Gaussian.

    Parameters
    ----------
    maps : array (n, h, w)
    out_hw : int or (height, width) of the output maps.
    sigma : Gaussian standard deviation in *output* pixels, one value or (sigma_y, sigma_x);
        0 disables smoothing. Use :func:`scale_sigma` to convert a sigma stated at the backbone
        input size (PaDiM and PatchCore use 4 px) to the output size.

    Bilinear interpolation uses half-pixel centres (``align_corners=False``, as torch, PaDiM and
    PatchCore); the Gaussian is scipy's ``gaussian_filter`` (mirror borders, truncated at 4
    sigma), the filter PaDiM and PatchCore apply.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (n, h, w), got {maps.shape}")
    out_hw = _as_hw(out_hw, "out_hw")
    sigma_yx = (float(sigma), float(sigma)) if np.isscalar(sigma) else tuple(map(float, sigma))
    if len(sigma_yx) != 2 or min(sigma_yx) < 0:
        raise ValueError(f"sigma must be >= 0, one value or a (y, x) pair, got {sigma!r}")
    if maps.shape[1:] == out_hw:
        resized = maps.copy()
    else:
        resized = F.interpolate(
            torch.from_numpy(maps)[:, None], size=out_hw, mode="bilinear", align_corners=False
        )[:, 0].numpy()
    if max(sigma_yx) > 0:
        resized = gaussian_filter(resized, sigma=(0.0, *sigma_yx), mode="reflect", truncate=4.0)
    return resized


def scale_sigma(
    sigma_input_px: float, input_size: int | Sequence[int], out_hw: int | Sequence[int]
) -> tuple[float, float]:
    """Convert a smoothing sigma stated at the backbone input size to output pixels.

    The backbone sees every image resized to ``input_size`` without keeping the aspect ratio, so
    a Gaussian of ``sigma_input_px`` there covers ``sigma_input_px * out_h / in_h`` rows and
    ``sigma_input_px * out_w / in_w`` columns of a map of size ``out_hw``: e.g. 4 px at 380 px is
    (5.05, 5.05) px on a 480x480 ground truth and 0.505 cells on the 48x48 feature grid.
    """
    in_h, in_w = _as_hw(input_size, "input_size")
    out_h, out_w = _as_hw(out_hw, "out_hw")
    return sigma_input_px * out_h / in_h, sigma_input_px * out_w / in_w


# ---------------------------------------------------------------------------------------------
# Shared numerical building blocks
# ---------------------------------------------------------------------------------------------


def ledoit_wolf(x: np.ndarray, reg_covar: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ledoit-Wolf shrunk covariance of a batch of sample sets, in float64.

    ``x`` has shape (..., n_samples, n_features); returns ``(mean (..., d), covariance (..., d,
    d), shrinkage (...))``. The closed form is scikit-learn's ``ledoit_wolf`` (maximum-likelihood
    covariance S, target mu*I with mu = trace(S)/d), vectorised over the leading axes, so PaDiM
    can fit thousands of per-location Gaussians in a few matrix products. ``reg_covar`` is added
    to the diagonal afterwards (0 keeps the estimator exact; PaDiM's original code adds 0.01).
    """
    x = torch.as_tensor(np.asarray(x, dtype=np.float64))
    n_samples, n_features = x.shape[-2:]
    if n_samples < 2:
        raise ValueError(f"a covariance needs at least 2 training samples, got {n_samples}")
    mean = x.mean(dim=-2)
    centred = x - mean[..., None, :]
    emp_cov = torch.matmul(centred.mT, centred) / n_samples
    trace = torch.diagonal(emp_cov, dim1=-2, dim2=-1).sum(-1)
    mu = trace / n_features
    cov_sq_sum = (emp_cov**2).sum(dim=(-2, -1))
    # sum_{i,j} (X^2)^T X^2 = sum_k ||x_k||^4: the fourth-moment term of the shrinkage intensity.
    fourth = ((centred**2).sum(-1) ** 2).sum(-1)
    beta = (fourth / n_samples - cov_sq_sum) / (n_features * n_samples)
    delta = (cov_sq_sum - 2.0 * mu * trace + n_features * mu**2) / n_features
    beta = torch.minimum(beta, delta)
    shrinkage = torch.where(delta > 0, beta / torch.where(delta > 0, delta, 1.0), 0.0)
    if n_features == 1:
        shrinkage = torch.zeros_like(shrinkage)
    cov = (1.0 - shrinkage)[..., None, None] * emp_cov
    torch.diagonal(cov, dim1=-2, dim2=-1).add_((shrinkage * mu)[..., None] + reg_covar)
    return mean.numpy(), cov.numpy(), shrinkage.numpy()


def cholesky_factors(cov: np.ndarray, what: str) -> np.ndarray:
    """Lower Cholesky factors L of covariances C = L L^T (batched, float64), so that the
    Mahalanobis distance is ||L^-1 (x - mu)||, a sum of squares that cannot go negative."""
    chol, info = torch.linalg.cholesky_ex(torch.as_tensor(cov))
    if bool((info != 0).any()):
        raise ValueError(
            f"the covariance of {what} is singular (constant features and no shrinkage); set "
            "reg_covar > 0 (e.g. 0.01 as PaDiM) or use fewer features"
        )
    return chol.numpy()


def whiten(chol: np.ndarray, centred: np.ndarray) -> np.ndarray:
    """z = L^-1 x for rows x of ``centred`` (..., m, d), with L (..., d, d) lower triangular:
    ||z|| is the Mahalanobis distance. A triangular solve costs what a product with a stored
    inverse would, without forming the inverse."""
    solved = torch.linalg.solve_triangular(
        torch.as_tensor(chol), torch.as_tensor(centred).mT, upper=False
    )
    return solved.mT.numpy()


def greedy_coreset_indices(
    points: np.ndarray, n_select: int, start_indices: np.ndarray
) -> np.ndarray:
    """Greedy k-center selection as in PatchCore's ``ApproximateGreedyCoresetSampler``.

    Every point starts with its mean Euclidean distance to the ``start_indices`` points (the
    approximation that avoids a full distance matrix); each step selects the point farthest from
    the current selection and lowers the distances to it. Returns the selected indices, sorted.
    """
    points = np.asarray(points, dtype=np.float32)
    sq_norms = np.einsum("nd,nd->n", points, points)

    def distances_to(index: int) -> np.ndarray:
        sq = sq_norms - 2.0 * (points @ points[index]) + sq_norms[index]
        return np.sqrt(np.maximum(sq, 0.0))

    min_distance = np.mean([distances_to(i) for i in start_indices], axis=0)
    selected = np.empty(n_select, dtype=np.int64)
    for step in range(n_select):
        farthest = int(np.argmax(min_distance))
        selected[step] = farthest
        np.minimum(min_distance, distances_to(farthest), out=min_distance)
    return np.sort(selected)


def _check_metric(metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")


def _apply_metric(sq_distances: np.ndarray, metric: str) -> np.ndarray:
    return np.sqrt(sq_distances) if metric == "euclidean" else sq_distances


def _nearest_sq_distances(
    queries: np.ndarray, base: np.ndarray, n_neighbors: int, excluded: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by brute force: (squared distances, indices), ascending.

    Candidates come from the fast expansion |q|^2 + |b|^2 - 2 q.b, whose rounding error is large
    for near-identical vectors; the kept distances are then recomputed from direct differences,
    so a training image scored against itself gets exactly 0. ``excluded`` (n_queries, n_base)
    marks pairs that may not be neighbours.
    """
    n_candidates = min(n_neighbors + 4, base.shape[0])
    base_tensor = torch.from_numpy(np.ascontiguousarray(base))
    base_sq_norms = (base_tensor**2).sum(1)
    sq_distances = np.empty((queries.shape[0], n_neighbors), dtype=queries.dtype)
    indices = np.empty((queries.shape[0], n_neighbors), dtype=np.int64)
    # Row blocks keep the (rows x n_base) candidate matrix within the scratch budget.
    step = max(1, int(WORKSPACE_MB * _MB // (base.shape[0] * 8)))
    for start in range(0, queries.shape[0], step):
        block = slice(start, start + step)
        rows = np.ascontiguousarray(queries[block])
        rows_tensor = torch.from_numpy(rows)
        # In place: one (rows x n_base) matrix at a time.
        approx = (rows_tensor @ base_tensor.T).mul_(-2.0)
        approx.add_((rows_tensor**2).sum(1)[:, None]).add_(base_sq_norms)
        if excluded is not None:
            approx[torch.from_numpy(excluded[block])] = torch.inf
        # torch.topk is much faster than np.argpartition on wide rows.
        candidates = torch.topk(approx, n_candidates, dim=1, largest=False).indices.numpy()
        diff = rows[:, None, :] - base[candidates]
        exact = np.einsum("qkd,qkd->qk", diff, diff)
        if excluded is not None:
            exact[np.take_along_axis(excluded[block], candidates, axis=1)] = np.inf
        order = np.argsort(exact, axis=1, kind="stable")[:, :n_neighbors]
        sq_distances[block] = np.take_along_axis(exact, order, axis=1)
        indices[block] = np.take_along_axis(candidates, order, axis=1)
    return sq_distances, indices


def _nearest_grid_indices(out_size: int, in_size: int) -> np.ndarray:
    """Source rows of nearest-neighbour upsampling: each coarse cell is replicated into a block,
    as PaDiM's embedding_concat does for the integer strides of a CNN pyramid."""
    return (np.arange(out_size) * in_size) // out_size


def _upsample(maps: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Upsample (n, C, h, w) maps to ``size`` by nearest replication or bilinear interpolation."""
    if tuple(maps.shape[-2:]) == size:
        return maps
    if mode == "nearest":
        rows = torch.from_numpy(_nearest_grid_indices(size[0], maps.shape[-2]))
        cols = torch.from_numpy(_nearest_grid_indices(size[1], maps.shape[-1]))
        return maps[:, :, rows[:, None], cols[None, :]]
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def align_stages(
    features: Mapping[str, np.ndarray], stages: Sequence[str], mode: str = "nearest"
) -> np.ndarray:
    """Upsample the given stages to the finest grid among them and concatenate their channels.

    Returns float32 (n, sum of C, H, W), channels in the order of ``stages``. ``mode`` is
    "nearest" (PaDiM) or "bilinear" with half-pixel centres (PatchCore).
    """
    if mode not in _UPSAMPLE_MODES:
        raise ValueError(f"upsample mode must be one of {_UPSAMPLE_MODES}, got {mode!r}")
    grid = max((features[s].shape[-2:] for s in stages), key=lambda hw: hw[0] * hw[1])
    grid = (int(grid[0]), int(grid[1]))
    parts = [
        _upsample(torch.from_numpy(np.asarray(features[s], dtype=np.float32)), grid, mode)
        for s in stages
    ]
    return torch.cat(parts, dim=1).numpy()


@contextlib.contextmanager
def _thread_limit(n_jobs: int | None) -> Iterator[None]:
    """Limit BLAS, torch and faiss threads to ``n_jobs`` (None leaves the libraries' defaults)."""
    if n_jobs is None:
        yield
        return
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be a positive int or None, got {n_jobs}")
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(n_jobs)
    faiss.omp_set_num_threads(n_jobs)
    try:
        with threadpool_limits(limits=n_jobs):
            yield
    finally:
        torch.set_num_threads(torch_threads)
        faiss.omp_set_num_threads(faiss_threads)


# ---------------------------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------------------------


class BaseDetector(BaseEstimator):
    """Common input checking, stage selection and map post-processing.

    Subclasses implement ``_fit(features)`` and ``_score(features) -> (scores, maps)`` with maps
    on the finest used grid, and ``_estimate_state_mb``.
    """

    stages: Sequence[str] | None
    map_size: int | Sequence[int] | None
    map_sigma: float
    n_jobs: int | None

    def fit(self, features: Mapping[str, np.ndarray]) -> BaseDetector:
        self._is_fitted = False  # a failed fit leaves the detector unfitted
        features = self._validate(features, fitting=True)
        if self.n_train_ < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 training images, got 1")
        with _thread_limit(self.n_jobs):
            self._fit(features)
        self._is_fitted = True
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return getattr(self, "_is_fitted", False)

    def score(self, features: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Return image scores (n,) float64 and anomaly maps (n, h, w) float32; the maps are on
        the finest used feature grid, or resized to ``map_size`` and smoothed by ``map_sigma``."""
        check_is_fitted(self, msg=f"{type(self).__name__} is not fitted: call fit(features) first")
        features = self._validate(features, fitting=False)
        with _thread_limit(self.n_jobs):
            scores, maps = self._score(features)
        if self.map_size is not None:
            maps = resize_maps(maps, self.map_size, self.map_sigma)
        return np.asarray(scores, dtype=np.float64), np.asarray(maps, dtype=np.float32)

    def _validate(self, features: Mapping[str, np.ndarray], fitting: bool) -> dict[str, np.ndarray]:
        if not isinstance(features, Mapping) or not features:
            raise ValueError("features must be a non-empty dict {stage_name: (n, C, H, W) array}")
        if fitting:
            stages = list(features) if self.stages is None else list(self.stages)
            if not stages:
                raise ValueError("stages must name at least one stage (or be None for all)")
        else:
            stages = self.stages_
        missing = [s for s in stages if s not in features]
        if missing:
            raise ValueError(
                f"features lack stage(s) {missing}; available: {list(features)}. Pass features "
                "from the same backbone configuration, or choose stages among the available ones"
            )
        arrays = {s: np.asarray(features[s], dtype=np.float32) for s in stages}
        counts = {s: a.shape[0] if a.ndim == 4 else None for s, a in arrays.items()}
        for s, a in arrays.items():
            if a.ndim != 4 or a.shape[0] == 0:
                raise ValueError(f"features[{s!r}] must have shape (n>0, C, H, W), got {a.shape}")
            if not np.isfinite(a).all():
                raise ValueError(f"features[{s!r}] contains NaN or infinite values")
        if len(set(counts.values())) != 1:
            raise ValueError(f"stages hold different numbers of images: {counts}")
        shapes = {s: a.shape[1:] for s, a in arrays.items()}
        if fitting:
            self.stages_ = stages
            self.feature_shapes_ = shapes
            self.n_train_ = next(iter(counts.values()))
            grid = max(shapes.values(), key=lambda chw: chw[1] * chw[2])
            self.grid_hw_ = (grid[1], grid[2])
        elif shapes != self.feature_shapes_:
            raise ValueError(
                f"feature shapes {shapes} differ from those seen in fit {self.feature_shapes_}: "
                "score features of the same backbone configuration as the training features"
            )
        return arrays

    def estimate_memory_mb(
        self, n_train: int, n_test: int, feature_shapes: Mapping[str, Sequence[int]]
    ) -> float:
        """Peak resident memory (MB) of fit on ``n_train`` plus score of ``n_test`` images:
        interpreter, both feature sets as float32, the fitted state and the scratch space."""
        stages = list(feature_shapes) if self.stages is None else list(self.stages)
        shapes = {s: tuple(int(v) for v in feature_shapes[s]) for s in stages}
        input_mb = (n_train + n_test) * sum(math.prod(chw) for chw in shapes.values()) * 4 / _MB
        # Input checking makes a boolean copy of one stage at a time.
        check_mb = max(n_train, n_test) * max(math.prod(chw) for chw in shapes.values()) / _MB
        detector_mb = check_mb + self._estimate_state_mb(n_train, n_test, shapes)
        return INTERPRETER_OVERHEAD_MB + input_mb + detector_mb

    @staticmethod
    def _grid_and_dim(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
        """Number of locations on the finest grid and the concatenated channel count."""
        grid = max(shapes.values(), key=lambda chw: chw[1] * chw[2])
        return grid[1] * grid[2], sum(chw[0] for chw in shapes.values())

    def _check_self_scoring(self, embeddings: np.ndarray) -> None:
        """With exclude_self, score() must receive the training features themselves."""
        if embeddings.shape != self.train_embeddings_.shape or not np.array_equal(
            embeddings, self.train_embeddings_
        ):
            raise ValueError(
                f"exclude_self=True scores the training images against the others: pass the "
                f"same features given to fit ({self.n_train_} images), got {embeddings.shape[0]} "
                "other images. Use exclude_self=False to score new images"
            )


def _gap_embedding(features: Mapping[str, np.ndarray], stages: Sequence[str]) -> np.ndarray:
    """Concatenated global-average-pooled stages, float64 (n, sum of C)."""
    return np.concatenate([features[s].mean(axis=(2, 3), dtype=np.float64) for s in stages], 1)


# ---------------------------------------------------------------------------------------------
# KNN / SPADE
# ---------------------------------------------------------------------------------------------


class KNNDetector(BaseDetector):
    """KNN on global-average-pooled features with SPADE localisation (SROC paper, 3.1.1).

    Image score: mean distance of the image embedding (GAP of each stage, concatenated) to its
    ``n_neighbors`` nearest training embeddings. Map: for each location of the finest grid, the
    stages are aligned (``upsample``) and concatenated; the location's feature is compared with a
    gallery made of the patch features of the ``n_neighbors`` retrieved training images.

    Parameters
    ----------
    n_neighbors : k of the image-level KNN (the paper uses 5).
    metric : "euclidean" (default; the paper's text, "average euclidean distance", and SPADE) or
        "sqeuclidean" (the squared norm written in the paper's eq. 1). Applies to maps as well.
    gallery : "all_locations" (SPADE: the gallery holds every location of the retrieved images
        and a test patch is scored by its ``n_patch_neighbors`` nearest gallery features) or
        "same_location" (a literal reading of the paper: mean distance to the retrieved images'
        features at the same location).
    n_patch_neighbors : kappa of SPADE, patch neighbours averaged in "all_locations" mode.
    upsample : "nearest" or "bilinear" alignment of the coarser stages on the finest grid.
    stages : stages to use, None for all stages given to fit.
    exclude_self : score() then expects the training features and excludes each image from its
        own neighbours (leave-one-out). The default (False) follows the paper: a training image
        finds itself at distance 0 among its k neighbours.
    map_size, map_sigma : resize the maps to ``map_size`` (int or (h, w)) and smooth them with a
        Gaussian of ``map_sigma`` output pixels; None returns maps on the finest feature grid.
    n_jobs : threads for BLAS/torch/faiss, None leaves the libraries' defaults.
    random_state : accepted so that every detector takes the same arguments; KNN involves no
        randomness.
    """

    def __init__(
        self,
        n_neighbors: int = 5,
        metric: str = "euclidean",
        gallery: str = "all_locations",
        n_patch_neighbors: int = 1,
        upsample: str = "nearest",
        stages: Sequence[str] | None = None,
        exclude_self: bool = False,
        map_size: int | Sequence[int] | None = None,
        map_sigma: float = 4.0,
        n_jobs: int | None = None,
        random_state: int | None = None,
    ):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.gallery = gallery
        self.n_patch_neighbors = n_patch_neighbors
        self.upsample = upsample
        self.stages = stages
        self.exclude_self = exclude_self
        self.map_size = map_size
        self.map_sigma = map_sigma
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _fit(self, features: dict[str, np.ndarray]) -> None:
        _check_metric(self.metric)
        if self.gallery not in ("all_locations", "same_location"):
            raise ValueError(
                f"gallery must be 'all_locations' or 'same_location', got {self.gallery!r}"
            )
        available = self.n_train_ - 1 if self.exclude_self else self.n_train_
        if not 1 <= self.n_neighbors <= available:
            raise ValueError(
                f"n_neighbors={self.n_neighbors} must be in [1, {available}] for {self.n_train_} "
                f"training images{' with exclude_self' if self.exclude_self else ''}"
            )
        gallery_size = self.n_neighbors * self.grid_hw_[0] * self.grid_hw_[1]
        if self.gallery == "all_locations" and not 1 <= self.n_patch_neighbors <= gallery_size:
            raise ValueError(
                f"n_patch_neighbors={self.n_patch_neighbors} must be in [1, {gallery_size}] "
                "(the patches of the retrieved images)"
            )
        self.train_embeddings_ = _gap_embedding(features, self.stages_)
        # (n_train, locations, D) so that a gallery is a contiguous gather of whole images;
        # filled by chunks of images so that no second full-size copy is ever made.
        dim = sum(features[s].shape[1] for s in self.stages_)
        locations = self.grid_hw_[0] * self.grid_hw_[1]
        self.train_patches_ = np.empty((self.n_train_, locations, dim), dtype=np.float32)
        for start in range(0, self.n_train_, _IMAGE_CHUNK):
            chunk = {s: a[start : start + _IMAGE_CHUNK] for s, a in features.items()}
            aligned = align_stages(chunk, self.stages_, self.upsample)
            self.train_patches_[start : start + _IMAGE_CHUNK] = aligned.reshape(
                aligned.shape[0], dim, locations
            ).transpose(0, 2, 1)

    def _score(self, features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        embeddings = _gap_embedding(features, self.stages_)
        excluded = None
        if self.exclude_self:
            self._check_self_scoring(embeddings)
            excluded = np.eye(self.n_train_, dtype=bool)
        sq, neighbours = _nearest_sq_distances(
            embeddings, self.train_embeddings_, self.n_neighbors, excluded
        )
        image_scores = _apply_metric(sq, self.metric).mean(axis=1)
        height, width = self.grid_hw_
        maps = np.empty((embeddings.shape[0], height, width), dtype=np.float32)
        for start in range(0, embeddings.shape[0], _IMAGE_CHUNK):
            chunk = {s: a[start : start + _IMAGE_CHUNK] for s, a in features.items()}
            aligned = align_stages(chunk, self.stages_, self.upsample)
            patches = aligned.reshape(aligned.shape[0], aligned.shape[1], -1).transpose(0, 2, 1)
            for offset, test_patches in enumerate(patches):
                retrieved = self.train_patches_[neighbours[start + offset]]
                maps[start + offset] = self._patch_scores(test_patches, retrieved).reshape(
                    height, width
                )
        return image_scores, maps

    def _patch_scores(self, test_patches: np.ndarray, retrieved: np.ndarray) -> np.ndarray:
        """Score each of the L test patches (L, D) against the retrieved images (k, L, D)."""
        if self.gallery == "same_location":
            diff = retrieved - test_patches[None]
            return _apply_metric(np.einsum("kld,kld->kl", diff, diff), self.metric).mean(axis=0)
        gallery = retrieved.reshape(-1, retrieved.shape[-1])
        sq, _ = _nearest_sq_distances(test_patches, gallery, self.n_patch_neighbors)
        return _apply_metric(sq, self.metric).mean(axis=1)

    def _estimate_state_mb(self, n_train, n_test, shapes):
        locations, dim = self._grid_and_dim(shapes)
        patches_mb = n_train * locations * dim * 4 / _MB
        # A chunk of aligned images (upsampled stages, concatenation, transposed copy), one
        # gallery (gathered, reshaped) and its distance matrix with the top-k workspace.
        chunk_mb = _IMAGE_CHUNK * locations * dim * 4 * 3 / _MB
        gallery_mb = self.n_neighbors * locations * dim * 4 * 2 / _MB
        distances_mb = locations * self.n_neighbors * locations * 4 * 2 / _MB
        return patches_mb + chunk_mb + gallery_mb + distances_mb


# ---------------------------------------------------------------------------------------------
# Mahalanobis (Rippel et al.) with Grad-CAM localisation
# ---------------------------------------------------------------------------------------------


class MahalanobisDetector(BaseDetector):
    """Gaussian on global-average-pooled features, one per stage (SROC paper, 3.1.2).

    Image score: sum over stages of sqrt((g - mu)^T S^-1 (g - mu)), g the GAP of the stage and S
    its Ledoit-Wolf covariance. Map: Grad-CAM of that score with respect to the feature map A of
    ``cam_stage``. Because g = mean_ij A[:, i, j], the gradient is analytic:
    d score / d A[c, i, j] = (S^-1 (g - mu))_c / (d * H * W) with d the stage's distance, so the
    Grad-CAM weights are alpha = S^-1 (g - mu) / (d * H * W) and the map is
    ReLU(sum_c alpha_c A[c]), bilinearly upsampled to the finest used grid.

    Parameters
    ----------
    stages : stages to use, None for all stages given to fit.
    cam_stage : stage whose feature map Grad-CAM explains; None takes the coarsest used stage
        (Grad-CAM's choice, the last convolutional layer).
    reg_covar : added to the covariance diagonal after shrinkage (0 = Ledoit-Wolf only).
    map_size, map_sigma, n_jobs : as in :class:`KNNDetector`.
    random_state : accepted so that every detector takes the same arguments; unused.
    """

    def __init__(
        self,
        stages: Sequence[str] | None = None,
        cam_stage: str | None = None,
        reg_covar: float = 0.0,
        map_size: int | Sequence[int] | None = None,
        map_sigma: float = 4.0,
        n_jobs: int | None = None,
        random_state: int | None = None,
    ):
        self.stages = stages
        self.cam_stage = cam_stage
        self.reg_covar = reg_covar
        self.map_size = map_size
        self.map_sigma = map_sigma
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _fit(self, features: dict[str, np.ndarray]) -> None:
        if self.cam_stage is None:
            self.cam_stage_ = min(
                self.stages_, key=lambda s: features[s].shape[2] * features[s].shape[3]
            )
        elif self.cam_stage in self.stages_:
            self.cam_stage_ = self.cam_stage
        else:
            raise ValueError(f"cam_stage {self.cam_stage!r} is not a used stage: {self.stages_}")
        self.means_, self.choleskys_, self.shrinkages_ = {}, {}, {}
        for stage in self.stages_:
            pooled = features[stage].mean(axis=(2, 3), dtype=np.float64)
            mean, cov, shrinkage = ledoit_wolf(pooled, self.reg_covar)
            self.means_[stage] = mean
            self.choleskys_[stage] = cholesky_factors(cov, f"stage {stage!r}")
            self.shrinkages_[stage] = float(shrinkage)

    def _score(self, features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        scores = np.zeros(next(iter(features.values())).shape[0])
        for stage in self.stages_:
            scores += self._stage_distances(features[stage], stage)[0]
        cam = self.grad_cam(features[self.cam_stage_])
        maps = _upsample(torch.from_numpy(cam)[:, None], self.grid_hw_, "bilinear")[:, 0].numpy()
        return scores, maps

    def _stage_distances(
        self, feature_map: np.ndarray, stage: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mahalanobis distances (n,) of the pooled features and the gradient of the distance
        with respect to the pooled features, S^-1 (g - mu) / d, shape (n, C)."""
        centred = feature_map.mean(axis=(2, 3), dtype=np.float64) - self.means_[stage]
        chol = self.choleskys_[stage]
        whitened = whiten(chol, centred)
        distances = np.sqrt(np.einsum("nc,nc->n", whitened, whitened))
        # S^-1 (g - mu) = L^-T L^-1 (g - mu): a second triangular solve, with L^T.
        precision_centred = torch.linalg.solve_triangular(
            torch.from_numpy(chol.T), torch.from_numpy(whitened.T), upper=True
        ).T.numpy()
        # A zero distance has no defined gradient; its Grad-CAM map is then zero.
        safe = np.where(distances > 0, distances, np.inf)
        return distances, precision_centred / safe[:, None]

    def grad_cam(self, feature_map: np.ndarray) -> np.ndarray:
        """Grad-CAM maps (n, H, W) float32 on the grid of ``cam_stage_``."""
        feature_map = np.asarray(feature_map, dtype=np.float32)
        _, gradients = self._stage_distances(feature_map, self.cam_stage_)
        weights = gradients / (feature_map.shape[2] * feature_map.shape[3])
        cam = np.einsum("nc,nchw->nhw", weights, feature_map.astype(np.float64))
        return np.maximum(cam, 0.0).astype(np.float32)

    def _estimate_state_mb(self, n_train, n_test, shapes):
        covariances = sum(chw[0] ** 2 for chw in shapes.values()) * 8 * 3 / _MB
        locations, _ = self._grid_and_dim(shapes)
        return covariances + (n_train + n_test) * locations * 4 * 2 / _MB


# ---------------------------------------------------------------------------------------------
# PaDiM
# ---------------------------------------------------------------------------------------------


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
        return max(1, int(WORKSPACE_MB * _MB // per_location))

    def _memory_mb(self, locations: int, dim: int, n_images: int) -> tuple[float, float]:
        state = locations * (dim * dim + dim) * 4 / _MB
        per_location = (4 * dim * dim + 2 * n_images * dim) * 8 / _MB
        return state, max(WORKSPACE_MB, per_location)

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


# ---------------------------------------------------------------------------------------------
# PatchCore
# ---------------------------------------------------------------------------------------------


class PatchCoreDetector(BaseDetector):
    """Nearest-neighbour search among all training patches (SROC paper, 3.1.4).

    Patch features: each stage is optionally averaged over a ``patch_size`` x ``patch_size``
    neighbourhood (PatchCore's local aggregation: zero padding, padded cells counted), upsampled
    to the finest used grid (``upsample``), concatenated, and optionally pooled to ``target_dim``
    channels (PatchCore's adaptive average pooling). The memory bank holds every training patch,
    or a greedy k-center coreset of them. Patch score: mean distance to the ``n_neighbors``
    nearest memory patches; image score: the maximum patch score.

    Parameters
    ----------
    n_neighbors : k nearest memory patches averaged per test patch (the paper uses 5).
    metric : "euclidean" (default, the paper's text) or "sqeuclidean" (its eq. 4).
    index : "ivfflat" (faiss IndexIVFFlat, the paper's choice) or "flat" (exact IndexFlatL2).
    n_lists : IVF cells; None picks round(3 sqrt(N)) for N memory patches.
    n_probes : IVF cells visited per query; read at search time, so ``set_params(n_probes=p)``
        on a fitted detector changes the search without refitting.
    ivf_train_points_per_list : IVF k-means trains on at most this many points per cell (a seeded
        sample), faiss's max_points_per_centroid.
    patch_size : neighbourhood of the local aggregation, odd; 1 disables it.
    target_dim : channels after adaptive average pooling of the concatenated vector, None keeps
        all.
    upsample : "bilinear" (PatchCore) or "nearest" alignment of the coarser stages.
    coreset_ratio : fraction of the memory bank kept by greedy coreset selection, None keeps all
        (the paper: no coreset).
    coreset_projection_dim : coreset distances are computed after a Gaussian random projection
        to this dimension (PatchCore: 128); None or >= D uses the features themselves.
    exclude_self : score() then expects the training features and excludes every patch of an
        image from that image's searches (leave-one-image-out). The default (False) follows the
        paper: a training patch finds itself at distance 0.
    stages, map_size, map_sigma, n_jobs : as in :class:`KNNDetector`.
    random_state : seeds the IVF k-means, the coreset start points and projection.
    """

    def __init__(
        self,
        n_neighbors: int = 5,
        metric: str = "euclidean",
        index: str = "ivfflat",
        n_lists: int | None = None,
        n_probes: int = 40,
        ivf_train_points_per_list: int = 16,
        patch_size: int = 3,
        target_dim: int | None = None,
        upsample: str = "bilinear",
        coreset_ratio: float | None = None,
        coreset_projection_dim: int | None = 128,
        stages: Sequence[str] | None = None,
        exclude_self: bool = False,
        map_size: int | Sequence[int] | None = None,
        map_sigma: float = 4.0,
        n_jobs: int | None = None,
        random_state: int | None = 0,
    ):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.index = index
        self.n_lists = n_lists
        self.n_probes = n_probes
        self.ivf_train_points_per_list = ivf_train_points_per_list
        self.patch_size = patch_size
        self.target_dim = target_dim
        self.upsample = upsample
        self.coreset_ratio = coreset_ratio
        self.coreset_projection_dim = coreset_projection_dim
        self.stages = stages
        self.exclude_self = exclude_self
        self.map_size = map_size
        self.map_sigma = map_sigma
        self.n_jobs = n_jobs
        self.random_state = random_state

    # -- patch features ------------------------------------------------------------------------

    def patch_features(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Patch features of the images, (n * H * W, D) float32, image-major then row-major."""
        height, width = self.grid_hw_
        parts = []
        for stage in self.stages_:
            maps = torch.from_numpy(np.asarray(features[stage], dtype=np.float32))
            if self.patch_size > 1:
                maps = F.avg_pool2d(
                    maps,
                    self.patch_size,
                    stride=1,
                    padding=self.patch_size // 2,
                    count_include_pad=True,
                )
            parts.append(_upsample(maps, (height, width), self.upsample))
        patches = (
            torch.cat(parts, dim=1).permute(0, 2, 3, 1).reshape(-1, sum(p.shape[1] for p in parts))
        )
        if self.target_dim is not None:
            patches = F.adaptive_avg_pool1d(patches[:, None, :], self.target_dim)[:, 0, :]
        return np.ascontiguousarray(patches.numpy())

    def _check_params(self, total_dim: int) -> None:
        _check_metric(self.metric)
        if self.index not in ("ivfflat", "flat"):
            raise ValueError(f"index must be 'ivfflat' or 'flat', got {self.index!r}")
        if self.upsample not in _UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {_UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be a positive odd int, got {self.patch_size}")
        if self.target_dim is not None and not 1 <= self.target_dim <= total_dim:
            raise ValueError(f"target_dim={self.target_dim} must be in [1, {total_dim}] or None")
        if self.coreset_ratio is not None and not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1] or None, got {self.coreset_ratio}")

    # -- fit -----------------------------------------------------------------------------------

    def _fit(self, features: dict[str, np.ndarray]) -> None:
        total_dim = sum(features[s].shape[1] for s in self.stages_)
        self._check_params(total_dim)
        self.train_embeddings_ = _gap_embedding(features, self.stages_)
        locations = self.grid_hw_[0] * self.grid_hw_[1]
        dim = total_dim if self.target_dim is None else int(self.target_dim)
        bank = np.empty((self.n_train_ * locations, dim), dtype=np.float32)
        for start in range(0, self.n_train_, _IMAGE_CHUNK):
            chunk = {s: a[start : start + _IMAGE_CHUNK] for s, a in features.items()}
            patches = self.patch_features(chunk)
            bank[start * locations : start * locations + patches.shape[0]] = patches
        rng = np.random.default_rng(self.random_state)
        kept = np.arange(bank.shape[0])
        if self.coreset_ratio is not None and self.coreset_ratio < 1:
            kept = self._coreset(bank, rng)
            bank = bank[kept]
        # Row of each memory patch in the full bank (image-major, then row-major locations).
        self.memory_indices_ = kept
        image_of_patch = kept // locations
        # Sorted by image, so an image's patches form one id range (exclude_self searches).
        self.image_offsets_ = np.searchsorted(image_of_patch, np.arange(self.n_train_ + 1))
        available = bank.shape[0] - (np.diff(self.image_offsets_).max() if self.exclude_self else 0)
        if not 1 <= self.n_neighbors <= available:
            raise ValueError(
                f"n_neighbors={self.n_neighbors} must be in [1, {available}] memory patches"
            )
        self.memory_bank_ = bank
        self.index_ = self._build_index(bank, int(rng.integers(2**31 - 1)))

    def _coreset(self, bank: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n_select = min(
            bank.shape[0], max(self.n_neighbors, math.ceil(self.coreset_ratio * bank.shape[0]))
        )
        projected = bank
        if self.coreset_projection_dim is not None and self.coreset_projection_dim < bank.shape[1]:
            # Johnson-Lindenstrauss projection: pairwise distances are kept up to a small factor.
            projection = rng.standard_normal((bank.shape[1], self.coreset_projection_dim))
            projected = bank @ (projection / np.sqrt(self.coreset_projection_dim)).astype(
                np.float32
            )
        starts = rng.choice(bank.shape[0], size=min(10, bank.shape[0]), replace=False)
        return greedy_coreset_indices(projected, n_select, starts)

    def _resolved_n_lists(self, n_memory: int) -> int:
        if self.n_lists is not None:
            if not 1 <= self.n_lists <= n_memory:
                raise ValueError(
                    f"n_lists={self.n_lists} must be in [1, {n_memory}] memory patches"
                )
            return int(self.n_lists)
        # About 3 sqrt(N) cells balances the coarse search (n_lists centroids) against the
        # scan (n_probes cells of about sqrt(N) / 3 patches); with 40 probes, recall@5 was
        # 0.97-0.99 on real 380 px features (docs/detectors.md, benchmarks/detectors.py).
        return int(min(max(1, round(3 * math.sqrt(n_memory))), n_memory))

    def _build_index(self, bank: np.ndarray, seed: int) -> faiss.Index:
        dim = bank.shape[1]
        if self.index == "flat":
            index = faiss.IndexFlatL2(dim)
        else:
            self.n_lists_ = self._resolved_n_lists(bank.shape[0])
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, self.n_lists_)
            # Seeded sample and k-means initialisation: the same data gives the same cells.
            index.cp.seed = seed
            index.cp.max_points_per_centroid = self.ivf_train_points_per_list
            index.cp.min_points_per_centroid = 1
            index.train(bank)
        index.add(bank)
        return index

    # -- score ---------------------------------------------------------------------------------

    def _search_params(self, excluded_range: tuple[int, int] | None):
        selector = None
        if excluded_range is not None:
            selector = faiss.IDSelectorNot(faiss.IDSelectorRange(*excluded_range))
        if self.index == "flat":
            params = faiss.SearchParameters()
        else:
            if self.n_probes < 1:
                raise ValueError(f"n_probes must be >= 1, got {self.n_probes}")
            params = faiss.SearchParametersIVF()
            params.nprobe = min(int(self.n_probes), self.n_lists_)
        if selector is not None:
            params.sel = selector
        # faiss does not own the selector: keep it alive alongside the parameters.
        return params, selector

    def kneighbors(
        self, queries: np.ndarray, excluded_range: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest memory patches of ``queries`` (q, D): (squared distances, ids), ascending.

        The index only selects the neighbours; their distances are recomputed from the memory
        bank by direct differences (faiss's expansion loses precision near 0). Queries for which
        IVF found fewer than k patches in its probed cells fall back to exact search.
        """
        params, _selector = self._search_params(excluded_range)
        _, ids = self.index_.search(queries, self.n_neighbors, params=params)
        missing = (ids < 0).any(axis=1)
        if missing.any():
            excluded = None
            if excluded_range is not None:
                excluded = np.zeros((int(missing.sum()), self.memory_bank_.shape[0]), dtype=bool)
                excluded[:, excluded_range[0] : excluded_range[1]] = True
            _, ids[missing] = _nearest_sq_distances(
                queries[missing], self.memory_bank_, self.n_neighbors, excluded
            )
        diff = queries[:, None, :] - self.memory_bank_[ids]
        sq = np.einsum("qkd,qkd->qk", diff, diff)
        order = np.argsort(sq, axis=1, kind="stable")
        return np.take_along_axis(sq, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def _score(self, features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        n_images = next(iter(features.values())).shape[0]
        if self.exclude_self:
            self._check_self_scoring(_gap_embedding(features, self.stages_))
        height, width = self.grid_hw_
        maps = np.empty((n_images, height, width), dtype=np.float32)
        # Chunks of about _QUERY_CHUNK patches bound the gathered neighbours (q x k x D).
        step = max(1, _QUERY_CHUNK // (height * width))
        for start in range(0, n_images, step):
            stop = min(start + step, n_images)
            patches = self.patch_features({s: a[start:stop] for s, a in features.items()})
            if self.exclude_self:
                per_image = patches.reshape(stop - start, height * width, -1)
                sq = np.stack(
                    [
                        self.kneighbors(
                            per_image[i],
                            (
                                int(self.image_offsets_[start + i]),
                                int(self.image_offsets_[start + i + 1]),
                            ),
                        )[0]
                        for i in range(stop - start)
                    ]
                )
            else:
                sq = self.kneighbors(patches)[0]
            scores = _apply_metric(sq, self.metric).mean(axis=-1)
            maps[start:stop] = scores.reshape(stop - start, height, width)
        return maps.max(axis=(1, 2)).astype(np.float64), maps

    def _estimate_state_mb(self, n_train, n_test, shapes):
        locations, total = self._grid_and_dim(shapes)
        dim = total if self.target_dim is None else min(int(self.target_dim), total)
        n_patches = n_train * locations
        kept = (
            n_patches if self.coreset_ratio is None else math.ceil(self.coreset_ratio * n_patches)
        )
        # Our memory bank plus faiss's copy, whose inverted lists grow by doubling (up to 1.5x
        # on average); during a coreset selection the full bank and its projection coexist
        # with the kept copy.
        bank_mb = 2.5 * kept * dim * 4 / _MB
        if self.coreset_ratio is not None:
            projection = min(self.coreset_projection_dim or dim, dim)
            bank_mb = max(
                bank_mb, n_patches * (dim + projection + 1) * 4 / _MB + kept * dim * 4 / _MB
            )
        # Patch features of a chunk of training images (pooled, upsampled, concatenated and
        # permuted copies) and, when scoring, the gathered neighbours of a chunk of queries.
        chunk_mb = _IMAGE_CHUNK * locations * total * 4 * 4 / _MB
        query_mb = _QUERY_CHUNK * (2 * self.n_neighbors + 2) * dim * 4 / _MB
        return bank_mb + max(chunk_mb, query_mb)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

DETECTORS: dict[str, type[BaseDetector]] = {
    "knn": KNNDetector,
    "mahalanobis": MahalanobisDetector,
    "padim": PaDiMDetector,
    "patchcore": PatchCoreDetector,
}


def make_detector(name: str, **params) -> BaseDetector:
    """Instantiate the detector registered as ``name`` with hyper-parameters ``params``."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}")
    cls = DETECTORS[name]
    valid = cls._get_param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"detector {name!r} has no parameter(s) {unknown}; valid: {valid}")
    return cls(**params)


def estimate_memory_mb(
    name: str,
    params: Mapping[str, object],
    n_train: int,
    n_test: int,
    feature_shapes: Mapping[str, Sequence[int]],
) -> float:
    """Peak memory (MB) of fitting detector ``name`` on ``n_train`` images and scoring
    ``n_test``, with ``feature_shapes`` {stage: (C, H, W)}; includes the interpreter and the
    float32 features, so the workflow can declare it as mem_mb."""
    return make_detector(name, **dict(params)).estimate_memory_mb(n_train, n_test, feature_shapes)
