"""Gaussian building blocks shared by Mahalanobis and PaDiM: batched Ledoit-Wolf shrinkage,
Cholesky factors and whitening."""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular
from scipy.linalg.lapack import dpotrf, dtrtri


def ledoit_wolf(x: np.ndarray, reg_covar: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ledoit-Wolf shrunk covariance of a batch of sample sets, in float64.

    ``x`` has shape (..., n_samples, n_features); returns ``(mean (..., d), covariance (..., d,
    d), shrinkage (...))``. The closed form is scikit-learn's ``ledoit_wolf`` (maximum-likelihood
    covariance S, target mu*I with mu = trace(S)/d), vectorised over the leading axes.
    ``reg_covar`` is added to the diagonal afterwards (0 keeps the estimator exact; PaDiM's
    original code adds 0.01).
    """
    x = np.asarray(x, dtype=np.float64)
    n_samples = x.shape[-2]
    if n_samples < 2:
        raise ValueError(f"a covariance needs at least 2 training samples, got {n_samples}")
    mean = x.mean(axis=-2)
    centred = x - mean[..., None, :]
    scatter = np.matmul(centred.swapaxes(-1, -2), centred)
    fourth = ((centred**2).sum(-1) ** 2).sum(-1)
    cov, shrinkage = shrunk_covariance(scatter, fourth, n_samples, reg_covar)
    return mean, cov, shrinkage


def shrunk_covariance(
    scatter: np.ndarray,
    fourth: np.ndarray,
    n_samples: int,
    reg_covar: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Ledoit-Wolf shrinkage of batched scatter matrices ``scatter`` (..., d, d), the sums
    sum_k x_k x_k^T over centred samples (the maximum-likelihood covariance times n).

    ``fourth`` (...) is sum_k ||x_k||^4 over the centred samples x_k: scikit-learn's
    sum((X^2)^T X^2), the fourth-moment term of the shrinkage intensity. Both come from sums
    over the samples that a caller may compute in float32; the closed form itself runs in
    float64 (its terms are differences of sums of squares), and the shrunk covariance is written
    in float64 in one pass over the scatter. Returns (covariance, shrinkage) as numpy arrays.
    """
    scatter = np.asarray(scatter)
    n_features = scatter.shape[-1]
    trace = np.einsum("...ii->...", scatter, dtype=np.float64) / n_samples
    cov_sq_sum = np.einsum("...ij,...ij->...", scatter, scatter, dtype=np.float64) / n_samples**2
    shrinkage, mu = _shrinkage(
        trace, cov_sq_sum, np.asarray(fourth, dtype=np.float64), n_samples, n_features
    )
    cov = np.multiply(scatter, ((1.0 - shrinkage) / n_samples)[..., None, None], dtype=np.float64)
    np.einsum("...ii->...i", cov)[...] += (shrinkage * mu + reg_covar)[..., None]
    return cov, shrinkage


