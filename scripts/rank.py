"""Rule rank: the robustness curve, the rankings of the polluted training set and the single-run
strategies' runs of one (detector, category, seed); then, while they are cheap, the refits of the
cell's refine jobs, staged for those jobs to adopt (scripts/staged_refits.py)."""

import time

import staged_refits

from sroc import config as sroc_config
from sroc import experiment, runs
from sroc.logs import rule_logging


def refined_ratios(config: dict) -> list[str]:
    """The ratios of the cell's refine jobs, as their wildcard writes them (REFINED_RATIOS in
    workflow/rules/common.smk). Read from the config, not from a param: a new ratio must not
    re-run this job."""
    settings = sroc_config.refinement_settings(config)
    if not settings["strategies"]:
        return []
    return [f"{r:g}" for r in sorted(settings["ratios"]) if r > 0]


def stage_refits(job, fitted, rankings, attrs, log) -> None:
    """Compute the cell's refine jobs, ratio by ratio, while the projected refits stay within
    experiment.STAGED_REFITS_SECONDS; stage each for its refine job, keyed by that job's params
    and inputs."""
    params = snakemake.params
    folder = params.staged
    staged_refits.clear(folder)
    setup = experiment.RefinementSetup.from_params(
        params.refine_setup, snakemake.threads, snakemake.wildcards.category, job.info["seed"]
    )
    inputs = {
        "manifest": snakemake.input.manifest,
        "info": snakemake.input.info,
        "ranked": snakemake.output.scores,
        "cache": snakemake.input.cache,
    }
    base = {
        "setup": params.refine_setup,
        "strategies": params.refine_strategies,
        "plugins": params.plugins,
        "evaluation": params.evaluation,
        "input_size": params.input_size,
    }
    n_refits = len(rankings) + len(params.refine_strategies)
    spent = last = 0.0
    for ratio in refined_ratios(snakemake.config):
        projected = max(last, experiment.projected_refine_seconds(fitted, n_refits))
        if spent + projected > experiment.STAGED_REFITS_SECONDS:
            log.info(
                "refits from r=%s on left to their refine jobs (projected %.1f s each, %.1f s "
                "spent)", ratio, projected, spent,
            )  # fmt: skip
            break
        started = time.perf_counter()
        refitted, rows, own = experiment.refine_job(
            job, setup, params.refine_strategies, float(ratio), snakemake.output.scores
        )
        staged = staged_refits.paths(folder, ratio)
        runs.write_scores(staged["scores"], attrs, refitted, own)
        job.write_rows(staged["metrics"], rows, snakemake.wildcards.detector, setup.detector)
        staged_refits.seal(
            folder, ratio, staged_refits.job_key({**base, "ratio": float(ratio)}, inputs)
        )
        last = time.perf_counter() - started
        spent += last
        log.info("staged the refits at r=%s for its refine job in %.2f s", ratio, last)


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
    attrs = job.attrs(name, setup.detector)
    runs.write_scores(snakemake.output.scores, attrs, fitted, rankings)
    # Before the metrics: the job's last output marks its end (Snakemake's metadata).
    stage_refits(job, fitted, rankings, attrs, log)
    job.write_rows(snakemake.output.metrics, rows, name, setup.detector)
