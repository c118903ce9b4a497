rule evaluate:
    input:
        manifest=manifest(),
        scores=expand(
            detector_scores(category="{{category}}", seed="{{seed}}"),
            detector=DETECTORS,
        ),
    output:
        metrics=f"{RESULTS}/metrics/{{category}}/seed{{seed}}.csv",
    log:
        f"{LOGS}/evaluate/{{category}}/seed{{seed}}.log",
    conda:
        "../../envs/sroc.yaml"
    resources:
        mem_mb=8000,
    params:
        detectors=list(DETECTORS),
        fpr_limit=EVALUATION["fpr_limit"],
        resolution=EVALUATION["resolution"],
        input_size=BACKBONE.input_size,
    script:
        "../../scripts/evaluate.py"
