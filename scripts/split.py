"""Rule split: the pollution split of one category for one seed."""

import json

from sroc import splits
from sroc.data import read_index
from sroc.io import atomic_path, write_text_atomic
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]) as log:
    index = read_index(snakemake.input.index)
    seed = snakemake.params.seed
    set_seed = snakemake.params.set_seed
    info = {
        "protocol": splits.protocol_name(set_seed),
        "seed": seed,
        "set_fraction": snakemake.params.set_fraction,
        "set_seed": set_seed,
        "excluded": None,
    }
    try:
        manifest = splits.make_split(
            index,
            seed=seed,
            set_fraction=snakemake.params.set_fraction,
            min_test_defective=snakemake.params.min_test_defective,
            set_seed=set_seed,
        )
    except splits.CategoryExcluded as reason:
        log.warning("category excluded: %s", reason)
        info["excluded"] = str(reason)
        manifest = splits.excluded_manifest(index)
    info["n_pollution_set"] = int((manifest["role"] == "pollution").sum())
    with atomic_path(snakemake.output.manifest) as tmp:
        manifest.to_csv(tmp, index=False)
    write_text_atomic(snakemake.output.info, json.dumps(info, indent=2) + "\n")
