rule split_summary:
    input:
        manifests=expand(manifest(), category=CATEGORIES, seed=SEEDS),
        infos=expand(split_info(), category=CATEGORIES, seed=SEEDS),
    output:
        csv=report(
            f"{RESULTS}/tables/split_summary.csv",
            caption="../report/split_summary.rst",
            category="Splits",
        ),
        markdown=f"{RESULTS}/tables/split_summary.md",
    log:
        f"{LOGS}/split_summary.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        ratios=RATIOS,
    script:
        "../../scripts/split_summary.py"


# The paper's tables and figures, from the results table of every run (rule collect_runs).
# docs/report.md says where each one lands and how to read it.

REFINEMENT = config.get("refinement", {})
REFINER = REFINEMENT.get("refiner", "mahalanobis")
REFINED_POLLUTION = REFINEMENT.get("pollution_ratio", 0.2)
REFINEMENT_STRATEGIES = REFINEMENT.get(
    "strategies", ["sroc", "random", "cross_validation", "stoc", "oracle", "by_refiner"]
)
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
    strategies = set(REFINEMENT_STRATEGIES)
    if "sroc" in strategies:
        targets += table_files("table2_refinement")
        targets += figure_files("figure5_strategies")
        for metric in REPORT_METRICS:
            targets += figure_files(
                f"figure{REFINEMENT_FIGURES[metric]}_{metric}_vs_refinement"
            )
    if "by_refiner" in strategies:
        targets += table_files("table4_refiner")
        for metric in REPORT_METRICS:
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


rule table_pollution:
    input:
        runs=RUNS,
    output:
        **paper_table_outputs("table1_pollution", "table1_pollution"),
    log:
        f"{LOGS}/report/table1_pollution.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        table=1,
        ratios=[0.0, REFINED_POLLUTION],
    script:
        "../../scripts/report_paper_table.py"


rule table_refinement:
    input:
        runs=RUNS,
    output:
        **paper_table_outputs("table2_refinement", "table2_refinement"),
    log:
        f"{LOGS}/report/table2_refinement.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        table=2,
        ratios=[0.0, REFINED_POLLUTION, 2 * REFINED_POLLUTION],
    script:
        "../../scripts/report_paper_table.py"


rule table_refiner:
    input:
        runs=RUNS,
    output:
        **paper_table_outputs("table4_refiner", "table4_refiner"),
    log:
        f"{LOGS}/report/table4_refiner.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        table=4,
        ratios=[0.0, REFINED_POLLUTION, 2 * REFINED_POLLUTION],
        refiner=REFINER,
    script:
        "../../scripts/report_paper_table.py"


rule table_distances:
    input:
        caches=[embedding_cache(c) for c in CATEGORIES],
        manifests=expand(manifest(), category=CATEGORIES, seed=SEEDS),
    output:
        **paper_table_outputs(
            "table3_embedding_distances", "table3_embedding_distances"
        ),
    log:
        f"{LOGS}/report/table3_embedding_distances.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        categories=CATEGORIES,
        seeds=SEEDS,
        manifests={c: [manifest(c, s) for s in SEEDS] for c in CATEGORIES},
        pollution_ratio=REFINED_POLLUTION,
    script:
        "../../scripts/report_embedding_distances.py"


rule figure_contours:
    input:
        caches=[embedding_cache(c) for c in CONTOUR_CATEGORIES],
        manifests=[manifest(c, SEEDS[0]) for c in CONTOUR_CATEGORIES],
    output:
        png=report(
            f"{FIGURES}/figure6_mvg_contours.png",
            caption="../report/figure6_mvg_contours.rst",
            category="Embedding geometry",
        ),
        pdf=f"{FIGURES}/figure6_mvg_contours.pdf",
    log:
        f"{LOGS}/report/figure6_mvg_contours.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        categories=CONTOUR_CATEGORIES,
        seed=SEEDS[0],
        pollution_ratio=REFINED_POLLUTION,
    script:
        "../../scripts/report_mvg_contours.py"


