"""Aggregate tables (CSV + Markdown) and figures of the benchmark."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from sroc import splits
from sroc.io import atomic_path


def write_table(table: pd.DataFrame, csv_path, markdown_path, float_format: str = ".4g") -> None:
    """Write ``table`` as CSV (every digit) and as a Markdown table for reading."""
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(markdown_path) as tmp:
        tmp.write_text(table.to_markdown(index=False, floatfmt=float_format) + "\n")


def split_summary(
    manifest_paths: Sequence[str | Path],
    info_paths: Sequence[str | Path],
    ratios: Sequence[float],
) -> pd.DataFrame:
    """Split sizes and pollution composition per category, seed and ratio.

    An excluded category gets one row per seed that states the reason instead of sizes.
    """
    tables = []
    for manifest_path, info_path in zip(manifest_paths, info_paths, strict=True):
        info = json.loads(Path(info_path).read_text())
        manifest = splits.read_manifest(manifest_path)
        category = manifest["category"].iloc[0]
        head = {"category": category, "seed": info["seed"], "protocol": info["protocol"]}
        if info["excluded"]:
            tables.append(pd.DataFrame([{**head, "excluded": info["excluded"]}]))
            continue
        table = splits.summarize(manifest, ratios)
        for column, value in reversed(head.items()):
            table.insert(0, column, value)
        table["excluded"] = ""
        tables.append(table)
    summary = pd.concat(tables, ignore_index=True)
    count_columns = [c for c in summary.columns if c.startswith("n_")]
    summary[count_columns] = summary[count_columns].astype("Int64")
    return summary.sort_values(["category", "seed", "ratio"], kind="stable", ignore_index=True)


METRICS = ("image_auroc", "au_pro", "au_iou")
MEAN_ROW = "mean"


def concat_metrics(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Every run's metrics in one long table (excluded categories contribute no rows)."""
    tables = []
    for path in paths:
        try:
            tables.append(pd.read_csv(path))
        except pd.errors.EmptyDataError:  # an excluded category: its metrics file has no rows
            continue
    if not tables:
        raise ValueError("no metrics to aggregate: every category was excluded")
    return pd.concat(tables, ignore_index=True)


def category_means(runs: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per seed, the mean over categories: the paper's "Mean" rows."""
    means = runs.groupby([*by, "seed"], as_index=False)[list(METRICS)].mean()
    return means.assign(category=MEAN_ROW)


def pollution_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds per detector, category and pollution ratio.

    The ``mean`` category averages the categories within each seed first, so its standard
    deviation measures how the benchmark's mean varies with the split, as in Table 1.
    """
    by = ["detector", "pollution_ratio"]
    runs = runs[runs["strategy"] == "none"]
    both = pd.concat([runs, category_means(runs, by)], ignore_index=True)
    grouped = both.groupby([*by, "category"])[list(METRICS)]
    table = grouped.agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table.insert(0, "n_seeds", grouped.size())
    return table.reset_index()


def plot_metric_vs_ratio(
    runs: pd.DataFrame, metric: str, path: str | Path, title: str = ""
) -> None:
    """Mean over categories of ``metric`` against the pollution ratio, one line per detector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    means = category_means(runs[runs["strategy"] == "none"], ["detector", "pollution_ratio"])
    figure, axis = plt.subplots(figsize=(6, 4))
    sns.lineplot(
        data=means,
        x="pollution_ratio",
        y=metric,
        hue="detector",
        marker="o",
        errorbar="sd",
        ax=axis,
    )
    axis.set_xlabel("pollution ratio of the training set")
    axis.set_ylabel(metric.replace("_", " "))
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=120)
    plt.close(figure)
