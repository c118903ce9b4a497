if SOURCE == "elpv":

    rule prepare_elpv:
        output:
            directory(DATA_ROOT),
        log:
            f"{LOGS}/prepare_elpv.log",
        conda:
            "../../envs/sroc.yaml"
        params:
            good_probabilities=DATASET.get("elpv", {}).get("good_probabilities", [0.0]),
            defective_probabilities=DATASET.get("elpv", {}).get(
                "defective_probabilities", [2 / 3, 1.0]
            ),
            test_good_every=DATASET.get("elpv", {}).get("test_good_every", 3),
        script:
            "../../scripts/prepare_elpv.py"


if SOURCE == "synthetic":

    rule make_synthetic:
        output:
            directory(DATA_ROOT),
        log:
            f"{LOGS}/make_synthetic.log",
        conda:
            "../../envs/sroc.yaml"
        params:
            categories=CATEGORIES,
            options=DATASET.get("synthetic", {}),
        script:
            "../../scripts/make_synthetic.py"


if SOURCE == "mvtec" and DATA_TARGET is not None:
    MVTEC = DATASET.get("mvtec", {})
    MVTEC_ARCHIVE = (
        MVTEC.get("archive") or "resources/mvtec/mvtec_anomaly_detection.tar.xz"
    )

    if not MVTEC.get("archive"):

        rule download_mvtec:
            output:
                MVTEC_ARCHIVE,
            log:
                "resources/mvtec/download.log",
            conda:
                "../../envs/sroc.yaml"
            params:
                url=MVTEC["url"],
                sha256=MVTEC.get("sha256"),
            script:
                "../../scripts/download.py"

    rule extract_mvtec:
        input:
            MVTEC_ARCHIVE,
        output:
            directory(DATA_ROOT),
        log:
            "resources/mvtec/extract.log",
        conda:
            "../../envs/sroc.yaml"
        params:
            sha256=MVTEC.get("sha256"),
            categories=CATEGORIES,
        script:
            "../../scripts/extract.py"


rule index_category:
    input:
        data_input(),
    output:
        f"{RESULTS}/index/{{category}}.csv",
    log:
        f"{LOGS}/index/{{category}}.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        # The dataset folder: the output of the rule that made it, or a configured root.
        root=lambda wildcards, input: input[0] if input else DATA_ROOT,
        require_masks=REQUIRE_MASKS,
    script:
        "../../scripts/index_category.py"
