"""Rule index_category: list and validate every image of one category."""

from sroc.datasets.layout import index_category
from sroc.io import atomic_path
from sroc.logs import rule_logging

with rule_logging(snakemake.log[0]) as log:
    index = index_category(
        snakemake.params.root,
        snakemake.wildcards.category,
        require_masks=snakemake.params.require_masks,
    )
    log.info("%d images: %s", len(index), index.groupby(["origin", "defect_type"]).size().to_dict())
    with atomic_path(snakemake.output[0]) as tmp:
        index.to_csv(tmp, index=False)
