"""Rule refine: at one refinement ratio, refit on what every ranking keeps (ranking first for the
strategies that rank per ratio) and score the test set, for one (detector, category, seed)."""

from sroc import experiment, runs
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]) as log:
    job, setup = experiment.CellJob.for_rule(
        snakemake.input, snakemake.params, snakemake.threads, snakemake.wildcards.category
    )
    ratio = snakemake.params.ratio
    refitted, rows, own = [], [], []
    if job.cell is not None:
        own = experiment.per_ratio_rankings(job.cell, setup, snakemake.params.strategies, ratio)
        rankings = runs.read_rankings(snakemake.input.ranked)
        rankings.update({ranking.strategy: ranking for ranking in own})
        evaluation = job.evaluation
        refitted = experiment.refined_runs(job.cell, setup.detector, evaluation, rankings, ratio)
        rows = experiment.result_rows(refitted, evaluation)
    name = snakemake.wildcards.detector
    runs.write_scores(snakemake.output.scores, job.attrs(name, setup.detector), refitted, own)
    job.write_rows(snakemake.output.metrics, rows, name, setup.detector)