def _shrinkage(
    trace: np.ndarray,
    cov_sq_sum: np.ndarray,
    fourth: np.ndarray,
    n_samples: int,
    n_features: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Ledoit-Wolf shrinkage and target scale mu = trace/d from trace(S), ||S||_F^2 and
    sum_k ||x_k||^4 (scikit-learn's closed form)."""
    mu = trace / n_features
    beta = (fourth / n_samples - cov_sq_sum) / (n_features * n_samples)
    delta = (cov_sq_sum - 2.0 * mu * trace + n_features * mu**2) / n_features
    beta = np.minimum(beta, delta)
    shrinkage = np.where(delta > 0, beta / np.where(delta > 0, delta, 1.0), 0.0)
    if n_features == 1:
        shrinkage = np.zeros_like(shrinkage)
    return shrinkage, mu


def leave_one_out_mahalanobis(
    x: np.ndarray, reg_covar: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Squared Mahalanobis distance of each sample to the Ledoit-Wolf Gaussian of the *other*
    samples, and that Gaussian's precision times the sample's offset, in closed form.

    ``x`` (..., n, d) float64. Returns ``(sq_distances (..., n), precision_offsets (..., n,
    d))``, equal to refitting ``ledoit_wolf(x without sample i, reg_covar)`` for each i (mean,
    covariance, *and* shrinkage recomputed). With c_i = x_i - mean and S the covariance of all
    n samples (MLE), leaving i out gives the mean mean - c_i/(n-1) and the covariance
    S_-i = n/(n-1) (S - c_i c_i^T/(n-1)); the shrinkage's trace, Frobenius and fourth-moment
    terms follow from S's eigendecomposition and c_i, and the shrunk covariance
    a_i S + b_i I - g_i c_i c_i^T is inverted on c_i by Sherman-Morrison. Cost: one
    eigendecomposition and O(n d^2) per Gaussian, instead of n refits.
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape[-2:]
    if n < 3:
        raise ValueError(f"leave-one-out needs at least 3 training samples, got {n}")
    m = n - 1
    centred = x - x.mean(axis=-2, keepdims=True)
    emp_cov = np.matmul(centred.swapaxes(-1, -2), centred) / n
    eigenvalues, eigenvectors = np.linalg.eigh(emp_cov)
    projections = np.matmul(centred, eigenvectors)  # (..., n, d)
    sq_norms = (centred**2).sum(-1)  # a_i
    quad = (projections**2 * eigenvalues[..., None, :]).sum(-1)  # c_i^T S c_i
    weighted = (sq_norms[..., None] * centred).sum(-2)  # sum_j a_j c_j
    cross = (centred * weighted[..., None, :]).sum(-1)  # c_i . sum_j a_j c_j
    trace = eigenvalues.sum(-1)[..., None]
    cov_sq_sum = (eigenvalues**2).sum(-1)[..., None]
    loo_trace = n / m * (trace - sq_norms / m)
    loo_cov_sq_sum = (n / m) ** 2 * (cov_sq_sum - 2.0 * quad / m + sq_norms**2 / m**2)
    # sum_{j != i} ||c_j + c_i/(n-1)||^4, expanded over all j, minus the j = i term.
    shift, twice = sq_norms / m**2, 2.0 / m
    all_terms = (
        (sq_norms**2).sum(-1, keepdims=True)
        + 2.0 * shift * sq_norms.sum(-1, keepdims=True)
        + n * shift**2
        + 2.0 * twice * cross
        + twice**2 * n * quad
    )
    loo_fourth = all_terms - (sq_norms * (1.0 + twice) + shift) ** 2
    shrinkage, mu = _shrinkage(loo_trace, loo_cov_sq_sum, loo_fourth, m, d)
    scale = (1.0 - shrinkage) * n / m
    ridge = shrinkage * mu + reg_covar
    rank_one = scale / m
    inverse_diagonal = 1.0 / (scale[..., None] * eigenvalues[..., None, :] + ridge[..., None])
    quad_inverse = (projections**2 * inverse_diagonal).sum(-1)  # c^T A^-1 c
    denominator = 1.0 - rank_one * quad_inverse
    sq_distances = (n / m) ** 2 * quad_inverse / denominator
    precision_offsets = (
        np.matmul(projections * inverse_diagonal, eigenvectors.swapaxes(-1, -2))
        * (n / m / denominator)[..., None]
    )
    return sq_distances, precision_offsets


def cholesky_factors(cov: np.ndarray, what: str) -> np.ndarray:
    """Lower Cholesky factors L of covariances C = L L^T (batched, float64), so that the
    Mahalanobis distance is ||L^-1 (x - mu)||, a sum of squares that cannot go negative."""
    try:
        return np.linalg.cholesky(np.asarray(cov, dtype=np.float64))
    except np.linalg.LinAlgError:
        raise ValueError(
            f"the covariance of {what} is singular (constant features and no shrinkage); set "
            "reg_covar > 0 (e.g. 0.01 as PaDiM) or use fewer features"
        ) from None


def whiten(chol: np.ndarray, centred: np.ndarray) -> np.ndarray:
    """z = L^-1 x for rows x of ``centred`` (..., m, d), with L (..., d, d) lower triangular:
    ||z|| is the Mahalanobis distance. A triangular solve costs what a product with a stored
    inverse would, without forming the inverse."""
    chol, centred = np.asarray(chol), np.asarray(centred)
    batch = np.broadcast_shapes(chol.shape[:-2], centred.shape[:-2])
    chol = np.broadcast_to(chol, (*batch, *chol.shape[-2:]))
    centred = np.broadcast_to(centred, (*batch, *centred.shape[-2:]))
    out = np.empty(centred.shape, dtype=np.result_type(chol, centred))
    for index in np.ndindex(batch):
        out[index] = solve_triangular(chol[index], centred[index].T, lower=True).T
    return out


def inverse_cholesky(cov: np.ndarray, what: str, out: np.ndarray | None = None) -> np.ndarray:
    """W = L^-1 (batched, lower triangular) for covariances C = L L^T, computed in float64:
    ||W (x - mu)|| is the Mahalanobis distance, so scoring many vectors is one matrix product
    per Gaussian. Written to ``out`` (any float dtype, e.g. float32 for scoring) when given, else
    to a new float64 array."""
    cov = np.asarray(cov, dtype=np.float64)
    batch = cov.reshape(-1, *cov.shape[-2:])
    inverses = np.empty(cov.shape) if out is None else out
    # LAPACK's potrf and trtri one matrix at a time: faster on these small matrices than the
    # batched Cholesky and triangular solve of numpy and torch (measured: 29 against 35 ms for
    # 288 matrices of 100 x 100). A symmetric C-ordered matrix is its own column-major transpose.
    for matrix, inverse in zip(batch, inverses.reshape(batch.shape), strict=True):
        chol, info = dpotrf(matrix.T, lower=1, clean=1)
        if info != 0:
            cholesky_factors(matrix, what)  # raises the explanatory error
            raise np.linalg.LinAlgError(f"the covariance of {what} is not positive definite")
        inverse[...] = dtrtri(chol, lower=1)[0]
    return inverses