rule figure_pollution:
    input:
        runs=RUNS,
    output:
        png=report(
            f"{FIGURES}/figure{{number}}_{{metric}}_vs_pollution.png",
            caption="../report/figure_pollution.rst",
            category="Pollution robustness",
        ),
        pdf=f"{FIGURES}/figure{{number}}_{{metric}}_vs_pollution.pdf",
    log:
        f"{LOGS}/report/figure{{number}}_{{metric}}_vs_pollution.log",
    wildcard_constraints:
        number=r"\d+",
        metric="|".join(REPORT_METRICS),
    conda:
        "../../envs/sroc.yaml"
    params:
        kind="pollution",
        metric=lambda wildcards: REPORT_METRICS[wildcards.metric],
        dataset=DATASET["name"],
    script:
        "../../scripts/report_curves.py"


rule figure_refinement:
    input:
        runs=RUNS,
    output:
        png=report(
            f"{FIGURES}/figure{{number}}_{{metric}}_vs_refinement.png",
            caption="../report/figure_refinement.rst",
            category="Refinement",
        ),
        pdf=f"{FIGURES}/figure{{number}}_{{metric}}_vs_refinement.pdf",
    log:
        f"{LOGS}/report/figure{{number}}_{{metric}}_vs_refinement.log",
    wildcard_constraints:
        number=r"\d+",
        metric="|".join(REPORT_METRICS),
    conda:
        "../../envs/sroc.yaml"
    params:
        kind="refinement",
        metric=lambda wildcards: REPORT_METRICS[wildcards.metric],
        dataset=DATASET["name"],
    script:
        "../../scripts/report_curves.py"


rule figure_refiner:
    input:
        runs=RUNS,
    output:
        png=report(
            f"{FIGURES}/figure{{number}}_{{metric}}_vs_refinement_by_refiner.png",
            caption="../report/figure_refiner.rst",
            category="Refinement",
        ),
        pdf=f"{FIGURES}/figure{{number}}_{{metric}}_vs_refinement_by_refiner.pdf",
    log:
        f"{LOGS}/report/figure{{number}}_{{metric}}_vs_refinement_by_refiner.log",
    wildcard_constraints:
        number=r"\d+",
        metric="|".join(REPORT_METRICS),
    conda:
        "../../envs/sroc.yaml"
    params:
        kind="refiner",
        metric=lambda wildcards: REPORT_METRICS[wildcards.metric],
        refiner=REFINER,
        dataset=DATASET["name"],
    script:
        "../../scripts/report_curves.py"


rule figure_strategies:
    input:
        runs=RUNS,
    output:
        png=report(
            f"{FIGURES}/figure5_strategies.png",
            caption="../report/figure5_strategies.rst",
            category="Refinement",
        ),
        pdf=f"{FIGURES}/figure5_strategies.pdf",
    log:
        f"{LOGS}/report/figure5_strategies.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        kind="strategies",
        metric="image_auroc",
        strategies=[
            s for s in REFINEMENT_STRATEGIES if s not in ("oracle", "by_refiner")
        ],
        dataset=DATASET["name"],
    script:
        "../../scripts/report_curves.py"


rule paper_comparison:
    input:
        runs=RUNS,
    output:
        **paper_table_outputs("paper_comparison", "paper_comparison"),
        png=report(
            f"{FIGURES}/paper_comparison.png",
            caption="../report/paper_comparison_plot.rst",
            category="Comparison with the paper",
        ),
        pdf=f"{FIGURES}/paper_comparison.pdf",
    log:
        f"{LOGS}/report/paper_comparison.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        refiner=REFINER,
        backbone=BACKBONE_TAG,
        dataset=DATASET["name"],
    script:
        "../../scripts/report_paper_comparison.py"


rule paired_statistics:
    input:
        runs=RUNS,
    output:
        **paper_table_outputs("paired_statistics", "paired_statistics"),
    log:
        f"{LOGS}/report/paired_statistics.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        metric="image_auroc",
        refiner=REFINER,
    script:
        "../../scripts/report_paired_statistics.py"
