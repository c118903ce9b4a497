# Paths and helpers of the report rules (report.smk): the paper's tables and figures, from the
# results table of every run (rule collect_runs). Included by common.smk, so that rule all can
# request report_targets().

# REFINEMENT (common.smk) holds the refinement section with its defaults.
REFINER = REFINEMENT["refiner"]
REFINED_POLLUTION = REFINEMENT["pollution_ratio"]
REFINEMENT_STRATEGIES = REFINEMENT["strategies"]
RUNS = f"{RESULTS}/runs.parquet"
TABLES = f"{RESULTS}/tables"
FIGURES = f"{RESULTS}/figures"
TABLE_FORMATS = ("csv", "md", "tex")
# Figure numbers of the paper per metric; pixel metrics need defect masks.
REPORT_METRICS = {"auroc": "image_auroc", "au_iou": "au_iou", "au_pro": "au_pro"}
if not REQUIRE_MASKS:
    REPORT_METRICS = {"auroc": "image_auroc"}
POLLUTION_FIGURES = {"auroc": 3, "au_iou": 7, "au_pro": 8}
REFINEMENT_FIGURES = {"auroc": 4, "au_iou": 9, "au_pro": 10}
REFINER_FIGURES = {"auroc": 11, "au_iou": 12, "au_pro": 13}
# Figure 6 shows the paper's two categories when they are in the run, else the first two.
CONTOUR_CATEGORIES = config.get("report", {}).get("contour_categories") or (
    [c for c in ("carpet", "bottle") if c in CATEGORIES] or CATEGORIES[:2]
)


def figure_files(stem):
    return [f"{FIGURES}/{stem}.png", f"{FIGURES}/{stem}.pdf"]


def table_files(stem):
    return [f"{TABLES}/{stem}.{extension}" for extension in TABLE_FORMATS]


def report_targets():
    """Every table and figure of the report (rule all requests them)."""
    targets = table_files("table1_pollution") + table_files(
        "table3_embedding_distances"
    )
    targets += table_files("paired_statistics") + table_files("paper_comparison")
    targets += figure_files("paper_comparison") + figure_files("figure6_mvg_contours")
    for metric in REPORT_METRICS:
        targets += figure_files(
            f"figure{POLLUTION_FIGURES[metric]}_{metric}_vs_pollution"
        )
    if REFINEMENT_STRATEGIES:
        targets += table_files("recovery") + figure_files("recovery")
    # The outputs that exist only when a strategy runs (sroc.strategies: report_outputs).
    enabled = {
        output
        for name in REFINEMENT_STRATEGIES
        for output in strategies.get(name).report_outputs
    }
    if "auto_ratio" in enabled:
        targets += table_files("auto_ratio")
    if "table2_refinement" in enabled:
        targets += table_files("table2_refinement")
    if "figure5_strategies" in enabled:
        targets += figure_files("figure5_strategies")
    if "table4_refiner" in enabled:
        targets += table_files("table4_refiner")
    for metric in REPORT_METRICS:
        if "refinement_curves" in enabled:
            targets += figure_files(
                f"figure{REFINEMENT_FIGURES[metric]}_{metric}_vs_refinement"
            )
        if "refiner_curves" in enabled:
            targets += figure_files(
                f"figure{REFINER_FIGURES[metric]}_{metric}_vs_refinement_by_refiner"
            )
    return targets


def paper_table_outputs(stem, caption):
    return dict(
        csv=report(
            f"{TABLES}/{stem}.csv",
            caption=f"../report/{caption}.rst",
            category="Tables",
        ),
        markdown=f"{TABLES}/{stem}.md",
        latex=f"{TABLES}/{stem}.tex",
    )
