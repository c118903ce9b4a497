"""Rule refine: at one refinement ratio, refit on what every ranking keeps and score the test
set, for one (detector, category, seed)."""

from sroc import grid, runs
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]) as log:
    detector = grid.DetectorSpec(**snakemake.params.detector, n_jobs=snakemake.threads)
    job = grid.CellJob.load(
        snakemake.input.manifest,
        snakemake.input.info,
        snakemake.input.cache,
        snakemake.params.evaluation,
        snakemake.params.input_size,
    )
    refitted, rows = [], []
    if job.cell is not None:
        rankings = runs.read_rankings(snakemake.input.ranked)
        refitted = grid.refined_runs(
            job.cell, detector, job.evaluation, rankings, snakemake.params.ratio
        )
        rows = grid.result_rows(refitted, job.evaluation)
    name = snakemake.wildcards.detector
    runs.write_scores(snakemake.output.scores, job.attrs(name, detector), refitted)
    job.write_rows(snakemake.output.metrics, rows, name, detector)
