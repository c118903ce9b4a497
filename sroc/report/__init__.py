"""The paper's tables and figures from the results.

Modules: :mod:`sroc.report.tables` (Tables 1, 2, 4 from ``runs.parquet``),
:mod:`sroc.report.figures` (Figures 3-5, 7-13), :mod:`sroc.report.embedding_geometry` (Table 3,
Figure 6), :mod:`sroc.report.paper` (the published numbers and the comparison),
:mod:`sroc.report.stats` (paired statistics across seeds), :mod:`sroc.report.labels` (detector
names and the paper's order, for every table and figure).
"""

from __future__ import annotations

import pandas as pd

from sroc.io import atomic_path


def write_csv_and_markdown(
    table: pd.DataFrame, csv_path, markdown_path, float_format: str = ".4g"
) -> None:
    """Write ``table`` as CSV (every digit) and as a Markdown table for reading."""
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(markdown_path) as tmp:
        tmp.write_text(table.to_markdown(index=False, floatfmt=float_format) + "\n")
