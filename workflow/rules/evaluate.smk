rule evaluate:
    input:
        manifest=manifest(),
        scores=expand(
            detector_scores(category="{{category}}", seed="{{seed}}"), detector=DETECTORS
        ),
    output:
        metrics=f"{RESULTS}/metrics/{{category}}/seed{{seed}}.csv",
    params:
        detectors=list(DETECTORS),
        fpr_limit=EVALUATION["fpr_limit"],
        resolution=EVALUATION["resolution"],
        input_size=BACKBONE.input_size,
    resources:
        mem_mb=8000,
    log:
        f"{LOGS}/evaluate/{{category}}/seed{{seed}}.log",
    script:
        "../../scripts/evaluate.py"
