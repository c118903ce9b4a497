"""The paper's published numbers (Tables 1, 2 and 4) and the comparison of ours against them.

``paper_numbers.csv`` holds the numbers as printed in the paper (AUROC and refinement scores in
percent, AU-IoU and AU-PRO as fractions, column ``unit``); ``paper_row`` is the row's label in the
paper, categories spelled as in MVTec AD (``metal_nut``). Standard deviations: the paper prints
one for the per-category AUROC at 20 % pollution of Table 1 and its Mean AUC row, whose std is
close to the mean of the categories' stds; ours are computed the same way
(:func:`sroc.report.tables.seed_statistics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

import numpy as np
import pandas as pd

from sroc.report.figures import save_figure
from sroc.report.labels import detector_labels
from sroc.report.tables import (
    MEAN,
    METRIC_NAMES,
    plain_latex,
    refiner_runs,
    seed_statistics,
    without_empty_refinements,
)

PAPER_SETUP = (
    "The paper embeds MVTec AD images resized to 380x380 (no centre crop) with EfficientNet-B4 "
    "(TensorFlow/Keras, blocks 4, 6 and 7), over 13 categories (hazelnut and transistor "
    "excluded) and 5 seeds."
)
PAPER_DATASET = "mvtec"  # the dataset name under which this project runs MVTec AD
KEYS = ["detector_type", "category", "metric", "pollution_ratio", "refinement_ratio"]


def load_paper_numbers() -> pd.DataFrame:
    """The published numbers, one row per printed cell (``-`` cells are absent)."""
    with resources.files("sroc.report").joinpath("paper_numbers.csv").open() as handle:
        return pd.read_csv(handle, dtype={"table": str, "category": str})


def _ours(
    runs: pd.DataFrame, metric: str, ratio_column: str, paper_categories: set[str]
) -> pd.DataFrame:
    """Our statistics of ``metric`` per detector and ratio; ``same_categories``: whether the
    categories with a value for that detector and ratio are the paper's (always true of a
    category's own row)."""
    by = ["detector", "detector_type", ratio_column]
    stats = seed_statistics(runs, metric, by)
    covered = runs[runs[metric].notna()].groupby(by)["category"].agg(frozenset)
    covered = covered.rename("covered").reset_index()
    stats = stats.merge(covered, on=by, how="left")
    same = stats["covered"].map(lambda categories: categories == paper_categories)
    same_categories = (stats["category"] != MEAN) | same
    return stats.drop(columns="covered").assign(metric=metric, same_categories=same_categories)


def _our_statistics(
    runs: pd.DataFrame, table: str, refiner: str, paper_categories: set[str]
) -> pd.DataFrame:
    if table == "1":
        subset, column, fixed = runs[runs["strategy"] == "none"], "pollution_ratio", "refinement"
    elif table == "2":
        subset, column, fixed = runs[runs["strategy"] == "sroc"], "refinement_ratio", "pollution"
    else:
        subset, _ = refiner_runs(runs, refiner)
        column, fixed = "refinement_ratio", "pollution"
    if subset.empty:
        return pd.DataFrame()
    subset = without_empty_refinements(subset)
    metrics = ["image_auroc", "au_iou", "au_pro", "precision", "recall", "f1"]
    ours = pd.concat(
        [_ours(subset, m, column, paper_categories) for m in metrics], ignore_index=True
    )
    fixed_value = float(subset[f"{fixed}_ratio"].iloc[0]) if fixed == "pollution" else 0.0
    return ours.assign(**{f"{fixed}_ratio": fixed_value})


def compare_with_paper(
    runs: pd.DataFrame, paper: pd.DataFrame | None = None, refiner: str = "mahalanobis"
) -> pd.DataFrame:
    """Our mean ± std over seeds beside every published cell of Tables 1, 2 and Table 4's
    refiner rows that our runs can fill, both as fractions; ``difference`` = ours - paper.
    The paper refines Table 4 with Mahalanobis only: with another ``refiner`` Table 4 is left
    out.

    A ``mean`` row averages our categories, which are the paper's 13 only on MVTec AD:
    ``same_categories`` says, per detector and condition, whether they are.
    """
    paper = load_paper_numbers() if paper is None else paper
    refined_by_ours = (paper["refiner"] == refiner) & ~paper["paper_row"].str.endswith(
        "(reference)"
    )
    paper = paper[(paper["table"] != "4") | refined_by_ours]
    paper = paper.assign(
        paper=np.where(paper["unit"] == "percent", paper["value"] / 100, paper["value"]),
        paper_std=np.where(paper["unit"] == "percent", paper["std"] / 100, paper["std"]),
    )
    paper_categories = set(paper["category"]) - {MEAN}
    parts = []
    for table in ("1", "2", "4"):
        ours = _our_statistics(runs, table, refiner, paper_categories)
        if ours.empty:
            continue
        published = paper[paper["table"] == table].drop(columns=["value", "std"])
        for frame in (ours, published):
            for column in ("pollution_ratio", "refinement_ratio"):
                frame[column] = frame[column].astype(float).round(6)
        merged = published.merge(ours, on=KEYS, how="inner")
        parts.append(merged)
    if not parts:
        raise ValueError("no run matches a published cell: the results hold no paper condition")
    merged = pd.concat(parts, ignore_index=True).rename(columns={"mean": "ours", "std": "ours_std"})
    merged["difference"] = merged["ours"] - merged["paper"]
    columns = [
        "table",
        "paper_row",
        "detector",
        "detector_type",
        "category",
        "metric",
        "pollution_ratio",
        "refinement_ratio",
        "paper",
        "paper_std",
        "ours",
        "ours_std",
        "n_seeds",
        "difference",
        "same_categories",
    ]
    return merged[columns].dropna(subset=["ours"]).reset_index(drop=True)


