"""Exact nearest-neighbour search and distance metrics shared by KNN and PatchCore."""

from __future__ import annotations

import numpy as np
from scipy.linalg.blas import get_blas_funcs

from sroc.detectors.base import MB, WORKSPACE_MB

_METRICS = ("euclidean", "sqeuclidean")


def check_metric(metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")


def apply_metric(sq_distances: np.ndarray, metric: str) -> np.ndarray:
    return np.sqrt(sq_distances) if metric == "euclidean" else sq_distances


# Query rows whose gathered neighbours are differenced at once: a few MB stay in cache, where one
# large temporary per call would be paged in afresh each time (10x slower, measured).
_DIFFERENCE_ROWS = 256
# Query rows whose candidate distances to the whole base are computed at once (one reused
# buffer of rows x base entries, at most WORKSPACE_MB): 256 rows keep numpy's sgemm near its
# peak (64 rows: 25 % slower, measured at 11,290 x 128).
_CANDIDATE_ROWS = 256
# Candidate selection: column c of the buffer belongs to the strided group c % _GROUPS.
_GROUPS = 256


def exact_sq_distances(queries: np.ndarray, base: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Squared distances (q, k) of each query (q, D) to its candidates ``base[ids]`` (q, k),
    by direct differences: exact where the expansion |q|^2 + |b|^2 - 2 q.b loses precision."""
    out = np.empty(ids.shape, dtype=np.result_type(queries.dtype, base.dtype))
    for start in range(0, queries.shape[0], _DIFFERENCE_ROWS):
        block = slice(start, start + _DIFFERENCE_ROWS)
        diff = base[ids[block]]
        np.subtract(diff, queries[block, None, :], out=diff)
        np.einsum("qkd,qkd->qk", diff, diff, out=out[block])
    return out


class CandidateSearch:
    """The ``n_candidates`` smallest of |b|^2 - 2 q.b over the base rows b, for blocks of query
    rows q: the order of each query's distances, without its row-constant |q|^2.

    One BLAS product per block writes the reused (rows x base) buffer: the base is stored as
    [-2 b, |b|^2] and each query as [q, 1], so the norms come with the product, and padding rows
    [0, inf] round the base up to a multiple of the group count. One strided pass takes the
    minimum of each group of columns (c % groups). The ``n_candidates`` smallest values lie in
    the groups whose minimum is at most t, the ``n_candidates``-th smallest minimum (they hold
    at least that many values <= t, and any value elsewhere is >= t): only those groups'
    columns are read again, and every value <= t is a candidate (about 9.2 per query for
    n_candidates = 9 at 11,290 x 128). So the candidates include those of a full sort (and
    its ties), and no reduction sums across threads: BLAS splits the product by rows and
    columns, never along the summed axis.
    """

    def __init__(self, base: np.ndarray, n_candidates: int, dtype):
        n_base, dim = base.shape
        self.n_base, self.dim, self.n_candidates, self.dtype = n_base, dim, n_candidates, dtype
        # At least n_candidates groups, so that the threshold exists (n_candidates <= n_base).
        self.n_groups = min(max(_GROUPS, n_candidates), n_base)
        self.per_group = -(-n_base // self.n_groups)
        width = self.n_groups * self.per_group
        self.augmented = np.zeros((width, dim + 1), dtype=dtype)
        self.augmented[:n_base, :dim] = base
        self.augmented[:n_base, :dim] *= -2.0
        self.augmented[:n_base, dim] = np.einsum("ij,ij->i", base, base)
        self.augmented[n_base:, dim] = np.inf
        self.gemm = get_blas_funcs("gemm", dtype=dtype)
        self.group_columns = self.n_groups * np.arange(self.per_group)

    def rows_for(self, n_queries: int) -> int:
        # 8 bytes per buffer entry, as the previous search reserved (float32 values and a copy).
        budget = int(WORKSPACE_MB * MB // (self.augmented.shape[0] * 8))
        return max(1, min(_CANDIDATE_ROWS, budget, n_queries))

    def allocate(self, n_rows: int) -> None:
        self.buffer = np.empty((n_rows, self.augmented.shape[0]), dtype=self.dtype)
        self.rows = np.ones((n_rows, self.dim + 1), dtype=self.dtype)
        self.minima = np.empty((n_rows, self.n_groups), dtype=self.dtype)

    def __call__(
        self, queries: np.ndarray, excluded: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Candidates of a block of queries as (row, column) pairs, row-major: per row at least
        the ``n_candidates`` smallest values, and every value <= the threshold (ties)."""
        n_rows, k = queries.shape[0], self.n_candidates
        rows = self.rows[:n_rows]
        rows[:, : self.dim] = queries
        values = self.buffer[:n_rows]
        # The transposes of the C-ordered arrays are the column-major operands BLAS takes.
        self.gemm(1.0, self.augmented.T, rows.T, c=values.T, trans_a=1, overwrite_c=1)
        if excluded is not None:
            np.copyto(values[:, : self.n_base], np.inf, where=excluded)
        grouped = values.reshape(n_rows, self.per_group, self.n_groups)
        minima = np.min(grouped, axis=1, out=self.minima[:n_rows])
        threshold = np.partition(minima, k - 1, axis=1)[:, k - 1]
        hit_rows, hit_groups = np.nonzero(minima <= threshold[:, None])
        hits = grouped[hit_rows, :, hit_groups]  # (hits, per_group)
        within = hits <= threshold[hit_rows, None]
        if np.isinf(threshold).any():  # the padding (inf) is then <= the threshold: not a column
            within &= hit_groups[:, None] + self.group_columns < self.n_base
        pair, slot = np.nonzero(within)
        return hit_rows[pair], hit_groups[pair] + self.n_groups * slot


def nearest_sq_distances(
    queries: np.ndarray, base: np.ndarray, n_neighbors: int, excluded: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by brute force: (squared distances, indices), ascending.

    Candidates (at least the k + 4 smallest per query) come from the fast expansion
    |q|^2 + |b|^2 - 2 q.b, whose rounding error is large for near-identical vectors
    (:class:`CandidateSearch`, blocks of query rows sharing one reused buffer); their distances
    are then recomputed from direct differences, so a training image scored against itself gets
    exactly 0, and the k nearest kept, ties to the lower index. ``excluded`` (n_queries,
    n_base) marks pairs that may not be neighbours.
    """
    n_candidates = min(n_neighbors + 4, base.shape[0])
    dtype = np.result_type(queries.dtype, base.dtype)
    base = np.ascontiguousarray(base, dtype=dtype)
    sq_distances = np.empty((queries.shape[0], n_neighbors), dtype=queries.dtype)
    indices = np.empty((queries.shape[0], n_neighbors), dtype=np.int64)
    search = CandidateSearch(base, n_candidates, dtype)
    step = search.rows_for(queries.shape[0])
    search.allocate(step)
    for start in range(0, queries.shape[0], step):
        block = slice(start, start + step)
        rows = np.asarray(queries[block], dtype=dtype)
        row, column = search(rows, None if excluded is None else excluded[block])
        diff = base[column]
        np.subtract(diff, rows[row], out=diff)
        exact = np.einsum("pd,pd->p", diff, diff)
        if excluded is not None:
            exact[excluded[block][row, column]] = np.inf
        # Per row, its candidates padded with (inf, n_base) to the longest row's count.
        counts = np.bincount(row, minlength=rows.shape[0])
        position = np.arange(row.size) - np.repeat(np.cumsum(counts) - counts, counts)
        padded = np.full((rows.shape[0], int(counts.max())), np.inf, dtype=exact.dtype)
        ids = np.full(padded.shape, base.shape[0], dtype=np.int64)
        padded[row, position] = exact
        ids[row, position] = column
        # The k smallest by (distance, index): index order first, then a stable sort.
        by_index = np.argsort(ids, axis=1)
        padded = np.take_along_axis(padded, by_index, axis=1)
        ids = np.take_along_axis(ids, by_index, axis=1)
        order = np.argsort(padded, axis=1, kind="stable")[:, :n_neighbors]
        sq_distances[block] = np.take_along_axis(padded, order, axis=1)
        indices[block] = np.take_along_axis(ids, order, axis=1)
    return sq_distances, indices
