if SOURCE == "elpv":

    rule prepare_elpv:
        output:
            directory(DATA_ROOT),
        params:
            good_probabilities=DATASET.get("elpv", {}).get("good_probabilities", [0.0]),
            defective_probabilities=DATASET.get("elpv", {}).get(
                "defective_probabilities", [2 / 3, 1.0]
            ),
            test_good_every=DATASET.get("elpv", {}).get("test_good_every", 3),
        log:
            f"{LOGS}/prepare_elpv.log",
        script:
            "../../scripts/prepare_elpv.py"


if SOURCE == "synthetic":

    rule make_synthetic:
        output:
            directory(DATA_ROOT),
        params:
            categories=CATEGORIES,
            options=DATASET.get("synthetic", {}),
        log:
            f"{LOGS}/make_synthetic.log",
        script:
            "../../scripts/make_synthetic.py"


if SOURCE == "mvtec" and DATA_TARGET is not None:
    MVTEC = DATASET.get("mvtec", {})
    MVTEC_ARCHIVE = MVTEC.get("archive") or "resources/mvtec/mvtec_anomaly_detection.tar.xz"

    if not MVTEC.get("archive"):

        rule download_mvtec:
            output:
                MVTEC_ARCHIVE,
            params:
                url=MVTEC["url"],
                sha256=MVTEC.get("sha256"),
            log:
                "resources/mvtec/download.log",
            script:
                "../../scripts/download.py"

    rule extract_mvtec:
        input:
            MVTEC_ARCHIVE,
        output:
            directory(DATA_ROOT),
        params:
            sha256=MVTEC.get("sha256"),
            categories=CATEGORIES,
        log:
            "resources/mvtec/extract.log",
        script:
            "../../scripts/extract.py"


rule index_category:
    input:
        data_input(),
    output:
        f"{RESULTS}/index/{{category}}.csv",
    params:
        root=DATA_ROOT,
        require_masks=REQUIRE_MASKS,
    log:
        f"{LOGS}/index/{{category}}.log",
    script:
        "../../scripts/index_category.py"
