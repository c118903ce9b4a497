rule detect:
    input:
        manifest=manifest(),
        info=split_info(),
        cache=embedding_cache(),
    output:
        scores=detector_scores(),
    log:
        f"{LOGS}/detect/{{detector}}/{{category}}/seed{{seed}}.log",
    conda:
        "../../envs/sroc.yaml"
    threads: lambda wildcards: DETECTORS[wildcards.detector].get("threads", 2)
    resources:
        mem_mb=detector_mem_mb,
    params:
        detector_type=lambda wildcards: DETECTORS[wildcards.detector]["type"],
        detector_params=lambda wildcards: DETECTORS[wildcards.detector].get(
            "params", {}
        ),
        ratios=RATIOS,
    script:
        "../../scripts/detect.py"
