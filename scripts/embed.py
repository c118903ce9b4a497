"""Rule embed: every image of one category through the frozen backbone, into one HDF5 cache."""

from sroc.datasets.layout import read_index
from sroc.embeddings import build_cache
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]):
    build_cache(
        read_index(snakemake.input.index),
        snakemake.output.cache,
        snakemake.params.backbone,
        threads=snakemake.threads,
    )
