"""Figures 3-5 and 7-13 of the paper from the results table, with seaborn.

Every curve is the mean over seeds of the metric averaged over categories; the band is the
standard deviation over seeds. Each figure is saved as PNG (for the HTML report) and PDF.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from sroc.io import atomic_path  # noqa: E402
from sroc.report.labels import detector_labels, strategy_label  # noqa: E402
from sroc.report.tables import MEAN, refiner_runs, seed_values  # noqa: E402

AXIS_LABELS = {
    "image_auroc": "image AUROC (%)",
    "au_iou": "AU-IoU (area under the IoU curve)",
    "au_pro": "AU-PRO (area under the PRO curve)",
    "precision": "refinement precision (%)",
    "recall": "refinement recall (%)",
    "f1": "refinement F1 (%)",
}
PERCENT = ("image_auroc", "precision", "recall", "f1")
POLLUTION_AXIS = "pollution of the training set (%)"
REFINEMENT_AXIS = "share of the training set removed by refinement (%)"
ORACLE_NOTE = "dashed: oracle (fitted on the healthy part only)"


def save_figure(figure: plt.Figure, paths: Sequence[str]) -> None:
    """Write ``figure`` to every path (format from the extension), atomically; close it."""
    for path in paths:
        with atomic_path(path, suffix="." + str(path).rsplit(".", 1)[-1]) as tmp:
            figure.savefig(tmp, dpi=150, bbox_inches="tight")
    plt.close(figure)


def category_means(runs: pd.DataFrame, metric: str, by: Sequence[str]) -> pd.DataFrame:
    """Per ``by`` and seed, ``metric`` averaged over categories, in the plotted units."""
    values = seed_values(runs, metric, by)
    values = values[values["category"] == MEAN].copy()
    if metric in PERCENT:
        values[metric] *= 100
    return values


def _palette(detectors: Sequence[str]) -> dict:
    return dict(zip(detectors, sns.color_palette(n_colors=len(detectors)), strict=True))


def _labelled(means: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """``means`` with the detector column holding labels, so that legends print them."""
    return means.assign(detector=means["detector"].map(labels))


def _lines(axis, data: pd.DataFrame, x: str, metric: str, hue: str, palette: dict) -> None:
    data = data.assign(**{x: 100 * data[x]})
    sns.lineplot(
        data=data,
        x=x,
        y=metric,
        hue=hue,
        hue_order=list(palette),
        palette=palette,
        marker="o",
        errorbar="sd",
        ax=axis,
    )


def _oracle_lines(axis, runs: pd.DataFrame, metric: str, palette: dict) -> bool:
    """Dashed horizontal lines: each detector fitted on the healthy part of the training set;
    ``palette`` is keyed by detector label."""
    oracle = runs[runs["strategy"] == "oracle"]
    if oracle.empty:
        return False
    means = _labelled(category_means(oracle, metric, ["detector"]), detector_labels(oracle))
    means = means.groupby("detector")[metric].mean()
    for detector, value in means.items():
        if detector in palette and np.isfinite(value):
            axis.axhline(value, color=palette[detector], linestyle="--", linewidth=1.2)
    return True


def plot_pollution_curve(runs: pd.DataFrame, metric: str, paths: Sequence[str], title: str = ""):
    """Figures 3, 7, 8: ``metric`` against the pollution ratio, one line per detector."""
    curve = runs[runs["strategy"] == "none"]
    labels = detector_labels(curve)
    palette = _palette(list(labels.values()))
    figure, axis = plt.subplots(figsize=(6, 4))
    _lines(
        axis,
        _labelled(category_means(curve, metric, ["detector", "pollution_ratio"]), labels),
        "pollution_ratio",
        metric,
        "detector",
        palette,
    )
    axis.set(xlabel=POLLUTION_AXIS, ylabel=AXIS_LABELS[metric], title=title)
    axis.grid(alpha=0.3)
    save_figure(figure, paths)


def plot_refinement_curve(
    runs: pd.DataFrame,
    metric: str,
    paths: Sequence[str],
    strategy: str = "sroc",
    refiner: str | None = None,
    title: str = "",
):
    """Figures 4, 9, 10 (``strategy`` sroc) and 11-13 (``refiner`` set: every detector fitted
    on the set refined by the refiner's ranking): ``metric`` against the refinement ratio, one
    line per detector, the oracle dashed."""
    if refiner is None:
        refined = runs[runs["strategy"] == strategy]
    else:
        refined, _ = refiner_runs(runs, refiner)
    if refined.empty:
        raise ValueError(f"no run with strategy {strategy!r} (refiner {refiner!r}) to plot")
    labels = detector_labels(runs[runs["strategy"] != "none"])
    palette = _palette(list(labels.values()))
    figure, axis = plt.subplots(figsize=(6, 4))
    _lines(
        axis,
        _labelled(category_means(refined, metric, ["detector", "refinement_ratio"]), labels),
        "refinement_ratio",
        metric,
        "detector",
        palette,
    )
    has_oracle = _oracle_lines(axis, runs, metric, palette)
    axis.set(xlabel=REFINEMENT_AXIS, ylabel=AXIS_LABELS[metric], title=title)
    if has_oracle:
        axis.text(0.01, 0.01, ORACLE_NOTE, transform=axis.transAxes, fontsize=7, va="bottom")
    axis.grid(alpha=0.3)
    save_figure(figure, paths)


def plot_strategies(
    runs: pd.DataFrame,
    metric: str,
    paths: Sequence[str],
    strategies: Sequence[str] = ("sroc", "random", "cross_validation", "stoc"),
):
    """Figure 5: one panel per detector, ``metric`` against the refinement ratio for each
    refinement strategy, the oracle dashed."""
    refined = runs[runs["strategy"].isin(strategies)]
    labels = detector_labels(refined)
    detectors = list(labels)
    present = [s for s in strategies if s in set(refined["strategy"])]
    colours = _palette([strategy_label(s) for s in present])
    n_columns = min(len(detectors), 2)
    n_rows = int(np.ceil(len(detectors) / n_columns))
    figure, axes = plt.subplots(
        n_rows, n_columns, figsize=(5.5 * n_columns, 3.8 * n_rows), squeeze=False, sharex=True
    )
    means = category_means(refined, metric, ["detector", "strategy", "refinement_ratio"])
    means["strategy"] = means["strategy"].map(lambda s: strategy_label(s))
    for axis, detector in zip(axes.flat, detectors, strict=False):
        _lines(
            axis,
            means[means["detector"] == detector],
            "refinement_ratio",
            metric,
            "strategy",
            colours,
        )
        oracle_colour = {labels[detector]: "black"}
        if _oracle_lines(axis, runs[runs["detector"] == detector], metric, oracle_colour):
            axis.text(0.01, 0.01, ORACLE_NOTE, transform=axis.transAxes, fontsize=7)
        axis.set(title=labels[detector], xlabel=REFINEMENT_AXIS, ylabel=AXIS_LABELS[metric])
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(detectors) :]:
        axis.set_visible(False)
    figure.tight_layout()
    save_figure(figure, paths)


def plot_recovery(table: pd.DataFrame, paths: Sequence[str]):
    """The recovery table as bars: one panel per metric, one group per strategy, one bar per
    detector; the whisker is the gain's paired interval divided by the loss. Where the loss is
    below the table's ``min_loss`` the recovery is empty and no bar is drawn."""
    metrics = list(dict.fromkeys(table["metric"]))
    labels = detector_labels(table)
    detectors = list(labels)
    colours = _palette(detectors)
    figure, axes = plt.subplots(
        1, max(1, len(metrics)), figsize=(1.2 + 0.9 * table["strategy"].nunique(), 4.2),
        squeeze=False,
    )  # fmt: skip
    for axis, metric in zip(axes.flat, metrics, strict=False):
        rows = table[table["metric"] == metric]
        strategies = list(dict.fromkeys(rows["strategy"]))
        width = 0.8 / len(detectors)
        for offset, detector in enumerate(detectors):
            own = rows[rows["detector"] == detector].set_index("strategy").reindex(strategies)
            recovery = 100 * own["recovery"].to_numpy(dtype=float)
            low = 100 * (own["gain_ci_low"] / own["lost"]).to_numpy(dtype=float)
            high = 100 * (own["gain_ci_high"] / own["lost"]).to_numpy(dtype=float)
            shown = np.isfinite(recovery)
            x = np.arange(len(strategies)) + (offset - (len(detectors) - 1) / 2) * width
            axis.bar(x, np.where(shown, recovery, 0.0), width, color=colours[detector],
                     label=labels[detector])  # fmt: skip
            whiskers = shown & np.isfinite(low) & np.isfinite(high)
            axis.errorbar(
                x[whiskers], recovery[whiskers],
                yerr=[recovery[whiskers] - low[whiskers], high[whiskers] - recovery[whiskers]],
                fmt="none", ecolor="black", elinewidth=0.8, capsize=2,
            )  # fmt: skip
        axis.axhline(0, color="black", linewidth=0.8)
        axis.axhline(100, color="grey", linewidth=0.8, linestyle="--")
        axis.set_xticks(np.arange(len(strategies)))
        axis.set_xticklabels(
            [strategy_label(s) for s in strategies], rotation=35, ha="right", fontsize=8
        )
        axis.set(
            title=f"{AXIS_LABELS.get(metric, metric).split(' (')[0]} lost to pollution",
            ylabel="recovered at r = p (%)",
        )
        axis.grid(alpha=0.3, axis="y")
    axes.flat[0].legend(title="detector", fontsize=8)
    figure.tight_layout()
    save_figure(figure, paths)
