"""Rules figure_pollution, figure_refinement, figure_refiner, figure_strategies: Figures 3-5 and
7-13 of the paper."""

from sroc.logs import rule_logging
from sroc.plugins import load_plugins
from sroc.report import figures, placeholders, tables

with rule_logging(snakemake.log[0]):
    load_plugins(snakemake.params.plugins)
    runs = tables.read_runs(snakemake.input.runs)
    if runs.empty:
        placeholders.write_placeholders(snakemake.output)
    else:
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
