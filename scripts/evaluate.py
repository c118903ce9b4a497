"""Rule evaluate: metrics of every detector and run of one category and seed."""

from sroc import runs, splits
from sroc.io import atomic_path
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]) as log:
    manifest = splits.read_manifest(snakemake.input.manifest)
    metrics = runs.evaluate_runs(
        splits.test_set(manifest),
        dict(zip(snakemake.params.detectors, snakemake.input.scores, strict=True)),
        fpr_limit=snakemake.params.fpr_limit,
        resolution=snakemake.params.resolution,
        input_size=snakemake.params.input_size,
    )
    metrics.insert(0, "category", snakemake.wildcards.category)
    metrics.insert(1, "seed", int(snakemake.wildcards.seed))
    log.info("\n%s", metrics.to_string())
    with atomic_path(snakemake.output.metrics) as tmp:
        metrics.to_csv(tmp, index=False)
