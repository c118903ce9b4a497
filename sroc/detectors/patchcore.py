"""PatchCore: nearest-neighbour search among training patches, with an optional coreset."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from sroc.detectors.base import (
    IMAGE_CHUNK,
    MB,
    QUERY_CHUNK,
    UPSAMPLE_MODES,
    BaseDetector,
    adaptive_average_pool,
    gap_embedding,
    grid_and_dim,
    onto_grid,
    thread_limit,
)
from sroc.detectors.coreset import greedy_coreset_indices
from sroc.detectors.neighbours import (
    apply_metric,
    check_metric,
    exact_sq_distances,
    nearest_sq_distances,
)

# faiss IndexIVF's cp.niter: the k-means iterations of IVF training.
FAISS_KMEANS_ITERATIONS = 10
# Self-scoring with an exact search masks each chunk's own patches in one (queries x bank)
# boolean matrix while it has at most this many entries (64 MB); larger banks search per image.
_MASKED_SEARCH_ENTRIES = 2**26


def local_average(maps: np.ndarray, size: int) -> np.ndarray:
    """Mean over the ``size`` x ``size`` neighbourhood of every cell of (n, C, h, w) float32
    maps, zero-padded with the padded cells counted (torch's ``avg_pool2d(maps, size, stride=1,
    padding=size // 2, count_include_pad=True)``, PatchCore's local aggregation): sums of
    shifted views along each axis, float32."""
    half = size // 2
    padded = np.pad(maps, ((0, 0), (0, 0), (half, half), (half, half)))
    height, width = maps.shape[-2:]
    rows = padded[:, :, 0:height, :].copy()
    for shift in range(1, size):
        rows += padded[:, :, shift : shift + height, :]
    out = rows[:, :, :, 0:width].copy()
    for shift in range(1, size):
        out += rows[:, :, :, shift : shift + width]
    out /= np.float32(size * size)
    return out


def _thread_independent_product(rows: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """``rows @ projection`` on one BLAS thread. OpenBLAS splits a product this narrow between
    threads in ways that change its rounding (measured on an AMD EPYC: up to 8.6e-6 between one
    and two threads), and the memory bank must not depend on n_jobs; projecting 400k patches
    of 376 channels to 128 (38 GFLOP) takes about 0.4 s on one core."""
    with threadpool_limits(limits=1):
        return rows @ projection


class PatchCoreDetector(BaseDetector, name="patchcore", label="PatchCore"):
    """Nearest-neighbour search among all training patches (SROC paper, 3.1.4).

    Patch features: each stage is optionally averaged over a ``patch_size`` x ``patch_size``
    neighbourhood (PatchCore's local aggregation: zero padding, padded cells counted),
    optionally pooled to ``layer_dim`` channels (PatchCore's per-layer equalisation), resampled
    to the patch grid (the finest used stage's, or ``grid_stage``'s), concatenated, optionally
    pooled to ``target_dim`` channels (PatchCore's aggregator) and optionally projected to
    ``projection_dim`` dimensions. The memory bank holds every training patch, or a greedy
    k-center coreset of them. Patch score: mean distance to the ``n_neighbors`` nearest memory
    patches; image score: the maximum patch score.

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
    layer_dim : every stage's channels are first pooled (adaptive average pooling, which
        repeats channels when a stage has fewer) to this common count, so that each stage weighs
        the same in the distance, as PatchCore's ``pretrain_embed_dimension``; None concatenates
        the stages' own channels (a stage's weight then grows with its channel count).
    target_dim : channels after adaptive average pooling of the concatenated vector, None keeps
        all.
    projection_dim : patch features (bank and queries) are multiplied by a seeded Gaussian
        random projection to this dimension, scaled by 1/sqrt(dim) so that distances are kept
        in expectation; None keeps them. Cheaper search, and a cheaper coreset.
    grid_stage : stage whose grid the patches live on (maps come out on it); None uses the
        finest used stage. Finer stages are area-averaged onto it, coarser ones upsampled. With
        ``blocks.4`` the 380 px backbone gives a 24x24 grid at stride 16 instead of 48x48.
    upsample : "bilinear" (PatchCore) or "nearest" alignment of the coarser stages.
    coreset_ratio : fraction of the memory bank kept by greedy coreset selection, None keeps all
        (the paper: no coreset).
    coreset_projection_dim : coreset distances are computed after a Gaussian random projection
        to this dimension (PatchCore: 128); None or >= D uses the features themselves.
    exclude_self : score() then expects the training features and excludes every patch of an
        image from that image's searches (leave-one-image-out). The default (False) follows the
        paper: a training patch finds itself at distance 0.
    excluded_patches : rows of the full training bank (image-major, then row-major locations:
        image i, location l is row ``i * H * W + l``) left out of the memory bank, or None.
        Patch-level refinement (``sroc.refinement.patch_sroc_ranking``) sets it; the coreset
        then selects among the remaining patches only. An image may lose all its patches.
    stages, n_jobs : as in :class:`KNNDetector`.
    random_state : seeds the random projection, the IVF k-means, the coreset start points and
        its projection.

    Results do not depend on ``n_jobs``: the IVF k-means trains on one thread (its multi-thread
    reductions change the centroids), and the coreset's products split no summed axis.
    """

    runtime_seconds_per_image = 0.1
    supports_exclude_self = True
    has_patch_bank = True

    def __init__(
        self,
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
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.index = index
        self.n_lists = n_lists
        self.n_probes = n_probes
        self.ivf_train_points_per_list = ivf_train_points_per_list
        self.patch_size = patch_size
        self.layer_dim = layer_dim
        self.target_dim = target_dim
        self.projection_dim = projection_dim
        self.grid_stage = grid_stage
        self.upsample = upsample
        self.coreset_ratio = coreset_ratio
        self.coreset_projection_dim = coreset_projection_dim
        self.stages = stages
        self.exclude_self = exclude_self
        self.excluded_patches = excluded_patches
        self.n_jobs = n_jobs
        self.random_state = random_state

    # -- patch features ------------------------------------------------------------------------

    def patch_features(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Patch features of the images, (n * H * W, D) float32, image-major then row-major."""
        height, width = self.grid_hw_
        parts = []
        for stage in self.stages_:
            maps = np.asarray(features[stage], dtype=np.float32)
            if self.patch_size > 1:
                maps = local_average(maps, self.patch_size)
            if self.layer_dim is not None:
                # Channel pooling commutes with the spatial resampling: pool on the stage grid.
                maps = adaptive_average_pool(maps, int(self.layer_dim), axis=1)
            parts.append(onto_grid(maps, (height, width), self.upsample))
        patches = np.concatenate(parts, axis=1).transpose(0, 2, 3, 1)
        patches = patches.reshape(-1, patches.shape[-1])
        if self.target_dim is not None:
            patches = adaptive_average_pool(patches, int(self.target_dim), axis=1)
        patches = np.ascontiguousarray(patches)
        if self.projection_ is not None:
            patches = _thread_independent_product(patches, self.projection_)
        return patches

    def _concatenated_dim(self, channels: Sequence[int]) -> int:
        """Channels of the concatenated stages, given each used stage's channel count."""
        return sum(channels) if self.layer_dim is None else len(channels) * int(self.layer_dim)

    def _check_params(self, total_dim: int) -> None:
        for name in ("layer_dim", "projection_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive int or None, got {value}")
        check_metric(self.metric)
        if self.index not in ("ivfflat", "flat"):
            raise ValueError(f"index must be 'ivfflat' or 'flat', got {self.index!r}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be a positive odd int, got {self.patch_size}")
        if self.target_dim is not None and not 1 <= self.target_dim <= total_dim:
            raise ValueError(f"target_dim={self.target_dim} must be in [1, {total_dim}] or None")
        if self.coreset_ratio is not None and not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1] or None, got {self.coreset_ratio}")

    # -- fit -----------------------------------------------------------------------------------

    def _fit(self, features: dict[str, np.ndarray]) -> None:
        total_dim = self._concatenated_dim([features[s].shape[1] for s in self.stages_])
        self._check_params(total_dim)
        self._use_grid_stage(features, self.grid_stage)
        self.train_embeddings_ = gap_embedding(features, self.stages_)
        locations = self.grid_hw_[0] * self.grid_hw_[1]
        dim = total_dim if self.target_dim is None else int(self.target_dim)
        rng = np.random.default_rng(self.random_state)
        self.projection_ = None
        if self.projection_dim is not None:
            # Johnson-Lindenstrauss: distances kept in expectation, up to a small factor.
            self.projection_ = (
                rng.standard_normal((dim, int(self.projection_dim))) / np.sqrt(self.projection_dim)
            ).astype(np.float32)
            dim = int(self.projection_dim)
        bank = np.empty((self.n_train_ * locations, dim), dtype=np.float32)
        for start in range(0, self.n_train_, IMAGE_CHUNK):
            chunk = {s: a[start : start + IMAGE_CHUNK] for s, a in features.items()}
            patches = self.patch_features(chunk)
            bank[start * locations : start * locations + patches.shape[0]] = patches
        kept = self._allowed_patches(bank)
        if len(kept) < bank.shape[0]:
            bank = bank[kept]
        if self.coreset_ratio is not None and self.coreset_ratio < 1:
            selected = self._coreset(bank, rng)
            kept, bank = kept[selected], bank[selected]
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

    def _allowed_patches(self, bank: np.ndarray) -> np.ndarray:
        """Rows of the full training bank ``bank`` (image-major, then row-major locations) that
        may enter the coreset and the memory bank, ascending: those not in ``excluded_patches``.
        A hook for variants that also filter the patches on their features (SoftPatch)."""
        return self._remaining_patches(bank.shape[0])

    def _remaining_patches(self, n_patches: int) -> np.ndarray:
        """Rows of the full bank (``n_patches`` rows) not in ``excluded_patches``, ascending."""
        if self.excluded_patches is None:
            return np.arange(n_patches)
        excluded = np.asarray(self.excluded_patches)
        if excluded.ndim != 1 or (excluded.size and excluded.dtype.kind not in "iu"):
            raise ValueError(
                "excluded_patches must be a 1-D sequence of int rows of the training bank, got "
                f"shape {excluded.shape} and dtype {excluded.dtype}"
            )
        if excluded.size and (excluded.min() < 0 or excluded.max() >= n_patches):
            raise ValueError(
                f"excluded_patches must lie in [0, {n_patches}) (n_train x H x W = "
                f"{self.n_train_} x {self.grid_hw_[0]} x {self.grid_hw_[1]}), got rows in "
                f"[{excluded.min()}, {excluded.max()}]"
            )
        keep = np.ones(n_patches, dtype=bool)
        keep[excluded.astype(np.int64)] = False
        if not keep.any():
            raise ValueError(
                f"excluded_patches removes all {n_patches} training patches: keep some"
            )
        return np.flatnonzero(keep)

    def _coreset(self, bank: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n_select = min(
            bank.shape[0], max(self.n_neighbors, math.ceil(self.coreset_ratio * bank.shape[0]))
        )
        projected = bank
        if self.coreset_projection_dim is not None and self.coreset_projection_dim < bank.shape[1]:
            # Johnson-Lindenstrauss projection: pairwise distances are kept up to a small factor.
            projection = rng.standard_normal((bank.shape[1], self.coreset_projection_dim))
            projected = _thread_independent_product(
                bank, (projection / np.sqrt(self.coreset_projection_dim)).astype(np.float32)
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

    def _build_index(self, bank: np.ndarray, seed: int):
        """The faiss IVF index of the memory bank, or None for exact search."""
        if self.index == "flat":
            return None  # exact search runs on the memory bank itself (_exact_search)
        # Imported here, by the IVF index alone: faiss loads its own BLAS (180 ms, measured),
        # which jobs that only rank, score exactly or use another detector need not pay.
        import faiss

        dim = bank.shape[1]
        self.n_lists_ = self._resolved_n_lists(bank.shape[0])
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, self.n_lists_)
        # Seeded sample and k-means initialisation: the same data gives the same cells.
        index.cp.seed = seed
        index.cp.max_points_per_centroid = self.ivf_train_points_per_list
        index.cp.min_points_per_centroid = 1
        # faiss's k-means reduces across threads, so its centroids change with the thread
        # count (measured): train on one thread, so that the cells depend on the data only.
        with thread_limit(1):
            index.train(bank)
        index.add(bank)
        return index

    # -- score ---------------------------------------------------------------------------------

    def _search_params(self, excluded_range: tuple[int, int] | None):
        if self.n_probes < 1:
            raise ValueError(f"n_probes must be >= 1, got {self.n_probes}")
        import faiss  # loaded by _build_index already

        params = faiss.SearchParametersIVF()
        params.nprobe = min(int(self.n_probes), self.n_lists_)
        selector = None
        if excluded_range is not None:
            selector = faiss.IDSelectorNot(faiss.IDSelectorRange(*excluded_range))
            params.sel = selector
        # faiss does not own the selector: keep it alive alongside the parameters.
        return params, selector

    def _exact_search(
        self, queries: np.ndarray, excluded_range: tuple[int, int] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest memory patches by matrix products (faiss's flat search with an
        excluded range takes a slow per-pair path): (squared distances by direct differences,
        ids), ascending. The nearest outside the excluded range are the nearest among those
        before it and those after it."""
        bank = self.memory_bank_
        start, stop = (
            excluded_range if excluded_range is not None else (bank.shape[0], bank.shape[0])
        )
        sq_parts, id_parts = [], []
        for low, high in ((0, start), (stop, bank.shape[0])):
            if high > low:
                sq, ids = nearest_sq_distances(
                    queries, bank[low:high], min(self.n_neighbors, high - low)
                )
                sq_parts.append(sq)
                id_parts.append(ids + low)
        sq, ids = np.concatenate(sq_parts, axis=1), np.concatenate(id_parts, axis=1)
        if len(sq_parts) == 1:
            return sq, ids
        nearest = np.argsort(sq, axis=1, kind="stable")[:, : self.n_neighbors]
        return np.take_along_axis(sq, nearest, axis=1), np.take_along_axis(ids, nearest, axis=1)

    def kneighbors(
        self, queries: np.ndarray, excluded_range: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest memory patches of ``queries`` (q, D): (squared distances, ids), ascending.

        The index only selects the neighbours; their distances are recomputed from the memory
        bank by direct differences (faiss's expansion loses precision near 0). Queries for which
        IVF found fewer than k patches in its probed cells fall back to exact search.
        """
        if self.index == "flat":
            # Already exact distances by differences, ascending (ties to the lower id).
            return self._exact_search(queries, excluded_range)
        params, _selector = self._search_params(excluded_range)
        _, ids = self.index_.search(queries, self.n_neighbors, params=params)
        missing = (ids < 0).any(axis=1)
        if missing.any():
            excluded = None
            if excluded_range is not None:
                excluded = np.zeros((int(missing.sum()), self.memory_bank_.shape[0]), dtype=bool)
                excluded[:, excluded_range[0] : excluded_range[1]] = True
            _, ids[missing] = nearest_sq_distances(
                queries[missing], self.memory_bank_, self.n_neighbors, excluded
            )
        sq = exact_sq_distances(queries, self.memory_bank_, ids)
        order = np.argsort(sq, axis=1, kind="stable")
        return np.take_along_axis(sq, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def _score(
        self, features: dict[str, np.ndarray], maps: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Image scores and, with ``maps``, the patch-score maps; without, no map is kept."""
        n_images = next(iter(features.values())).shape[0]
        if self.exclude_self:
            self._check_self_scoring(gap_embedding(features, self.stages_))
        height, width = self.grid_hw_
        image_scores = np.empty(n_images, dtype=np.float64)
        patch_maps = np.empty((n_images, height, width), dtype=np.float32) if maps else None
        # Chunks of about QUERY_CHUNK patches bound the gathered neighbours (q x k x D).
        step = max(1, QUERY_CHUNK // (height * width))
        for start in range(0, n_images, step):
            stop = min(start + step, n_images)
            patches = self.patch_features({s: a[start:stop] for s, a in features.items()})
            bank_size = self.memory_bank_.shape[0]
            if (
                self.exclude_self
                and self.index == "flat"
                and patches.shape[0] * bank_size <= _MASKED_SEARCH_ENTRIES
            ):
                # A small bank: one masked search for the chunk instead of one per image.
                owner = np.repeat(np.arange(start, stop), height * width)
                memory_owner = np.repeat(np.arange(self.n_train_), np.diff(self.image_offsets_))
                excluded = owner[:, None] == memory_owner[None, :]
                sq, ids = nearest_sq_distances(
                    patches, self.memory_bank_, self.n_neighbors, excluded
                )
            elif self.exclude_self:
                per_image = patches.reshape(stop - start, height * width, -1)
                found = [
                    self.kneighbors(
                        per_image[i],
                        (
                            int(self.image_offsets_[start + i]),
                            int(self.image_offsets_[start + i + 1]),
                        ),
                    )
                    for i in range(stop - start)
                ]
                sq, ids = np.stack([f[0] for f in found]), np.stack([f[1] for f in found])
            else:
                sq, ids = self.kneighbors(patches)
            scores = self._patch_scores(sq, ids).reshape(stop - start, -1)
            image_scores[start:stop] = scores.max(axis=1)
            if maps:
                patch_maps[start:stop] = scores.reshape(stop - start, height, width)
        return image_scores, patch_maps

    def _patch_scores(self, sq_distances: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Patch scores (...) from the squared distances (..., k) to the k nearest memory
        patches, ascending, and those patches' rows ``ids`` (..., k) in ``memory_bank_``: the mean
        distance. A hook for variants that weigh the memory patches (SoftPatch)."""
        return apply_metric(sq_distances, self.metric).mean(axis=-1)

    def _estimate_state_mb(self, n_train, n_test, shapes):
        # The finest grid bounds grid_stage's; chunks hold the stages' own channels too.
        locations, total = grid_and_dim(shapes)
        pooled = self._concatenated_dim([chw[0] for chw in shapes.values()])
        total = max(total, pooled)
        dim = pooled if self.target_dim is None else min(int(self.target_dim), pooled)
        if self.projection_dim is not None:
            dim = int(self.projection_dim)
        n_patches = n_train * locations
        kept = (
            n_patches if self.coreset_ratio is None else math.ceil(self.coreset_ratio * n_patches)
        )
        # Our memory bank plus faiss's copy, whose inverted lists grow by doubling (up to 1.5x
        # on average); during a coreset selection the full bank and its projection coexist
        # with the kept copy.
        bank_mb = 2.5 * kept * dim * 4 / MB
        if self.coreset_ratio is not None:
            projection = min(self.coreset_projection_dim or dim, dim)
            bank_mb = max(
                bank_mb, n_patches * (dim + projection + 1) * 4 / MB + kept * dim * 4 / MB
            )
        # Patch features of a chunk of training images (pooled, upsampled, concatenated and
        # permuted copies) and, when scoring, the gathered neighbours of a chunk of queries.
        chunk_mb = IMAGE_CHUNK * locations * total * 4 * 4 / MB
        query_mb = QUERY_CHUNK * (2 * self.n_neighbors + 2) * dim * 4 / MB
        return bank_mb + max(chunk_mb, query_mb)

    # -- FLOP models -----------------------------------------------------------------------------

    def _flop_bank(self, n_fit: float) -> tuple[float, int, float, int]:
        """(patches, patch dim, memory bank size, coreset projection dim) for ``n_fit`` images,
        on the fitted patch grid (``grid_stage`` may be coarser than the finest stage) and patch
        dimension (after ``layer_dim``, ``target_dim`` or ``projection_dim``)."""
        locations = math.prod(self.grid_hw_)
        dim = int(self.memory_bank_.shape[1])
        patches = n_fit * locations
        memory = patches
        projection = dim
        if self.coreset_ratio is not None and self.coreset_ratio < 1:
            memory = max(self.n_neighbors, math.ceil(self.coreset_ratio * patches))
            projection = min(self.coreset_projection_dim or dim, dim)
        return patches, dim, memory, projection

    def fit_flops(self, shapes, n_fit):
        _, channels = grid_and_dim(self.used_shapes(shapes))
        # The coreset is counted as plain greedy selection (one distance update per pick); the
        # active-set selection skips most of those, so its share of the limit can exceed 1.
        patches, dim, memory, projection = self._flop_bank(n_fit)
        flops = 9 * patches * channels  # 3x3 local aggregation of every patch
        if memory < patches:
            if projection < dim:
                flops += 2 * patches * dim * projection
            flops += 2 * memory * patches * projection  # one matrix-vector product per pick
        if self.index == "ivfflat":
            lists = self._resolved_n_lists(int(memory))
            trained = min(memory, lists * self.ivf_train_points_per_list)
            flops += FAISS_KMEANS_ITERATIONS * 2 * trained * lists * dim
        return flops

    def score_flops(self, shapes, n_fit, n_score, maps):
        locations, channels = grid_and_dim(self.used_shapes(shapes))
        _, dim, memory, _ = self._flop_bank(n_fit)
        queries = n_score * locations
        flops = 9 * queries * channels
        if self.index == "ivfflat":
            lists = self._resolved_n_lists(int(memory))
            probes = min(self.n_probes, lists)
            return flops + 2 * queries * dim * (lists + probes * memory / lists)
        return flops + 2 * queries * memory * dim
