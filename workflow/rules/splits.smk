rule split:
    input:
        index=f"{RESULTS}/index/{{category}}.csv",
    output:
        manifest=manifest(),
        info=split_info(),
    params:
        seed=lambda wildcards: int(wildcards.seed),
        set_fraction=config["pollution"]["set_fraction"],
        min_test_defective=config["pollution"].get("min_test_defective", 1),
    log:
        f"{LOGS}/splits/{{category}}/seed{{seed}}.log",
    script:
        "../../scripts/split.py"


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
    params:
        ratios=RATIOS,
    log:
        f"{LOGS}/split_summary.log",
    script:
        "../../scripts/split_summary.py"
