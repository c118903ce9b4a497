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
