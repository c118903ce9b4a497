"""Rule table_recovery: the share of each metric lost to pollution that each strategy wins back,
as a table (CSV: raw fractions; Markdown, LaTeX: as the paper prints) and a bar figure."""

import pandas as pd

from sroc.io import write_text_atomic
from sroc.logs import rule_logging
from sroc.report import figures, placeholders, recovery, tables

with rule_logging(snakemake.log[0]):
    runs = placeholders.runs_or_placeholders(
        snakemake.input.runs, snakemake.output, snakemake.params.plugins
    )
    if runs is not None:
        table = pd.concat(
            [
                recovery.recovery_table(runs, metric, snakemake.params.min_loss)
                for metric in snakemake.params.metrics
            ],
            ignore_index=True,
        )
        readable = recovery.recovery_for_reading(table)
        write_text_atomic(snakemake.output.csv, table.to_csv(index=False))
        markdown = readable.to_markdown(index=False, stralign="right", disable_numparse=True)
        write_text_atomic(snakemake.output.markdown, markdown + "\n")
        write_text_atomic(snakemake.output.latex, tables.plain_latex(readable))
        figures.plot_recovery(table, [snakemake.output.png, snakemake.output.pdf])
