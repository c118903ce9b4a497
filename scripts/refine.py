"""Rule refine: at one refinement ratio, refit on what every ranking keeps and score the test
set, for one (detector, category, seed)."""

from sroc import experiment, runs
from sroc.config import DetectorSpec
from sroc.logs import rule_logging
from sroc.plugins import load_plugins

with rule_logging(snakemake.log[0]) as log:
    load_plugins(snakemake.params.plugins)
    detector = DetectorSpec(**snakemake.params.detector, n_jobs=snakemake.threads)
    job = experiment.CellJob.load(
        snakemake.input.manifest,
        snakemake.input.info,
        snakemake.input.cache,
        snakemake.params.evaluation,
        snakemake.params.input_size,
    )
    refitted, rows = [], []
    if job.cell is not None:
        rankings = runs.read_rankings(snakemake.input.ranked)
        refitted = experiment.refined_runs(
            job.cell, detector, job.evaluation, rankings, snakemake.params.ratio
        )
        rows = experiment.result_rows(refitted, job.evaluation)
    name = snakemake.wildcards.detector
    runs.write_scores(snakemake.output.scores, job.attrs(name, detector), refitted)
    job.write_rows(snakemake.output.metrics, rows, name, detector)
