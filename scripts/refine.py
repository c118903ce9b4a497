"""Rule refine: at one refinement ratio, refit on what every ranking keeps (ranking first for the
strategies that rank per ratio) and score the test set, for one (detector, category, seed).

When the cell's rank job already did so (scripts/staged_refits.py), the job adopts its staged
outputs, checked against its own params and inputs, and imports nothing else."""

import time

import staged_refits

params = {name: getattr(snakemake.params, name) for name in staged_refits.KEY_PARAMS}
inputs = {name: getattr(snakemake.input, name) for name in (*staged_refits.KEY_INPUTS, "cache")}
outputs = {"scores": snakemake.output.scores, "metrics": snakemake.output.metrics}
ratio = snakemake.wildcards.ratio
if staged_refits.adopt(
    snakemake.params.staged, ratio, staged_refits.job_key(params, inputs), outputs
):
    with open(snakemake.log[0], "w") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S,000")
        log.write(
            f"{stamp} INFO refine: adopted the refits at r={ratio} that the rank job of this "
            f"cell staged (its log says what they did)\n"
        )
else:
    from sroc import experiment, runs
    from sroc.logs import rule_logging

    with rule_logging(snakemake.log[0]) as log:
        job, setup = experiment.CellJob.for_rule(
            snakemake.input, snakemake.params, snakemake.threads, snakemake.wildcards.category
        )
        refitted, rows, own = experiment.refine_job(
            job, setup, snakemake.params.strategies, snakemake.params.ratio, snakemake.input.ranked
        )
        name = snakemake.wildcards.detector
        runs.write_scores(snakemake.output.scores, job.attrs(name, setup.detector), refitted, own)
        job.write_rows(snakemake.output.metrics, rows, name, setup.detector)
