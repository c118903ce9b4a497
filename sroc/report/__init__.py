"""The paper's tables and figures from the results.

Modules: :mod:`sroc.report.tables` (Tables 1, 2, 4 from ``runs.parquet``),
:mod:`sroc.report.figures` (Figures 3-5, 7-13), :mod:`sroc.report.embedding_geometry` (Table 3,
Figure 6), :mod:`sroc.report.paper` (the published numbers and the comparison),
:mod:`sroc.report.stats` (paired statistics across seeds).
"""

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
