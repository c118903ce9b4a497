"""Rule paper_comparison: our results beside the numbers published in the paper."""

from sroc.io import write_text_atomic
from sroc.logs import rule_logging
from sroc.report import paper, placeholders

with rule_logging(snakemake.log[0]):
    runs = placeholders.runs_or_placeholders(
        snakemake.input.runs, snakemake.output, snakemake.params.plugins
    )
    if runs is not None:
        params = snakemake.params
        comparison = paper.compare_with_paper(runs, refiner=params.refiner)
        protocols = sorted(runs["protocol"].unique())
        note = paper.comparison_note(params.backbone, params.dataset, protocols)
        output = snakemake.output
        write_text_atomic(output.csv, comparison.to_csv(index=False))
        write_text_atomic(output.markdown, paper.comparison_markdown(comparison, note))
        write_text_atomic(output.latex, paper.comparison_latex(comparison, note))
        paper.plot_comparison(
            comparison, [output.png, output.pdf], title=paper.comparison_title(params.dataset)
        )
