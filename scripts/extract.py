"""Rule extract_mvtec: verify the archive, then extract its categories safely into place."""

from sroc.datasets import prepare_mvtec
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]):
    prepare_mvtec(
        snakemake.output[0],
        archive=snakemake.input[0],
        sha256=snakemake.params.sha256,
        categories=snakemake.params.categories,
    )
