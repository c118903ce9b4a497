"""Gaussian building blocks shared by Mahalanobis and PaDiM: batched Ledoit-Wolf shrinkage,
Cholesky factors and whitening."""

from __future__ import annotations

import numpy as np
import torch


def ledoit_wolf(x: np.ndarray, reg_covar: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ledoit-Wolf shrunk covariance of a batch of sample sets, in float64.

    ``x`` has shape (..., n_samples, n_features); returns ``(mean (..., d), covariance (..., d,
    d), shrinkage (...))``. The closed form is scikit-learn's ``ledoit_wolf`` (maximum-likelihood
    covariance S, target mu*I with mu = trace(S)/d), vectorised over the leading axes.
    ``reg_covar`` is added to the diagonal afterwards (0 keeps the estimator exact; PaDiM's
    original code adds 0.01).
    """
    x = torch.as_tensor(np.asarray(x, dtype=np.float64))
    n_samples = x.shape[-2]
    if n_samples < 2:
        raise ValueError(f"a covariance needs at least 2 training samples, got {n_samples}")
    mean = x.mean(dim=-2)
    centred = x - mean[..., None, :]
    emp_cov = torch.matmul(centred.mT, centred) / n_samples
    fourth = ((centred**2).sum(-1) ** 2).sum(-1)
    cov, shrinkage = shrunk_covariance(emp_cov, fourth, n_samples, reg_covar)
    return mean.numpy(), cov.numpy(), shrinkage.numpy()


def shrunk_covariance(
    emp_cov: torch.Tensor, fourth: torch.Tensor, n_samples: int, reg_covar: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ledoit-Wolf shrinkage of batched maximum-likelihood covariances ``emp_cov`` (..., d, d).

    ``fourth`` (...) is sum_k ||x_k||^4 over the centred samples x_k: scikit-learn's
    sum((X^2)^T X^2), the fourth-moment term of the shrinkage intensity. Both come from sums
    over the samples that a caller may compute in float32; the closed form itself runs in
    float64 (its terms are differences of sums of squares). Returns (covariance, shrinkage).
    """
    emp_cov = emp_cov.to(torch.float64)
    fourth = fourth.to(torch.float64)
    n_features = emp_cov.shape[-1]
    trace = torch.diagonal(emp_cov, dim1=-2, dim2=-1).sum(-1)
    mu = trace / n_features
    cov_sq_sum = (emp_cov**2).sum(dim=(-2, -1))
    beta = (fourth / n_samples - cov_sq_sum) / (n_features * n_samples)
    delta = (cov_sq_sum - 2.0 * mu * trace + n_features * mu**2) / n_features
    beta = torch.minimum(beta, delta)
    shrinkage = torch.where(delta > 0, beta / torch.where(delta > 0, delta, 1.0), 0.0)
    if n_features == 1:
        shrinkage = torch.zeros_like(shrinkage)
    cov = (1.0 - shrinkage)[..., None, None] * emp_cov
    torch.diagonal(cov, dim1=-2, dim2=-1).add_((shrinkage * mu)[..., None] + reg_covar)
    return cov, shrinkage


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


def inverse_cholesky(cov: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """W = L^-1 (batched, float64) for covariances C = L L^T: ||W (x - mu)|| is the
    Mahalanobis distance, so scoring many vectors is one matrix product per Gaussian."""
    # numpy's batched Cholesky was about twice as fast as torch's on small matrices (measured).
    try:
        chol = torch.from_numpy(np.linalg.cholesky(np.asarray(cov, dtype=np.float64)))
    except np.linalg.LinAlgError:
        cholesky_factors(cov, what)  # raises the explanatory error
        raise
    identity = torch.eye(chol.shape[-1], dtype=chol.dtype).expand_as(chol)
    return torch.linalg.solve_triangular(chol, identity, upper=False).numpy()
