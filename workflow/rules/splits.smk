rule split:
    input:
        index=f"{RESULTS}/index/{{category}}.csv",
    output:
        manifest=manifest(),
        info=split_info(),
    log:
        f"{LOGS}/splits/{{category}}/seed{{seed}}.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        seed=lambda wildcards: int(wildcards.seed),
        set_fraction=config["pollution"]["set_fraction"],
        min_test_defective=config["pollution"].get("min_test_defective", 1),
        set_seed=config["pollution"].get("set_seed", "fixed"),
        max_set_share=config["pollution"].get("max_set_share"),
    script:
        "../../scripts/split.py"
