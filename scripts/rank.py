"""Rule rank: the robustness curve, the rankings of the polluted training set and the single-run
strategies' runs of one (detector, category, seed)."""

from sroc import experiment, runs
from sroc.config import DetectorSpec
from sroc.logs import rule_logging
from sroc.plugins import load_plugins

with rule_logging(snakemake.log[0]) as log:
    load_plugins(snakemake.params.plugins)
    threads = snakemake.threads
    detector = DetectorSpec(**snakemake.params.detector, n_jobs=threads)
    job = experiment.CellJob.load(
        snakemake.input.manifest,
        snakemake.input.info,
        snakemake.input.cache,
        snakemake.params.evaluation,
        snakemake.params.input_size,
    )
    fitted, rankings, rows = [], [], []
    if job.cell is not None:
        fitted, rankings = experiment.unrefined_runs_and_rankings(
            job.cell,
            detector,
            job.evaluation,
            pollution_ratios=snakemake.params.pollution_ratios,
            refined_ratio=snakemake.params.refined_ratio,
            strategy_names=snakemake.params.strategies,
            rng_seed=experiment.strategy_seed(snakemake.wildcards.category, job.info["seed"]),
            refiner=DetectorSpec(**snakemake.params.refiner, n_jobs=threads),
            consensus=[
                DetectorSpec(**member, n_jobs=threads) for member in snakemake.params.consensus
            ],
            settings=snakemake.params.settings,
            strategy_params=snakemake.params.strategy_params,
        )
        unrefined = rankings if snakemake.params.unrefined_rows else []
        rows = experiment.result_rows(fitted, job.evaluation, unrefined)
    name = snakemake.wildcards.detector
    runs.write_scores(snakemake.output.scores, job.attrs(name, detector), fitted, rankings)
    job.write_rows(snakemake.output.metrics, rows, name, detector)
