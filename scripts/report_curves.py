"""Rules figure_pollution, figure_refinement, figure_refiner, figure_strategies: Figures 3-5 and
7-13 of the paper."""

from sroc.logs import rule_logging
from sroc.report import figures, placeholders

with rule_logging(snakemake.log[0]):
    runs = placeholders.runs_or_placeholders(
        snakemake.input.runs, snakemake.output, snakemake.params.plugins
    )
    if runs is not None:
        params = snakemake.params
        paths = [snakemake.output.png, snakemake.output.pdf]
        title = f"{params.dataset}: mean over categories"
        if params.kind == "pollution":
            figures.plot_pollution_curve(runs, params.metric, paths, title=title)
        elif params.kind == "refinement":
            figures.plot_refinement_curve(runs, params.metric, paths, title=title)
        elif params.kind == "refiner":
            figures.plot_refinement_curve(
                runs,
                params.metric,
                paths,
                refiner=params.refiner,
                title=f"{title}, training set ranked by {params.refiner}",
            )
        else:
            figures.plot_strategies(runs, params.metric, paths, strategies=params.strategies)
