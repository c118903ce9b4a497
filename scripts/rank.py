"""Rule rank: the robustness curve, the rankings of the polluted training set and the single-run
strategies' runs of one (detector, category, seed)."""

from sroc import experiment, runs
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]) as log:
    job, setup = experiment.CellJob.for_rule(
        snakemake.input, snakemake.params, snakemake.threads, snakemake.wildcards.category
    )
    fitted, rankings, rows = [], [], []
    if job.cell is not None:
        fitted, rankings, curves = experiment.unrefined_runs_and_rankings(
            job.cell,
            setup,
            job.evaluation,
            pollution_ratios=snakemake.params.pollution_ratios,
            strategy_names=snakemake.params.strategies,
        )
        unrefined = curves if snakemake.params.unrefined_rows else []
        rows = experiment.result_rows(fitted, job.evaluation, unrefined, setup.pollution_ratio)
    name = snakemake.wildcards.detector
    runs.write_scores(snakemake.output.scores, job.attrs(name, setup.detector), fitted, rankings)
    job.write_rows(snakemake.output.metrics, rows, name, setup.detector)
