"""Each strategy that estimates its refinement ratio from the data (``sroc_auto``,
``ensemble_auto``) against the best fixed refinement ratio chosen with hindsight.

Such a strategy removes the leading images of a ranking, as many as
:func:`sroc.contamination.estimate_contamination` finds in the tail of its scores: ``sroc_auto``
those of the leave-one-out SROC ranking (``sroc_loo``), ``ensemble_auto`` those of the sparse
ensembles (``ensemble_oob``). The registry names that ranking (``Strategy.auto_ratio_of``, in
order of preference: ``sroc_auto`` falls back to ``sroc`` when the grid has no ``sroc_loo``). The
fair comparison is therefore the same ranking at a fixed ratio: per detector, the refinement
ratio of that ranking whose metric, averaged over categories and seeds, is highest. That choice
needs the test labels, which a user does not have: it is the ceiling that a ratio chosen from
the data can reach.

Per detector and such strategy, on the metric averaged over categories within each seed (the
paper's "Mean" row): the mean estimated ratio and the metric of the strategy; the best fixed
ratio and its metric; ``difference = auto - best`` with its paired t interval over seeds (the
same seed gives both the same splits); the unrefined detector at the same pollution (refinement
ratio 0) for scale.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sroc import strategies
from sroc.report.stats import paired_difference
from sroc.report.tables import seed_means

AUTO_RATIO_COLUMNS = [
    "detector", "strategy", "ranking", "metric", "pollution_ratio", "n_seeds", "auto_ratio",
    "auto", "best_ratio", "best", "difference", "difference_ci_low", "difference_ci_high",
    "unrefined",
]  # fmt: skip


def auto_ratio_table(runs: pd.DataFrame, metric: str = "image_auroc") -> pd.DataFrame:
    """One row per detector and ratio-estimating strategy that ran with one of its fixed-ratio
    rankings: see the module docstring."""
    rows = []
    for detector, own in runs.groupby("detector", sort=False):
        for name in strategies.auto_ratio_strategies():
            auto = own[own["strategy"] == name]
            fixed_rankings = strategies.get(name).auto_ratio_of
            ranking = next((s for s in fixed_rankings if (own["strategy"] == s).any()), None)
            if auto.empty or ranking is None:
                continue
            rows.append(_row(detector, name, auto, ranking, own[own["strategy"] == ranking],
                             metric))  # fmt: skip
    return pd.DataFrame(rows, columns=AUTO_RATIO_COLUMNS)


def _row(detector, name, auto, ranking, fixed, metric) -> dict:
    """The comparison of strategy ``name``'s runs ``auto`` with ``ranking``'s runs ``fixed``."""
    per_ratio = seed_means(fixed, metric, ["refinement_ratio"])
    means = per_ratio.groupby(level="refinement_ratio").mean()
    best_ratio = float(means.idxmax())
    best = per_ratio.xs(best_ratio, level="refinement_ratio")
    auto_values = seed_means(auto, metric, [])  # each cell has its own estimated ratio
    unrefined = per_ratio.xs(0.0, level="refinement_ratio") if 0.0 in means.index else None
    difference = paired_difference(auto_values, best)
    return {
        "detector": detector,
        "strategy": name,
        "ranking": ranking,
        "metric": metric,
        "pollution_ratio": float(auto["pollution_ratio"].iloc[0]),
        "n_seeds": difference["n_seeds"],
        "auto_ratio": auto["refinement_ratio"].mean(),
        "auto": auto_values.mean(),
        "best_ratio": best_ratio,
        "best": best.mean(),
        "difference": difference["mean_difference"],
        "difference_ci_low": difference["ci_low"],
        "difference_ci_high": difference["ci_high"],
        "unrefined": np.nan if unrefined is None else unrefined.mean(),
    }
