"""Rule pollution_table: Table 1 and Figure 3 of the paper from every run's metrics."""

from sroc import report
from sroc.io import atomic_path
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]):
    all_runs = report.concat_metrics(snakemake.input.metrics)
    with atomic_path(snakemake.output.all_runs) as tmp:
        all_runs.to_csv(tmp, index=False)
    table = report.pollution_table(all_runs)
    report.write_table(table, snakemake.output.csv, snakemake.output.markdown)
    report.plot_metric_vs_ratio(
        all_runs,
        "image_auroc",
        snakemake.output.plot,
        title=f"{snakemake.params.dataset}: image AUROC",
    )
