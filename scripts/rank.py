"""Rule rank: the robustness curve, the rankings of the polluted training set and the oracle of
one (detector, category, seed)."""

from sroc import grid, runs
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]) as log:
    detector = grid.DetectorSpec(**snakemake.params.detector, n_jobs=snakemake.threads)
    refiner = grid.DetectorSpec(**snakemake.params.refiner, n_jobs=snakemake.threads)
    job = grid.CellJob.load(
        snakemake.input.manifest,
        snakemake.input.info,
        snakemake.input.cache,
        snakemake.params.evaluation,
        snakemake.params.input_size,
    )
    fitted, rankings, rows = [], [], []
    if job.cell is not None:
        fitted, rankings = grid.unrefined_runs_and_rankings(
            job.cell,
            detector,
            refiner,
            job.evaluation,
            pollution_ratios=snakemake.params.pollution_ratios,
            refined_ratio=snakemake.params.refined_ratio,
            strategies=snakemake.params.strategies,
            n_folds=snakemake.params.n_folds,
            rng_seed=grid.strategy_seed(snakemake.wildcards.category, job.info["seed"]),
            iterative_steps=snakemake.params.iterative_steps,
            consensus=[
                grid.DetectorSpec(**member, n_jobs=snakemake.threads)
                for member in snakemake.params.consensus
            ],
        )
        unrefined = rankings if snakemake.params.unrefined_rows else []
        rows = grid.result_rows(fitted, job.evaluation, unrefined)
    name = snakemake.wildcards.detector
    runs.write_scores(snakemake.output.scores, job.attrs(name, detector), fitted, rankings)
    job.write_rows(snakemake.output.metrics, rows, name, detector)
