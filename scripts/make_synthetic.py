"""Rule make_synthetic: a seeded synthetic texture dataset with defects and masks."""

from sroc.datasets import make_synthetic_dataset
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]):
    make_synthetic_dataset(
        snakemake.output[0],
        categories=snakemake.params.categories,
        **snakemake.params.options,
    )
