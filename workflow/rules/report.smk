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


# The paper's tables and figures: paths and helpers in report_targets.smk (included by
# common.smk, so that rule all can request report_targets()); docs/report.md says where each
# one lands and how to read it.


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
        plugins=PLUGINS,
        table=1,
        ratios=[0.0, max(RATIOS)],
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
        plugins=PLUGINS,
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
        plugins=PLUGINS,
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
        plugins=PLUGINS,
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
        plugins=PLUGINS,
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
        plugins=PLUGINS,
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
            name
            for name in REFINEMENT_STRATEGIES
            if strategies.get(name).has_ratio_curve
            and not strategies.get(name).uses_refiner
        ],
        plugins=PLUGINS,
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
        plugins=PLUGINS,
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
        plugins=PLUGINS,
    script:
        "../../scripts/report_paired_statistics.py"


rule table_recovery:
    input:
        runs=RUNS,
    output:
        **paper_table_outputs("recovery", "recovery"),
        png=report(
            f"{FIGURES}/recovery.png",
            caption="../report/recovery_figure.rst",
            category="Refinement",
        ),
        pdf=f"{FIGURES}/recovery.pdf",
    log:
        f"{LOGS}/report/recovery.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        metrics=[m for m in REPORT_METRICS.values() if m != "au_iou"],
        min_loss=0.005,
        plugins=PLUGINS,
    script:
        "../../scripts/report_recovery.py"


rule table_auto_ratio:
    input:
        runs=RUNS,
    output:
        **paper_table_outputs("auto_ratio", "auto_ratio"),
    log:
        f"{LOGS}/report/auto_ratio.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        plugins=PLUGINS,
        metric="image_auroc",
    script:
        "../../scripts/report_auto_ratio.py"
