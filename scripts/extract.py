"""Rule extract_mvtec: verify the archive, then extract it safely into place."""

from sroc.datasets import extract_archive_safely, verify_sha256

from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]):
    if snakemake.params.sha256:
        verify_sha256(snakemake.input[0], snakemake.params.sha256)
    extract_archive_safely(snakemake.input[0], snakemake.output[0])
