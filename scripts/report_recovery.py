"""Rule table_recovery: the share of the metric lost to pollution that each strategy wins back."""

from sroc import report
from sroc.io import write_text_atomic
from sroc.logs import rule_logging
from sroc.report import placeholders, recovery, tables

with rule_logging(snakemake.log[0]):
    runs = tables.read_runs(snakemake.input.runs)
    if runs.empty:
        placeholders.write_placeholders(snakemake.output)
    else:
        table = recovery.recovery_table(runs, snakemake.params.metric, snakemake.params.min_loss)
        report.write_table(table, snakemake.output.csv, snakemake.output.markdown)
        write_text_atomic(snakemake.output.latex, tables.plain_latex(table))
