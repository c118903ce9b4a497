"""Rule table_auto_ratio: the strategies that estimate their refinement ratio (sroc_auto,
ensemble_auto) against the best fixed ratio of the same ranking chosen with hindsight."""

from sroc import report
from sroc.io import write_text_atomic
from sroc.logs import rule_logging
from sroc.report import auto_ratio, placeholders, tables

with rule_logging(snakemake.log[0]):
    runs = placeholders.runs_or_placeholders(
        snakemake.input.runs, snakemake.output, snakemake.params.plugins
    )
    if runs is not None:
        table = auto_ratio.auto_ratio_table(runs, snakemake.params.metric)
        report.write_csv_and_markdown(table, snakemake.output.csv, snakemake.output.markdown)
        write_text_atomic(snakemake.output.latex, tables.plain_latex(table))
