"""Rule download_mvtec: fetch the archive and verify its sha256."""

from sroc.datasets import download_file
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]):
    download_file(
        snakemake.params.url,
        snakemake.output[0],
        sha256=snakemake.params.sha256,
    )
