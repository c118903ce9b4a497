"""``sroc_auto`` against the best fixed refinement ratio chosen with hindsight.

``sroc_auto`` removes the leading images of the leave-one-out SROC ranking (``sroc_loo``), as
many as :func:`sroc.contamination.estimate_contamination` finds in the tail of the self-scores.
The fair comparison is therefore the same ranking at a fixed ratio: per detector, the
refinement ratio of ``sroc_loo`` (``sroc`` when the grid has no ``sroc_loo``) whose metric,
averaged over categories and seeds, is highest. That choice needs the test labels, which a user
does not have: it is the ceiling that a ratio chosen from the data can reach.

Per detector, on the metric averaged over categories within each seed (the paper's "Mean" row):
the mean estimated ratio and the metric of ``sroc_auto``; the best fixed ratio and its metric;
``difference = auto - best`` with its paired t interval over seeds (the same seed gives both the
same splits); the unrefined detector at the same pollution (refinement ratio 0) for scale.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sroc.report.stats import paired_difference
from sroc.report.tables import seed_means

AUTO_RATIO_COLUMNS = [
    "detector", "ranking", "metric", "pollution_ratio", "n_seeds", "auto_ratio", "auto",
    "best_ratio", "best", "difference", "difference_ci_low", "difference_ci_high", "unrefined",
]  # fmt: skip
# The rankings that sroc_auto can be held against, the one it uses first.
FIXED_RANKINGS = ("sroc_loo", "sroc")


def auto_ratio_table(runs: pd.DataFrame, metric: str = "image_auroc") -> pd.DataFrame:
    """One row per detector with both ``sroc_auto`` and a fixed-ratio SROC ranking: see the
    module docstring."""
    rows = []
    for detector, own in runs.groupby("detector", sort=False):
        auto = own[own["strategy"] == "sroc_auto"]
        ranking = next((s for s in FIXED_RANKINGS if (own["strategy"] == s).any()), None)
        if auto.empty or ranking is None:
            continue
        fixed = own[own["strategy"] == ranking]
        per_ratio = seed_means(fixed, metric, ["refinement_ratio"])
        means = per_ratio.groupby(level="refinement_ratio").mean()
        best_ratio = float(means.idxmax())
        best = per_ratio.xs(best_ratio, level="refinement_ratio")
        auto_values = seed_means(auto, metric, [])  # each cell has its own estimated ratio
        unrefined = per_ratio.xs(0.0, level="refinement_ratio") if 0.0 in means.index else None
        difference = paired_difference(auto_values, best)
        rows.append(
            {
                "detector": detector,
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
        )
    return pd.DataFrame(rows, columns=AUTO_RATIO_COLUMNS)
