"""Tables 1, 2 and 4 of the paper from the results table ``runs.parquet``.

Every cell is a mean over seeds with its standard deviation (ddof 1). The mean rows average the
categories within each seed, then over seeds; their standard deviation is the mean of the
categories' standard deviations, which is what the paper's Mean-row stds match (its Table 1:
1.0, 0.8, 0.7, 0.3 against 1.15, 0.82, 0.75, 0.29), not the spread of the seeds' category mean
(two to three times smaller; :mod:`sroc.report.stats` pairs on that one). Values stay in [0, 1]
in the CSV with every standard deviation; Markdown and LaTeX print as the paper does: AUROC and
the refinement scores in percent, a standard deviation only where the paper prints one, "-"
where a value is undefined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sroc.io import atomic_path
from sroc.report.labels import detector_label, detector_labels, ordered_categories

METRIC_NAMES = {
    "image_auroc": "AUROC",
    "au_iou": "AU-IoU",
    "au_pro": "AU-PRO",
    "precision": "Refin. Precision",
    "recall": "Refin. Recall",
    "f1": "Refin. F1",
}
# The paper's mean rows: "Mean AUC" for the image AUROC.
MEAN_ROW_NAMES = {"image_auroc": "Mean AUC", "au_iou": "Mean AU-IoU", "au_pro": "Mean AU-PRO"}
PIXEL_METRICS = ("au_iou", "au_pro")
REFINEMENT_SCORES = ("precision", "recall", "f1")
PERCENT_METRICS = ("image_auroc", *REFINEMENT_SCORES)
MEAN = "mean"
CELL_COLUMNS = ["row", "metric", "detector", "ratio", "mean", "std", "n_seeds"]


REQUIRED_COLUMNS = [
    "dataset",
    "protocol",
    "category",
    "seed",
    "detector",
    "detector_type",
    "strategy",
    "refiner",
    "pollution_ratio",
    "refinement_ratio",
    "image_auroc",
    "au_pro",
    "au_iou",
    "precision",
    "recall",
    "f1",
    "n_removed",
]
ZERO_SPREAD = 1e-12  # a std below this is rounding: every seed gave the same number


def read_results_table(path) -> pd.DataFrame:
    """The results table (``runs.parquet``), checked for the columns the report reads. It is
    empty when every category was excluded; the report rules then write placeholders."""
    runs = pd.read_parquet(path)
    missing = [column for column in REQUIRED_COLUMNS if column not in runs.columns]
    if missing:
        raise ValueError(
            f"{path}: the results table lacks column(s) {missing}; rebuild it with the "
            "workflow's collect_runs rule"
        )
    return runs


def has_masks(runs: pd.DataFrame) -> bool:
    """Whether the dataset filled the pixel metrics (elpv, for one, has no defect masks)."""
    return bool(runs[list(PIXEL_METRICS)].notna().to_numpy().any())


def no_mask_note(runs: pd.DataFrame) -> str:
    dataset = ", ".join(sorted(runs["dataset"].unique()))
    return (
        f"AU-IoU and AU-PRO are left out: the dataset {dataset} has no defect masks, so no "
        "pixel metric can be computed."
    )


def seed_values(runs: pd.DataFrame, metric: str, by: Sequence[str]) -> pd.DataFrame:
    """``metric`` per ``by``, category and seed, plus a category ``mean`` per ``by`` and seed
    (the average over categories within that seed)."""
    by = list(by)
    per_category = runs.groupby([*by, "category", "seed"], sort=False, as_index=False)[metric]
    per_category = per_category.mean()
    means = per_category.groupby([*by, "seed"], sort=False, as_index=False)[metric].mean()
    return pd.concat([per_category, means.assign(category=MEAN)], ignore_index=True)


def seed_means(runs: pd.DataFrame, metric: str, by: Sequence[str]) -> pd.Series:
    """``metric`` averaged over categories per ``by`` and seed (the paper's "Mean" row), indexed
    by ``(*by, seed)``."""
    values = seed_values(runs, metric, by)
    return values[values["category"] == MEAN].set_index([*by, "seed"])[metric]


def seed_statistics(runs: pd.DataFrame, metric: str, by: Sequence[str]) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1) and number of seeds of ``metric`` per ``by`` and
    category, categories in the paper's order. The category ``mean``: the mean over seeds of the
    per-seed category average, and as std the mean of the categories' stds (the paper's)."""
    by = list(by)
    values = seed_values(runs, metric, by)
    grouped = values.groupby([*by, "category"], sort=False)[metric]
    stats = grouped.agg(["mean", "std"]).join(grouped.count().rename("n_seeds")).reset_index()
    is_mean = stats["category"] == MEAN
    category_std = stats[~is_mean].groupby(by, sort=False, as_index=False)["std"].mean()
    stats = stats.merge(category_std.rename(columns={"std": "category_std"}), on=by, how="left")
    stats["std"] = np.where(is_mean, stats["category_std"], stats["std"])
    order = {c: i for i, c in enumerate(ordered_categories(stats.loc[~is_mean, "category"]))}
    position = stats["category"].map(order).fillna(len(order))
    stats = stats.assign(position=position).sort_values("position", kind="stable")
    return stats.drop(columns=["category_std", "position"]).reset_index(drop=True)


def without_empty_refinements(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with the refinement scores undefined (NaN) where nothing was removed: the
    results table holds recall = F1 = 0 there (no defective image removed), which the paper
    prints as "-"."""
    runs = runs.copy()
    runs.loc[runs["n_removed"] == 0, list(REFINEMENT_SCORES)] = np.nan
    return runs


@dataclass
class PaperTable:
    """A table laid out as in the paper: rows (categories, then mean rows), columns detector x
    ratio. ``cells`` holds one row per cell with columns :data:`CELL_COLUMNS`; ``labels`` maps
    each detector to its printed name, in column order; ``std_rows`` are the rows printed with
    their standard deviation (the paper prints none in the others)."""

    cells: pd.DataFrame
    ratio_label: str
    labels: dict[str, str]
    note: str = ""
    n_category_rows: int = 0
    std_rows: tuple[str, ...] = ()

    def rows(self) -> list[str]:
        return list(dict.fromkeys(self.cells["row"]))

    def columns(self) -> list[tuple[str, float]]:
        present = set(self.cells["detector"])
        detectors = [detector for detector in self.labels if detector in present]
        ratios = sorted(self.cells["ratio"].unique())
        return [(detector, ratio) for detector in detectors for ratio in ratios]

    def values(self, stat: str = "mean") -> pd.DataFrame:
        """The numbers: rows x (detector, ratio) MultiIndex columns; NaN where no run exists."""
        wide = self.cells.pivot_table(
            index="row", columns=["detector", "ratio"], values=stat, dropna=False
        )
        return wide.reindex(index=self.rows(), columns=pd.MultiIndex.from_tuples(self.columns()))

    def printed_std(self) -> pd.DataFrame:
        """The standard deviations as printed: only in ``std_rows``, and not in a column where no
        number varies with the seed (Table 1's 0 % column when the pollution set is fixed: the
        seeds then train on the same images), NaN elsewhere."""
        stds = self.values("std")
        no_spread = (stds.fillna(0).abs() < ZERO_SPREAD).all()
        shown = pd.DataFrame(
            np.outer(stds.index.isin(self.std_rows), ~no_spread.to_numpy()),
            index=stds.index,
            columns=stds.columns,
        )
        return stds.where(shown)

    def to_csv_frame(self) -> pd.DataFrame:
        """Flat numeric layout: columns ``<detector> <ratio %> mean`` and ``... std`` per cell,
        every standard deviation included."""
        means, stds = self.values("mean"), self.values("std")
        metric_of_row = self.cells.drop_duplicates("row").set_index("row")["metric"]
        frame = pd.DataFrame({"row": self.rows(), "metric": metric_of_row[self.rows()].values})
        for detector, ratio in self.columns():
            head = f"{detector} {_percent(ratio)}"
            frame[f"{head} mean"] = means[(detector, ratio)].to_numpy()
            frame[f"{head} std"] = stds[(detector, ratio)].to_numpy()
        return frame

    def formatted(self) -> pd.DataFrame:
        """Strings as printed in the paper: ``93.3 ± 0.5`` (percent), ``0.135``, ``-``."""
        means, stds = self.values("mean"), self.printed_std()
        metric_of_row = self.cells.drop_duplicates("row").set_index("row")["metric"]
        out = pd.DataFrame(index=self.rows(), columns=pd.MultiIndex.from_tuples(self.columns()))
        for row in self.rows():
            for column in self.columns():
                out.loc[row, column] = format_cell(
                    means.loc[row, column], stds.loc[row, column], metric_of_row[row]
                )
        return out

    def to_markdown(self) -> str:
        formatted = self.formatted()
        formatted.columns = [f"{self.labels[d]} {_percent(r)}" for d, r in formatted.columns]
        formatted.index.name = f"category \\ {self.ratio_label.lower()}"
        # disable_numparse: tabulate would reprint "100.0" as "100" and "0.240" as "0.24".
        text = formatted.reset_index().to_markdown(
            index=False, stralign="right", disable_numparse=True
        )
        text += "\n"
        return text + (f"\nNote: {self.note}\n" if self.note else "")

    def to_latex(self) -> str:
        formatted = self.formatted()
        detectors = list(dict.fromkeys(d for d, _ in self.columns()))
        n_ratios = len(self.columns()) // max(len(detectors), 1)
        lines = [
            f"% {self.note}" if self.note else "%",
            r"\begin{tabular}{l" + ("|" + "c" * n_ratios) * len(detectors) + "}",
            r"\toprule",
            " & ".join(
                [""]
                + [rf"\multicolumn{{{n_ratios}}}{{c}}{{{_tex(self.labels[d])}}}" for d in detectors]
            )
            + r" \\",
            " & ".join([_tex(self.ratio_label)] + [_tex(_percent(r)) for _, r in self.columns()])
            + r" \\",
            r"\midrule",
        ]
        for position, row in enumerate(self.rows()):
            if position == self.n_category_rows and position > 0:
                lines.append(r"\midrule")
            cells = [_tex(value) for value in formatted.loc[row]]
            lines.append(" & ".join([_tex(row)] + cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"


def format_cell(mean: float, std: float, metric: str) -> str:
    if np.isnan(mean):
        return "-"
    if metric in PERCENT_METRICS:
        text = f"{100 * mean:.1f}"
        return text if np.isnan(std) else f"{text} ± {100 * std:.1f}"
    text = f"{mean:.3f}"
    return text if np.isnan(std) else f"{text} ± {std:.3f}"


def _percent(ratio: float) -> str:
    return f"{100 * ratio:g}%"


def _tex(text: str) -> str:
    return (
        str(text)
        .replace("\\", r"\textbackslash{}")
        .replace("_", r"\_")
        .replace("%", r"\%")
        .replace("&", r"\&")
        .replace("±", r"$\pm$")
    )


def plain_latex(frame: pd.DataFrame, note: str = "", float_format: str = ".3f") -> str:
    """A flat table as a LaTeX tabular (numbers with ``float_format``, NaN left empty)."""

    def cell(value) -> str:
        if isinstance(value, float | np.floating):
            return "" if np.isnan(value) else format(value, float_format)
        return _tex(value)

    lines = [
        f"% {note}" if note else "%",
        r"\begin{tabular}{" + "l" * frame.shape[1] + "}",
        r"\toprule",
        " & ".join(_tex(column) for column in frame.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(cell(v) for v in row) + r" \\" for row in frame.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_paper_table(table: PaperTable, csv_path, markdown_path, latex_path) -> None:
    """The table as CSV (numbers in [0, 1], every digit), Markdown and LaTeX (as printed)."""
    with atomic_path(csv_path) as tmp:
        table.to_csv_frame().to_csv(tmp, index=False)
    with atomic_path(markdown_path) as tmp:
        tmp.write_text(table.to_markdown())
    with atomic_path(latex_path) as tmp:
        tmp.write_text(table.to_latex())


def _cells(
    runs: pd.DataFrame, metric: str, ratio_column: str, per_category: bool, row_name: str
) -> pd.DataFrame:
    """Cells of ``metric`` for every detector and value of ``ratio_column`` in ``runs``: one row
    per category (named after it) when ``per_category``, and the mean row named ``row_name``."""
    stats = seed_statistics(runs, metric, ["detector", ratio_column])
    if not per_category:
        stats = stats[stats["category"] == MEAN]
    stats = stats.assign(
        row=np.where(stats["category"] == MEAN, row_name, stats["category"]), metric=metric
    )
    return stats.rename(columns={ratio_column: "ratio"})[CELL_COLUMNS]


def _select_ratios(runs: pd.DataFrame, column: str, ratios: Sequence[float]) -> pd.DataFrame:
    chosen = np.zeros(len(runs), dtype=bool)
    for ratio in ratios:
        chosen |= np.isclose(runs[column].to_numpy(), ratio)
    if not chosen.any():
        raise ValueError(
            f"no run has {column} in {list(ratios)}: the results hold "
            f"{sorted(runs[column].unique())}; run the workflow with these ratios configured"
        )
    return runs[chosen]


def _category_table(
    runs: pd.DataFrame, parts: list[pd.DataFrame], ratio_label: str, note: str, std_rows=()
) -> PaperTable:
    """A table whose first part holds the per-category rows followed by its mean row."""
    cells = pd.concat(parts, ignore_index=True)
    n_categories = parts[0]["row"].nunique() - 1
    return PaperTable(
        cells, ratio_label, detector_labels(runs), note, n_categories, tuple(std_rows)
    )


def _pixel_rows(runs: pd.DataFrame, ratio_column: str) -> list[pd.DataFrame]:
    return [
        _cells(runs, metric, ratio_column, False, MEAN_ROW_NAMES[metric])
        for metric in PIXEL_METRICS
    ]


def table1(runs: pd.DataFrame, ratios: Sequence[float] = (0.0, 0.2)) -> PaperTable:
    """Table 1: per-category AUROC of the unrefined detectors at each pollution ratio in
    ``ratios``, mean rows of AUROC, AU-IoU and AU-PRO. As in the paper, the AUROC rows print
    their standard deviation, the pixel rows do not."""
    runs = _select_ratios(runs[runs["strategy"] == "none"], "pollution_ratio", ratios)
    auroc = _cells(runs, "image_auroc", "pollution_ratio", True, MEAN_ROW_NAMES["image_auroc"])
    parts = [auroc]
    note = ""
    if has_masks(runs):
        parts += _pixel_rows(runs, "pollution_ratio")
    else:
        note = no_mask_note(runs)
    return _category_table(runs, parts, "Pollution", note, std_rows=auroc["row"].unique())


def table2(runs: pd.DataFrame, ratios: Sequence[float] = (0.0, 0.2, 0.4)) -> PaperTable:
    """Table 2: SROC at refinement ratios ``ratios`` of the polluted training set: per-category
    AUROC, mean pixel metrics and the mean refinement precision, recall and F1. No standard
    deviation is printed (the paper prints none; the CSV holds them)."""
    runs = _select_ratios(runs[runs["strategy"] == "sroc"], "refinement_ratio", ratios)
    runs = without_empty_refinements(runs)
    parts = [_cells(runs, "image_auroc", "refinement_ratio", True, MEAN_ROW_NAMES["image_auroc"])]
    note = (
        "Refinement precision, recall and F1 are undefined (-) when nothing is removed. "
        "Standard deviations over seeds are in the CSV, not printed, as in the paper."
    )
    if has_masks(runs):
        parts += _pixel_rows(runs, "refinement_ratio")
    else:
        note = f"{no_mask_note(runs)} {note}"
    parts += [
        _cells(runs, score, "refinement_ratio", False, METRIC_NAMES[score])
        for score in REFINEMENT_SCORES
    ]
    return _category_table(runs, parts, "Refinement", note)


def refiner_runs(runs: pd.DataFrame, refiner: str) -> tuple[pd.DataFrame, list[str]]:
    """The runs refined by ``refiner``'s ranking: ``by_refiner`` rows, and for a detector of the
    refiner's own type (which has no ``by_refiner`` rows) its ``sroc`` rows, which are the same
    refinement. Returns the runs and the detectors that took their ``sroc`` rows."""
    by_refiner = runs[(runs["strategy"] == "by_refiner") & (runs["refiner"] == refiner)]
    own = runs[(runs["strategy"] == "sroc") & (runs["detector_type"] == refiner)]
    own = own[~own["detector"].isin(by_refiner["detector"].unique())]
    return pd.concat([by_refiner, own], ignore_index=True), list(own["detector"].unique())


def table4(
    runs: pd.DataFrame, refiner: str = "mahalanobis", ratios: Sequence[float] = (0.0, 0.2, 0.4)
) -> PaperTable:
    """Table 4: mean metrics of SROC refined by each detector itself (reference) and by
    ``refiner``'s ranking, at refinement ratios ``ratios``. No standard deviation is printed
    (the paper prints none; the CSV holds them)."""
    reference = _select_ratios(runs[runs["strategy"] == "sroc"], "refinement_ratio", ratios)
    refined, own = refiner_runs(runs, refiner)
    if refined.empty:
        raise ValueError(
            f"no run is refined by {refiner!r}: add by_refiner to refinement.strategies and set "
            f"refinement.refiner to {refiner!r}"
        )
    refined = _select_ratios(refined, "refinement_ratio", ratios)
    metrics = ["image_auroc", *PIXEL_METRICS] if has_masks(runs) else ["image_auroc"]
    refiner_name = detector_label(refiner, refiner)
    parts = []
    for metric in metrics:
        name = MEAN_ROW_NAMES[metric]
        parts.append(_cells(reference, metric, "refinement_ratio", False, f"{name} (reference)"))
        parts.append(_cells(refined, metric, "refinement_ratio", False, f"{name} ({refiner_name})"))
    notes = [] if has_masks(runs) else [no_mask_note(runs)]
    labels = detector_labels(runs)
    if own:
        own_labels = ", ".join(labels[detector] for detector in own)
        notes.append(f"{own_labels}: refined by its own ranking, the reference rows repeat.")
    notes.append("Standard deviations over seeds are in the CSV, not printed, as in the paper.")
    cells = pd.concat(parts, ignore_index=True)
    return PaperTable(cells, "Refinement", labels, " ".join(notes))
