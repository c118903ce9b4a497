"""The contamination of a training set estimated from its self-scores (``ratio: auto``).

Refinement removes the highest-scored training images, but how many is a guess unless the
pollution rate is known, which it never is in practice. :func:`estimate_contamination` reads it
off the self-scores themselves: the bulk of healthy images sets a robust location and scale, and
the images far in the upper tail are counted as contamination.

The estimator (Iglewicz and Hoaglin's modified z-score, one-sided, on log-scores):

1. ``v = log(scores)`` when every score is positive (distances and Mahalanobis scores are, and
   their healthy bulk is right-skewed: the log makes it nearly symmetric), else ``v = scores``;
2. location ``m = median(v)``, scale ``s = 1.4826 * MAD(v)`` (the normal-consistent median
   absolute deviation; ``1.2533 * mean |v - m|`` when more than half the values tie, MAD = 0);
3. an image is contamination when ``(v - m) / s > threshold`` (default 3.5, Iglewicz and
   Hoaglin's cut for outliers); the estimate is the fraction of such images.

The median and MAD ignore up to half the sample, so contamination does not drag the cut towards
itself the way a mean and standard deviation would. Since the cut is a score, the images counted
are exactly the highest-ranked ones: removing ``estimate * n`` images by rank removes those above
it. Failure modes are measured in docs/clean.md.
"""

from __future__ import annotations

import numpy as np

# Iglewicz and Hoaglin (1993), "How to detect and handle outliers": |modified z| > 3.5.
DEFAULT_THRESHOLD = 3.5
# Normal-consistency factors: sigma = 1.4826 MAD = 1.2533 mean absolute deviation.
_MAD_TO_SIGMA = 1.4826
_MEAN_AD_TO_SIGMA = 1.2533


def _log_if_positive(scores: np.ndarray) -> tuple[np.ndarray, bool]:
    """The values the bulk is measured on, and whether they are log-scores."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size < 3:
        raise ValueError(f"need a 1-d array of at least 3 scores, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        bad = np.flatnonzero(~np.isfinite(scores))[:5].tolist()
        raise ValueError(f"scores at positions {bad} are not finite: fix the detector's input")
    if (scores > 0).all():
        return np.log(scores), True
    return scores, False


def _location_scale(values: np.ndarray) -> tuple[float, float]:
    location = float(np.median(values))
    deviations = np.abs(values - location)
    scale = _MAD_TO_SIGMA * float(np.median(deviations))
    if scale == 0:
        scale = _MEAN_AD_TO_SIGMA * float(np.mean(deviations))
    return location, scale


def robust_z_scores(scores: np.ndarray) -> np.ndarray:
    """One-sided modified z-scores of ``scores`` (log-scale when all are positive), float64.

    Raises ``ValueError`` for fewer than 3 scores or a score that is not finite. All scores equal
    give z = 0 everywhere: nothing stands out.
    """
    values, _ = _log_if_positive(scores)
    location, scale = _location_scale(values)
    if scale == 0:
        return np.zeros_like(values)
    return (values - location) / scale


def tail_cut(scores: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> float:
    """The score above which an image counts as contamination (z-score ``threshold``), in the
    units of ``scores``."""
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    values, logged = _log_if_positive(scores)
    location, scale = _location_scale(values)
    cut = location + threshold * scale
    return float(np.exp(cut)) if logged else cut


def estimate_contamination(scores: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> float:
    """Estimated fraction of contaminated (anomalous) images among those with these self-scores
    (higher = more anomalous): the share whose robust z-score exceeds ``threshold``.

    See the module docstring for the estimator; docs/clean.md for its accuracy and failure modes.
    """
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.count_nonzero(scores > tail_cut(scores, threshold)) / scores.size)