STD_NOTE = (
    "Standard deviations over seeds: the paper prints them only for Table 1's per-category "
    "AUROC at 20 % pollution and its Mean AUC row; a category's is its spread over the seeds, "
    "the Mean row's the mean of the categories' (which the paper's values match); ours "
    "(ours_std) are computed the same way for every cell."
)
AU_IOU_NOTE = (
    "AU-IoU is this project's definition (pooled IoU against pixel FPR up to 30 %, "
    "docs/metrics.md): the paper does not define its IoU curve, so AU-IoU differences may be "
    "definitional."
)


def comparison_note(backbone: str, dataset: str, protocols: Sequence[str] = ()) -> str:
    """The note under the comparison table: both setups, the protocol, the std each side shows,
    and, outside MVTec AD, that the published numbers are not of our data."""
    protocol = f" ({', '.join(protocols)})" if protocols else ""
    other_data = (
        ""
        if dataset == PAPER_DATASET
        else f" The published numbers are MVTec AD's, ours are {dataset}'s: the values are not "
        "expected to agree."
    )
    return (
        f"Ours: dataset {dataset}, backbone {backbone}, protocol as in docs/protocol.md"
        f"{protocol}: under pollution.set_seed fixed (the default, as in the paper) the "
        "pollution set, hence the test set, is fixed per category and the seed picks which "
        f"goods it replaces. {PAPER_SETUP}{other_data} Values are fractions (AUROC 0.933 = 93.3 "
        "in the paper). Rows whose category is not in the paper are absent; a mean row whose "
        "detector and condition cover other categories than the paper's 13 is marked "
        f"same_categories = False and compares different sets. {STD_NOTE} {AU_IOU_NOTE}"
    )


def comparison_title(dataset: str) -> str:
    """The figure's title; outside MVTec AD it says the points are not expected on the
    diagonal."""
    if dataset == PAPER_DATASET:
        return f"{dataset} against the paper"
    return (
        f"{dataset} against the paper's MVTec AD numbers\n"
        "(other data: the points are not expected on the diagonal)"
    )


def comparison_markdown(comparison: pd.DataFrame, note: str) -> str:
    shown = comparison.assign(detector=comparison["detector"].map(detector_labels(comparison)))
    for column in ("paper", "paper_std", "ours", "ours_std", "difference"):
        shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    return shown.to_markdown(index=False) + f"\n\nNote: {note}\n"


def comparison_latex(comparison: pd.DataFrame, note: str) -> str:
    columns = [
        "table",
        "paper_row",
        "detector",
        "pollution_ratio",
        "refinement_ratio",
        "paper",
        "ours",
        "ours_std",
        "difference",
    ]
    shown = comparison.assign(detector=comparison["detector"].map(detector_labels(comparison)))
    return plain_latex(shown[columns], note)


def plot_comparison(comparison: pd.DataFrame, paths: Sequence[str], title: str = "") -> None:
    """Ours against the paper, one panel per metric; error bars = our std over seeds; points on
    the diagonal agree."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    metrics = list(dict.fromkeys(comparison["metric"]))
    n_columns = min(len(metrics), 3)
    n_rows = -(-len(metrics) // n_columns)
    figure, axes = plt.subplots(
        n_rows, n_columns, figsize=(4.8 * n_columns, 4.3 * n_rows), squeeze=False
    )
    for axis in axes.flat[len(metrics) :]:
        axis.set_visible(False)
    axes = axes.flat
    # Legend titles are these column names: words, not the table's columns.
    labels = detector_labels(comparison)
    shown = pd.DataFrame(
        {
            "paper": comparison["paper"],
            "ours": comparison["ours"],
            "ours_std": comparison["ours_std"],
            "metric": comparison["metric"],
            "detector": comparison["detector"].map(labels),
            "published in": comparison["table"].map(lambda t: f"Table {t}"),
            "cell": np.where(
                comparison["category"] == MEAN, "mean over categories", "one category"
            ),
        }
    )
    for axis, metric in zip(axes, metrics, strict=False):
        data = shown[shown["metric"] == metric]
        axis.errorbar(
            data["paper"],
            data["ours"],
            yerr=data["ours_std"].fillna(0),
            fmt="none",
            ecolor="grey",
            alpha=0.5,
            linewidth=0.8,
        )
        sns.scatterplot(
            data=data,
            x="paper",
            y="ours",
            hue="detector",
            hue_order=list(labels.values()),
            style="published in",
            size="cell",
            sizes={"one category": 25, "mean over categories": 70},
            ax=axis,
            legend=metric == metrics[0],
        )
        low = float(np.nanmin(data[["paper", "ours"]].to_numpy()))
        high = float(np.nanmax(data[["paper", "ours"]].to_numpy()))
        axis.plot([low, high], [low, high], color="black", linewidth=0.8, linestyle=":")
        axis.set(
            title=METRIC_NAMES[metric],
            xlabel="published in the paper",
            ylabel="ours (mean over seeds)",
        )
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, paths)
