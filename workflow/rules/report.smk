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


rule pollution_table:
    input:
        metrics=expand(
            f"{RESULTS}/metrics/{{category}}/seed{{seed}}.csv",
            category=CATEGORIES,
            seed=SEEDS,
        ),
    output:
        all_runs=f"{RESULTS}/tables/metrics_all_runs.csv",
        csv=report(
            f"{RESULTS}/tables/pollution_robustness.csv",
            caption="../report/pollution_robustness.rst",
            category="Pollution robustness",
        ),
        markdown=f"{RESULTS}/tables/pollution_robustness.md",
        plot=report(
            f"{RESULTS}/plots/auroc_vs_pollution.png",
            caption="../report/auroc_vs_pollution.rst",
            category="Pollution robustness",
        ),
    log:
        f"{LOGS}/pollution_table.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        dataset=DATASET["name"],
    script:
        "../../scripts/pollution_table.py"
