"""Rule table_distances: Table 3, mean Euclidean distances between healthy and defective
training images in the embedding space, per category (mean over seeds)."""

import logging

import pandas as pd

from sroc import splits
from sroc.io import write_text_atomic
from sroc.logs import rule_logging
from sroc.report import embedding_geometry as geometry
from sroc.report import placeholders

with rule_logging(snakemake.log[0]):
    params = snakemake.params
    records = []
    for category, cache in zip(params.categories, snakemake.input.caches, strict=True):
        manifests = {
            seed: splits.read_manifest(path)
            for seed, path in zip(params.seeds, params.manifests[category], strict=True)
        }
        embeddings = geometry.training_embeddings(cache, manifests, params.pollution_ratio)
        if not embeddings:
            logging.info("%s: excluded category, no row", category)
        for seed, (pooled, defective) in embeddings.items():
            distances = geometry.mean_distances(pooled, defective)
            records.append({"category": category, "seed": seed, **distances})
    if not records:
        placeholders.write_placeholders(snakemake.output)
    else:
        table = geometry.distance_table(pd.DataFrame(records))
        write_text_atomic(snakemake.output.csv, table.to_csv(index=False))
        write_text_atomic(snakemake.output.markdown, geometry.distance_markdown(table))
        write_text_atomic(snakemake.output.latex, geometry.distance_latex(table))
