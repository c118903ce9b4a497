"""Rule detect: one detector on one category and seed, for every pollution ratio."""

import json
from pathlib import Path

from sroc import runs, splits
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]) as log:
    info = json.loads(Path(snakemake.input.info).read_text())
    attrs = {
        "detector": snakemake.wildcards.detector,
        "detector_type": snakemake.params.detector_type,
        "detector_params": json.dumps(snakemake.params.detector_params, sort_keys=True),
        "protocol": info["protocol"],
        "seed": info["seed"],
        "excluded": info["excluded"],
    }
    if info["excluded"]:
        log.warning("nothing to fit: %s", info["excluded"])
        results = []
    else:
        results = runs.pollution_runs(
            snakemake.params.detector_type,
            snakemake.params.detector_params,
            splits.read_manifest(snakemake.input.manifest),
            snakemake.input.cache,
            snakemake.params.ratios,
            seed=info["seed"],
            n_jobs=snakemake.threads,
        )
    runs.write_scores(snakemake.output.scores, results, attrs)
