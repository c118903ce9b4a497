"""Exact nearest-neighbour search and distance metrics shared by KNN and PatchCore."""

from __future__ import annotations

import numpy as np
from scipy.linalg.blas import get_blas_funcs

from sroc.detectors.base import _MB, WORKSPACE_MB

_METRICS = ("euclidean", "sqeuclidean")


def _check_metric(metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")


def _apply_metric(sq_distances: np.ndarray, metric: str) -> np.ndarray:
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


class _CandidateSearch:
    """The ``n_candidates`` smallest of |b|^2 - 2 q.b over the base rows b, for blocks of query
    rows q: the order of each query's distances, without its row-constant |q|^2.

    One BLAS product per block writes the reused (rows x base) buffer: the base is stored as
    [-2 b, |b|^2] and each query as [q, 1], so the norms come with the product, and padding rows
    [0, inf] round the base up to a multiple of the group count. One strided pass takes the
    minimum of each group of columns (c % groups). The ``n_candidates`` smallest values lie in
    the groups whose minimum is at most t, the ``n_candidates``-th smallest minimum (they hold
    at least that many values <= t, and any value elsewhere is >= t): only those groups'
    columns are read again, and the smallest values <= t kept, ties to the lower index. Exact
    (the same candidates as a full sort), and no reduction sums across threads: BLAS splits the
    product by rows and columns, never along the summed axis.
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
        budget = int(WORKSPACE_MB * _MB // self.augmented.nbytes * (self.dim + 1))
        return max(1, min(_CANDIDATE_ROWS, budget, n_queries))

    def allocate(self, n_rows: int) -> None:
        self.buffer = np.empty((n_rows, self.augmented.shape[0]), dtype=self.dtype)
        self.rows = np.ones((n_rows, self.dim + 1), dtype=self.dtype)
        self.minima = np.empty((n_rows, self.n_groups), dtype=self.dtype)

    def __call__(self, queries: np.ndarray, excluded: np.ndarray | None) -> np.ndarray:
        """Candidate indices (q, n_candidates) of a block of queries, ascending."""
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
        columns = hit_groups[:, None] + self.group_columns
        pair, slot = np.nonzero((hits <= threshold[hit_rows, None]) & (columns < self.n_base))
        row, column, value = hit_rows[pair], columns[pair, slot], hits[pair, slot]
        # At least k candidates per row, each row's together (nonzero is row-major).
        counts = np.bincount(row, minlength=n_rows)
        width = int(counts.max())
        if width == k:
            return np.sort(column.reshape(n_rows, k), axis=1)
        position = np.arange(row.size) - np.repeat(np.cumsum(counts) - counts, counts)
        padded_values = np.full((n_rows, width), np.inf, dtype=self.dtype)
        padded_columns = np.full((n_rows, width), self.n_base, dtype=np.int64)
        padded_values[row, position] = value
        padded_columns[row, position] = column
        # The k smallest by (value, index): index order first, then a stable sort by value.
        by_index = np.argsort(padded_columns, axis=1)
        padded_values = np.take_along_axis(padded_values, by_index, axis=1)
        padded_columns = np.take_along_axis(padded_columns, by_index, axis=1)
        order = np.argsort(padded_values, axis=1, kind="stable")[:, :k]
        return np.sort(np.take_along_axis(padded_columns, order, axis=1), axis=1)


def _nearest_sq_distances(
    queries: np.ndarray, base: np.ndarray, n_neighbors: int, excluded: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by brute force: (squared distances, indices), ascending.

    Candidates (k + 4 per query) come from the fast expansion |q|^2 + |b|^2 - 2 q.b, whose
    rounding error is large for near-identical vectors (:class:`_CandidateSearch`, blocks of
    query rows sharing one reused buffer); the kept distances are then recomputed from direct
    differences, so a training image scored against itself gets exactly 0, and ties go to the
    lower index. ``excluded`` (n_queries, n_base) marks pairs that may not be neighbours.
    """
    n_candidates = min(n_neighbors + 4, base.shape[0])
    dtype = np.result_type(queries.dtype, base.dtype)
    base = np.ascontiguousarray(base, dtype=dtype)
    sq_distances = np.empty((queries.shape[0], n_neighbors), dtype=queries.dtype)
    indices = np.empty((queries.shape[0], n_neighbors), dtype=np.int64)
    search = _CandidateSearch(base, n_candidates, dtype)
    step = search.rows_for(queries.shape[0])
    search.allocate(step)
    for start in range(0, queries.shape[0], step):
        block = slice(start, start + step)
        rows = queries[block]
        candidates = search(rows, None if excluded is None else excluded[block])
        exact = exact_sq_distances(rows, base, candidates)
        if excluded is not None:
            exact[np.take_along_axis(excluded[block], candidates, axis=1)] = np.inf
        order = np.argsort(exact, axis=1, kind="stable")[:, :n_neighbors]
        sq_distances[block] = np.take_along_axis(exact, order, axis=1)
        indices[block] = np.take_along_axis(candidates, order, axis=1)
    return sq_distances, indices
