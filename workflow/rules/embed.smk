rule embed:
    input:
        index=f"{RESULTS}/index/{{category}}.csv",
    output:
        cache=embedding_cache(),
    log:
        f"{LOGS}/embed/{{category}}.log",
    conda:
        "../../envs/sroc.yaml"
    threads: config["backbone"].get("threads", 2)
    resources:
        mem_mb=8000,
    params:
        backbone=BACKBONE,
    script:
        "../../scripts/embed.py"
