rule embed:
    input:
        index=f"{RESULTS}/index/{{category}}.csv",
    output:
        cache=embedding_cache(),
    params:
        backbone=BACKBONE,
    threads: config["backbone"].get("threads", 2)
    resources:
        mem_mb=8000,
    log:
        f"{LOGS}/embed/{{category}}.log",
    script:
        "../../scripts/embed.py"
