"""Rule split_summary: split sizes and pollution composition per category, seed and ratio."""

from sroc import splits
from sroc.logs import rule_logging
from sroc.report import write_csv_and_markdown

with rule_logging(snakemake.log[0]) as log:
    summary = splits.summarize_splits(
        snakemake.input.manifests,
        snakemake.input.infos,
        snakemake.params.ratios,
    )
    note = splits.exclusion_note(summary)
    if note:
        log.warning(note)
    write_csv_and_markdown(summary, snakemake.output.csv, snakemake.output.markdown)
