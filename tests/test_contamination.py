"""The ``ratio: auto`` estimator on synthetic self-score distributions of known contamination."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special, stats

from sroc.contamination import estimate_contamination, robust_z_scores, tail_cut

RATIOS = (0.0, 0.05, 0.1, 0.15, 0.2)


def polluted_scores(
    n: int, ratio: float, rng: np.random.Generator, shift: tuple[float, float], bulk: str
) -> np.ndarray:
    """Self-scores of ``n`` images of which ``round(ratio * n)`` are contaminated.

    Healthy scores: lognormal (log-sd 0.1) or gamma (shape 20, log-sd 0.227), both
    right-skewed like distances. A contaminated image's score is a healthy one multiplied by
    exp(u * log_sd), u uniform in ``shift``: ``shift`` is the separation in healthy log-sds.
    """
    n_bad = round(ratio * n)
    log_sd = 0.1 if bulk == "lognormal" else np.sqrt(special.polygamma(1, 20.0))

    def healthy(count):
        if bulk == "lognormal":
            return np.exp(rng.normal(0.0, 0.1, count))
        return rng.gamma(20.0, 1 / 20.0, count)

    bad = healthy(n_bad) * np.exp(log_sd * rng.uniform(*shift, n_bad))
    return rng.permutation(np.concatenate([healthy(n - n_bad), bad]))


def test_z_scores_match_scipy_median_absolute_deviation():
    scores = np.random.default_rng(0).gamma(3.0, 2.0, 101)
    log_scores = np.log(scores)
    reference = (log_scores - np.median(log_scores)) / stats.median_abs_deviation(
        log_scores, scale="normal"
    )
    np.testing.assert_allclose(robust_z_scores(scores), reference, rtol=1e-4)


def test_scores_with_zero_or_negative_values_are_used_as_they_are():
    scores = np.random.default_rng(1).normal(0.0, 1.0, 51)
    reference = (scores - np.median(scores)) / stats.median_abs_deviation(scores, scale="normal")
    np.testing.assert_allclose(robust_z_scores(scores), reference, rtol=1e-4)


def test_estimate_is_invariant_to_the_scale_of_the_scores():
    scores = polluted_scores(200, 0.1, np.random.default_rng(2), (6, 12), "gamma")
    assert estimate_contamination(scores) == estimate_contamination(scores * 1e4)


def test_ties_in_the_bulk_fall_back_to_the_mean_absolute_deviation():
    scores = np.array([1.0] * 8 + [1.2, 50.0])
    z = robust_z_scores(scores)
    log_scores = np.log(scores)
    expected_scale = 1.2533 * np.mean(np.abs(log_scores))
    np.testing.assert_allclose(z, log_scores / expected_scale)
    assert estimate_contamination(scores) == pytest.approx(0.1)
    assert estimate_contamination(np.full(20, 3.0)) == 0.0


@pytest.mark.parametrize("bulk", ["lognormal", "gamma"])
@pytest.mark.parametrize("n", [50, 200, 1000])
def test_clean_sets_lose_under_two_percent(bulk, n):
    rng = np.random.default_rng(n)
    estimates = np.array(
        [estimate_contamination(polluted_scores(n, 0.0, rng, (0, 0), bulk)) for _ in range(40)]
    )
    assert estimates.mean() < 0.005
    # At most one image of 50 (2 %); under 2 % from 200 images on.
    assert estimates.max() <= (1 / n if n < 100 else 0.015)


@pytest.mark.parametrize("bulk", ["lognormal", "gamma"])
@pytest.mark.parametrize("ratio", RATIOS[1:])
def test_separated_contamination_is_recovered(bulk, ratio):
    rng = np.random.default_rng(int(ratio * 100))
    estimates = np.array(
        [estimate_contamination(polluted_scores(200, ratio, rng, (8, 16), bulk)) for _ in range(40)]
    )
    assert abs(estimates.mean() - ratio) <= 0.015
    assert np.abs(estimates - ratio).max() <= 0.04


@pytest.mark.parametrize("ratio", RATIOS[1:])
def test_overlapping_contamination_is_underestimated_never_overestimated(ratio):
    rng = np.random.default_rng(7)
    estimates = np.array(
        [
            estimate_contamination(polluted_scores(200, ratio, rng, (0, 4), "lognormal"))
            for _ in range(40)
        ]
    )
    assert estimates.mean() < 0.5 * ratio
    assert estimates.max() <= ratio


@pytest.mark.parametrize(
    "scores, message",
    [(np.array([1.0, 2.0]), "at least 3"), (np.array([1.0, np.nan, 2.0]), "not finite")],
)
def test_bad_scores_are_refused(scores, message):
    with pytest.raises(ValueError, match=message):
        estimate_contamination(scores)


@pytest.mark.parametrize("shift", [0.0, -5.0])
def test_the_tail_cut_separates_exactly_the_images_counted(shift):
    rng = np.random.default_rng(3)
    scores = polluted_scores(300, 0.1, rng, (3, 10), "gamma") + shift
    above = scores > tail_cut(scores)
    assert np.array_equal(above, robust_z_scores(scores) > 3.5)
    assert above.mean() == estimate_contamination(scores)
