"""Rules table_pollution, table_refinement, table_refiner: Tables 1, 2 and 4 of the paper."""

from sroc.logs import rule_logging
from sroc.report import placeholders, tables

with rule_logging(snakemake.log[0]):
    runs = placeholders.runs_or_placeholders(
        snakemake.input.runs, snakemake.output, snakemake.params.plugins
    )
    if runs is not None:
        params = snakemake.params
        if params.table == 1:
            table = tables.table1(runs, params.ratios)
        elif params.table == 2:
            table = tables.table2(runs, params.ratios)
        else:
            table = tables.table4(runs, params.refiner, params.ratios)
        output = snakemake.output
        tables.write_paper_table(table, output.csv, output.markdown, output.latex)
