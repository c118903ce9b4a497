"""Paired statistics across seeds for the paper's claims.

Each claim compares two conditions that share their splits: the same seed gives the same
polluted training set and test set to both. The unit of pairing is the seed; the value per seed
is the metric averaged over categories (the paper's "Mean" row). The report gives the mean
paired difference and a two-sided t confidence interval (n_seeds - 1 degrees of freedom).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats

from sroc import strategies
from sroc.report.tables import refiner_runs, seed_means

STAT_COLUMNS = ["n_seeds", "mean_difference", "std_difference", "ci_low", "ci_high"]


def paired_difference(a: pd.Series, b: pd.Series, confidence: float = 0.95) -> dict:
    """Mean of ``a - b`` over the seeds both hold (the index), its standard deviation and a
    t confidence interval; the interval is NaN with fewer than two seeds."""
    a, b = a.align(b, join="inner")
    differences = (a - b).dropna().to_numpy(dtype=float)
    n = len(differences)
    mean = differences.mean() if n else np.nan
    std = differences.std(ddof=1) if n > 1 else np.nan
    half_width = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / np.sqrt(n) if n > 1 else np.nan
    return {
        "n_seeds": n,
        "mean_difference": mean,
        "std_difference": std,
        "ci_low": mean - half_width,
        "ci_high": mean + half_width,
    }


def _has_ratio_curve_of_its_own(name: str) -> bool:
    """A strategy refined at every ratio and ranked by the detector itself (the refiner's
    rankings are compared in :func:`refiner_gains`)."""
    if name == "none":
        return False
    strategy = strategies.get(name)
    return strategy.has_ratio_curve and not strategy.uses_refiner


def _at_ratio(runs: pd.DataFrame, column: str, ratio: float) -> pd.DataFrame:
    return runs[np.isclose(runs[column].to_numpy(), ratio)]


def refinement_gains(
    runs: pd.DataFrame, metric: str = "image_auroc", refiner: str = "mahalanobis"
) -> pd.DataFrame:
    """The claim "refinement helps": per detector and strategy, the metric after removing as
    many images as were injected (refinement ratio = pollution ratio) minus the unrefined
    detector's (refinement ratio 0 of the same strategy)."""
    refined = runs[runs["strategy"].map(_has_ratio_curve_of_its_own)]
    by_refiner, own = refiner_runs(runs, refiner)
    by_refiner = by_refiner[~by_refiner["detector"].isin(own)]  # those repeat their sroc rows
    compared = [(s, refined[refined["strategy"] == s]) for s in refined["strategy"].unique()]
    compared.append((f"by_refiner ({refiner})", by_refiner))
    rows = []
    for strategy, subset in compared:
        if subset.empty:
            continue
        pollution = float(subset["pollution_ratio"].iloc[0])
        after = seed_means(_at_ratio(subset, "refinement_ratio", pollution), metric, ["detector"])
        before = seed_means(_at_ratio(subset, "refinement_ratio", 0.0), metric, ["detector"])
        for detector in subset["detector"].unique():
            if detector not in after.index or detector not in before.index:
                continue
            rows.append(
                {
                    "claim": "refinement helps",
                    "comparison": f"{strategy} at {100 * pollution:g}% refinement minus unrefined",
                    "detector": detector,
                    "metric": metric,
                    **paired_difference(after.loc[detector], before.loc[detector]),
                }
            )
    return pd.DataFrame(rows, columns=["claim", "comparison", "detector", "metric", *STAT_COLUMNS])


def refiner_gains(
    runs: pd.DataFrame, metric: str = "image_auroc", refiner: str = "mahalanobis"
) -> pd.DataFrame:
    """Appendix B: per detector, the metric at refinement ratio = pollution ratio when the
    refiner ranks the training set minus when the detector ranks it itself (SROC)."""
    by_refiner, own = refiner_runs(runs, refiner)
    by_refiner = by_refiner[~by_refiner["detector"].isin(own)]
    sroc = runs[runs["strategy"] == "sroc"]
    rows = []
    if by_refiner.empty or sroc.empty:
        return pd.DataFrame(
            rows, columns=["claim", "comparison", "detector", "metric", *STAT_COLUMNS]
        )
    pollution = float(by_refiner["pollution_ratio"].iloc[0])
    refined = seed_means(_at_ratio(by_refiner, "refinement_ratio", pollution), metric, ["detector"])
    reference = seed_means(_at_ratio(sroc, "refinement_ratio", pollution), metric, ["detector"])
    for detector in by_refiner["detector"].unique():
        if detector not in reference.index:
            continue
        rows.append(
            {
                "claim": f"refining with {refiner} helps more",
                "comparison": f"ranked by {refiner} minus ranked by itself, at "
                f"{100 * pollution:g}% refinement",
                "detector": detector,
                "metric": metric,
                **paired_difference(refined.loc[detector], reference.loc[detector]),
            }
        )
    return pd.DataFrame(rows, columns=["claim", "comparison", "detector", "metric", *STAT_COLUMNS])


def robustness_differences(
    runs: pd.DataFrame, metric: str = "image_auroc", low: float = 0.0, high: float | None = None
) -> pd.DataFrame:
    """The claim "detector A is more robust than B": per pair, A's drop of the metric from
    ``low`` to ``high`` pollution (default: the highest) minus B's; negative means A loses
    less."""
    curve = runs[runs["strategy"] == "none"]
    high = float(curve["pollution_ratio"].max()) if high is None else high
    drop = seed_means(_at_ratio(curve, "pollution_ratio", low), metric, ["detector"]) - seed_means(
        _at_ratio(curve, "pollution_ratio", high), metric, ["detector"]
    )
    rows = []
    for first, second in combinations(list(curve["detector"].unique()), 2):
        rows.append(
            {
                "claim": "A more robust than B",
                "comparison": f"drop {100 * low:g}%->{100 * high:g}% pollution: "
                f"{first} minus {second}",
                "detector": f"{first} vs {second}",
                "metric": metric,
                **paired_difference(drop.loc[first], drop.loc[second]),
            }
        )
    return pd.DataFrame(rows, columns=["claim", "comparison", "detector", "metric", *STAT_COLUMNS])


def paired_statistics(
    runs: pd.DataFrame, metric: str = "image_auroc", refiner: str = "mahalanobis"
) -> pd.DataFrame:
    """Every claim of the paper tested on ``runs``, one row per comparison."""
    return pd.concat(
        [
            refinement_gains(runs, metric, refiner),
            refiner_gains(runs, metric, refiner),
            robustness_differences(runs, metric),
        ],
        ignore_index=True,
    )
