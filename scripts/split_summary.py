"""Rule split_summary: split sizes and pollution composition per category, seed and ratio."""

from sroc import report
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]):
    summary = report.split_summary(
        snakemake.input.manifests,
        snakemake.input.infos,
        snakemake.params.ratios,
    )
    report.write_table(summary, snakemake.output.csv, snakemake.output.markdown)
