"""Rule split: the pollution split of one category for one seed."""

import json

from sroc import splits
from sroc.datasets.layout import read_index
from sroc.io import atomic_path, write_text_atomic
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]) as log:
    manifest, info = splits.split_category(
        read_index(snakemake.input.index),
        seed=snakemake.params.seed,
        set_fraction=snakemake.params.set_fraction,
        min_test_defective=snakemake.params.min_test_defective,
        set_seed=snakemake.params.set_seed,
        max_set_share=snakemake.params.max_set_share,
    )
    if info["excluded"]:
        log.warning("category excluded: %s", info["excluded"])
    elif info["n_unused"]:
        log.info(
            "max_set_share %g: %d of %d training goods kept",
            info["max_set_share"],
            info["n_train"],
            info["n_train"] + info["n_unused"],
        )
    with atomic_path(snakemake.output.manifest) as tmp:
        manifest.to_csv(tmp, index=False)
    write_text_atomic(snakemake.output.info, json.dumps(info, indent=2) + "\n")
