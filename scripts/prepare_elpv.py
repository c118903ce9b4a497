"""Rule prepare_elpv: the elpv solar-cell dataset in MVTec AD layout."""

from sroc.datasets import prepare_elpv
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]):
    prepare_elpv(
        snakemake.output[0],
        good_probabilities=snakemake.params.good_probabilities,
        defective_probabilities=snakemake.params.defective_probabilities,
        test_good_every=snakemake.params.test_good_every,
    )
