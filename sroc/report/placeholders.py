"""Outputs that say why there is nothing to show, so that a run whose categories were all
excluded finishes with a report that explains itself instead of a traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from sroc.io import atomic_path, write_text_atomic  # noqa: E402
from sroc.plugins import load_plugins  # noqa: E402
from sroc.report.tables import read_results_table  # noqa: E402

log = logging.getLogger(__name__)

NOTHING_TO_REPORT = (
    "nothing to report: every category was excluded from the benchmark "
    "(the reasons are in tables/split_summary.md)"
)


def write_placeholders(paths: Iterable[str | Path], reason: str = NOTHING_TO_REPORT) -> None:
    """Write every output in ``paths`` as a note giving ``reason``: a figure holding the text
    for .png/.pdf, a one-cell table for .csv, the sentence for .md and a comment for .tex."""
    log.warning("%s", reason)
    for path in map(Path, paths):
        if path.suffix in (".png", ".pdf"):
            figure, axes = plt.subplots(figsize=(6, 1.5))
            axes.axis("off")
            axes.text(0.5, 0.5, reason, ha="center", va="center", wrap=True)
            with atomic_path(path, suffix=path.suffix) as tmp:
                figure.savefig(tmp, format=path.suffix[1:])
            plt.close(figure)
        elif path.suffix == ".csv":
            write_text_atomic(path, f'note\n"{reason}"\n')
        elif path.suffix == ".tex":
            write_text_atomic(path, f"% {reason}\n")
        else:
            write_text_atomic(path, f"{reason}\n")


def runs_or_placeholders(
    runs_path: str | Path, outputs: Iterable[str | Path], plugins: Iterable[str | Path] = ()
) -> pd.DataFrame | None:
    """What a report rule starts from: the results table, once the config's ``plugins`` (which
    register the strategies and detectors it names) are loaded; or None, after writing every
    output as a placeholder, when every category was excluded."""
    load_plugins(plugins)
    runs = read_results_table(runs_path)
    if runs.empty:
        write_placeholders(outputs)
        return None
    return runs
