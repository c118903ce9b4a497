"""Recovery: the share of what pollution costs that a refinement strategy wins back.

Per detector and strategy, on the metric averaged over categories within each seed (the paper's
"Mean" row):

- ``clean``: the unrefined detector at pollution 0;
- ``polluted``: the unrefined detector at the refined pollution ratio p;
- ``refined``: the strategy at refinement ratio r = p, where it removes as many images as were
  injected (a single-run strategy removes its own selection: the oracle exactly the injected
  images, ``sroc_auto`` as many as it estimates, its ``refinement_ratio`` being the mean over
  seeds and categories of that estimate);
- ``recovery = (refined - polluted) / (clean - polluted)``: 1 wins back everything, 0 nothing,
  a negative value makes things worse, above 1 beats the clean training set.

Recovery is a ratio of the means over seeds: per-seed ratios explode where a seed loses little.
It is left empty where the mean loss is below ``min_loss`` (default half a point): the ratio of
two noises says nothing. ``gain = refined - polluted`` comes with its paired t confidence interval
over seeds (the same seed gives both the same splits), as the paired statistics do.

The CSV keeps these raw columns (fractions); :func:`recovery_for_reading` prints them as the
paper's tables do (percent, one decimal, the interval in one column) for Markdown and LaTeX.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sroc import strategies
from sroc.report.labels import detector_labels, strategy_label
from sroc.report.stats import paired_difference
from sroc.report.tables import METRIC_NAMES, seed_means

RECOVERY_COLUMNS = [
    "detector", "detector_type", "strategy", "metric", "pollution_ratio", "refinement_ratio",
    "n_seeds", "clean", "polluted", "refined", "lost", "recovery", "gain_ci_low", "gain_ci_high",
    "f1",
]  # fmt: skip


def recovery_table(
    runs: pd.DataFrame, metric: str = "image_auroc", min_loss: float = 0.005
) -> pd.DataFrame:
    """One row per (detector, strategy) refined at r = p: see the module docstring."""
    refined_runs = runs[runs["strategy"] != "none"]
    if refined_runs.empty:
        return pd.DataFrame(columns=RECOVERY_COLUMNS)
    pollution = float(refined_runs["pollution_ratio"].iloc[0])
    curve = runs[runs["strategy"] == "none"]
    clean = seed_means(curve[np.isclose(curve["pollution_ratio"], 0.0)], metric, ["detector"])
    polluted = seed_means(
        curve[np.isclose(curve["pollution_ratio"], pollution)], metric, ["detector"]
    )
    at_p = refined_runs[
        refined_runs["strategy"].map(strategies.is_single_run)
        | np.isclose(refined_runs["refinement_ratio"], pollution)
    ].assign(
        label=lambda frame: np.where(
            frame["strategy"].map(lambda s: strategies.get(s).uses_refiner),
            frame["strategy"] + " (" + frame["refiner"].astype(str) + ")",
            frame["strategy"],
        )
    )
    refined = seed_means(at_p, metric, ["detector", "label"])
    f1 = seed_means(at_p, "f1", ["detector", "label"]).sort_index()
    ratios = at_p.groupby(["detector", "label"])["refinement_ratio"].mean()
    types = runs.drop_duplicates("detector").set_index("detector")["detector_type"]
    rows = []
    for (detector, label), values in refined.groupby(level=["detector", "label"], sort=False):
        if detector not in clean.index or detector not in polluted.index:
            continue
        after = values.droplevel(["detector", "label"])
        before, reference = polluted.loc[detector], clean.loc[detector]
        lost = reference.mean() - before.mean()
        gain = paired_difference(after, before)
        rows.append(
            {
                "detector": detector,
                "detector_type": types[detector],
                "strategy": label,
                "metric": metric,
                "pollution_ratio": pollution,
                "refinement_ratio": ratios.loc[(detector, label)],
                "n_seeds": gain["n_seeds"],
                "clean": reference.mean(),
                "polluted": before.mean(),
                "refined": after.mean(),
                "lost": lost,
                "recovery": gain["mean_difference"] / lost if lost >= min_loss else np.nan,
                "gain_ci_low": gain["ci_low"],
                "gain_ci_high": gain["ci_high"],
                "f1": f1.loc[(detector, label)].mean(),
            }
        )
    table = pd.DataFrame(rows, columns=RECOVERY_COLUMNS)
    paper_order = {detector: position for position, detector in enumerate(detector_labels(runs))}
    table = table.sort_values("detector", key=lambda d: d.map(paper_order), kind="stable")
    return table.reset_index(drop=True)


def recovery_for_reading(table: pd.DataFrame) -> pd.DataFrame:
    """The recovery table as the paper prints its tables: words for detectors, strategies and
    metrics; every value in percent with one decimal; the gain's 95 % interval as one column;
    "-" where a value is undefined."""

    def percent(value) -> str:
        return "-" if pd.isna(value) else f"{100 * value:.1f}"

    def interval(low, high) -> str:
        return "-" if pd.isna(low) or pd.isna(high) else f"[{100 * low:.1f}, {100 * high:.1f}]"

    labels = detector_labels(table)
    return pd.DataFrame(
        {
            "detector": table["detector"].map(labels),
            "strategy": table["strategy"].map(strategy_label),
            "metric": table["metric"].map(METRIC_NAMES),
            "pollution (%)": table["pollution_ratio"].map(percent),
            "refinement (%)": table["refinement_ratio"].map(percent),
            "seeds": table["n_seeds"],
            "clean (%)": table["clean"].map(percent),
            "polluted (%)": table["polluted"].map(percent),
            "refined (%)": table["refined"].map(percent),
            "lost (points)": table["lost"].map(percent),
            "recovered (%)": table["recovery"].map(percent),
            "gain, 95 % CI (points)": [
                interval(low, high)
                for low, high in zip(table["gain_ci_low"], table["gain_ci_high"], strict=True)
            ],
            "refinement F1 (%)": table["f1"].map(percent),
        }
    )
