"""Rule figure_contours: Figure 6, the Gaussians of the healthy and of the polluted training set
of chosen categories, along the embedding dimensions whose variance changes most."""

import logging

from sroc import splits
from sroc.logs import rule_logging
from sroc.report import embedding_geometry as geometry
from sroc.report import placeholders

with rule_logging(snakemake.log[0]):
    params = snakemake.params
    shown = {}
    for category, cache, manifest in zip(
        params.categories, snakemake.input.caches, snakemake.input.manifests, strict=True
    ):
        manifests = {params.seed: splits.read_manifest(manifest)}
        embeddings = geometry.training_embeddings(cache, manifests, params.pollution_ratio)
        if not embeddings:
            logging.warning(
                "category %s is excluded from the benchmark: Figure 6 leaves it out (choose "
                "others in config report.contour_categories)",
                category,
            )
            continue
        shown[category] = embeddings[params.seed]
    if shown:
        geometry.plot_mvg_contours(shown, [snakemake.output.png, snakemake.output.pdf])
    else:
        placeholders.write_placeholders(snakemake.output)
