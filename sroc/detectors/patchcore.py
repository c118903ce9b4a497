"""PatchCore: nearest-neighbour search among training patches, with an optional coreset."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from sroc.detectors.base import (
    _IMAGE_CHUNK,
    _MB,
    _QUERY_CHUNK,
    _UPSAMPLE_MODES,
    BaseDetector,
    _gap_embedding,
    _upsample,
)
from sroc.detectors.neighbours import _apply_metric, _check_metric, _nearest_sq_distances


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

    def _score(self, features: dict[str, np.ndarray], maps=True) -> tuple[np.ndarray, np.ndarray]:
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


