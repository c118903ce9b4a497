"""Rule paired_statistics: mean paired differences across seeds with t confidence intervals."""

from sroc.io import write_text_atomic
from sroc.logs import rule_logging
from sroc.report import placeholders, stats, tables

with rule_logging(snakemake.log[0]):
    runs = placeholders.runs_or_placeholders(
        snakemake.input.runs, snakemake.output, snakemake.params.plugins
    )
    if runs is not None:
        params = snakemake.params
        table = stats.paired_statistics(runs, params.metric, params.refiner)
        readable = stats.with_detector_labels(table, runs)
        write_text_atomic(snakemake.output.csv, table.to_csv(index=False))
        write_text_atomic(
            snakemake.output.markdown, readable.to_markdown(index=False, floatfmt=".4g") + "\n"
        )
        write_text_atomic(snakemake.output.latex, tables.plain_latex(readable))
