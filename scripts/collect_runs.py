"""Rule collect_runs: every row of the grid in one tidy table, runs.parquet with a CSV beside."""

from sroc import runs
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]) as log:
    table = runs.collect_rows(
        [*snakemake.input.ranked, *snakemake.input.refined], snakemake.params.dataset
    )
    log.info("%d runs", len(table))
    runs.write_results_table(table, snakemake.output.parquet, snakemake.output.csv)
