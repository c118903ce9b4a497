# The experiment grid (sections 4.3-4.5, Appendix B): per (category, seed, detector) one job
# fits the robustness curve, ranks the polluted training set with every strategy and fits the
# oracle; one job per refinement ratio refits on what each ranking keeps; one job collects
# every row into runs.parquet. While a cell's refits are cheap, its rank job computes them too and
# stages them for the refine jobs, which adopt them (scripts/staged_refits.py).


rule rank:
    input:
        manifest=manifest(),
        info=split_info(),
        cache=embedding_cache(),
    output:
        scores=cell_path("scores", "ranked"),
        metrics=cell_path("metrics", "ranked"),
    log:
        f"{LOGS}/rank/{{detector}}/{{category}}/seed{{seed}}.log",
    conda:
        "../../envs/sroc.yaml"
    threads: detector_threads
    resources:
        mem_mb=detector_mem_mb,
        runtime=detector_runtime,
    params:
        setup=refinement_setup,
        pollution_ratios=RATIOS,
        strategies=detector_strategies,
        plugins=PLUGINS,
        unrefined_rows=0.0 in REFINEMENT["ratios"],
        evaluation=EVALUATION,
        input_size=BACKBONE.input_size,
        # What the refine jobs read, for the refits this job stages (not the ratios: a new one
        # must not re-run this job; the script reads them from the config).
        refine_setup=lambda wildcards: refinement_setup(wildcards, per_ratio=True),
        refine_strategies=per_ratio_strategies,
        staged=staged_dir(),
    script:
        "../../scripts/rank.py"


rule refine:
    input:
        manifest=manifest(),
        info=split_info(),
        cache=embedding_cache(),
        ranked=cell_path("scores", "ranked"),
    output:
        scores=cell_path("scores", "refined-r{ratio}"),
        metrics=cell_path("metrics", "refined-r{ratio}"),
    log:
        f"{LOGS}/refine/{{detector}}/{{category}}/seed{{seed}}-r{{ratio}}.log",
    conda:
        "../../envs/sroc.yaml"
    threads: detector_threads
    resources:
        mem_mb=detector_mem_mb,
        runtime=detector_runtime,
    params:
        setup=lambda wildcards: refinement_setup(wildcards, per_ratio=True),
        strategies=per_ratio_strategies,
        ratio=lambda wildcards: float(wildcards.ratio),
        plugins=PLUGINS,
        evaluation=EVALUATION,
        input_size=BACKBONE.input_size,
        staged=staged_dir(),
    script:
        "../../scripts/refine.py"


rule collect_runs:
    input:
        ranked=ranked_outputs("metrics"),
        refined=refined_outputs("metrics"),
    output:
        parquet=f"{RESULTS}/runs.parquet",
        csv=f"{RESULTS}/runs.csv",
    log:
        f"{LOGS}/collect_runs.log",
    conda:
        "../../envs/sroc.yaml"
    params:
        dataset=DATASET["name"],
    script:
        "../../scripts/collect_runs.py"
