import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

# The library lives beside the workflow; an installed copy (pip install -e .) works the same.
sys.path.insert(0, str(Path(workflow.basedir)))

from sroc import config as sroc_config  # noqa: E402
from sroc import costs as sroc_costs  # noqa: E402
from sroc import strategies  # noqa: E402
from sroc.backbones import BackboneConfig  # noqa: E402
from sroc.datasets.layout import list_categories  # noqa: E402
from sroc.experiment import STAGED_REFITS_SECONDS  # noqa: E402

validate(config, schema="../schemas/config.schema.yaml")
# Plugin files register strategies and detectors; every job loads them again (params.plugins).
PLUGINS = [str(path) for path in config.get("plugins", [])]
sroc_config.load_config_plugins(config)
sroc_config.validate_config(config)

DATASET = config["dataset"]
SOURCE = DATASET["source"]
RESULTS = f"{config['results_dir']}/{DATASET['name']}"
LOGS = f"{RESULTS}/logs"
SEEDS = config["pollution"]["seeds"]
RATIOS = sorted(config["pollution"]["ratios"])
BACKBONE = BackboneConfig(
    **{k: v for k, v in config["backbone"].items() if k != "threads"}
)
BACKBONE_TAG = BACKBONE.tag()
DETECTORS = {detector["name"]: detector for detector in config.get("detectors", [])}
REFINEMENT = sroc_config.refinement_settings(config)
# r = 0 is the unrefined model, fitted by the ranking job; every other ratio is a job.
REFINED_RATIOS = [f"{r:g}" for r in sorted(REFINEMENT["ratios"]) if r > 0]
RANDOM_STATE = config.get("random_state", 0)
EVALUATION = {"fpr_limit": 0.3, "resolution": None, **config.get("evaluation", {})}


def _configured_root(key):
    root = DATASET.get(SOURCE, {}).get(key)
    return None if root is None else str(Path(root).expanduser())


# Where the dataset lies in MVTec layout, and the rule output that puts it there (if any).
if SOURCE in ("elpv", "synthetic"):
    DATA_ROOT = f"{RESULTS}/data"
    DATA_TARGET = DATA_ROOT
elif SOURCE == "folder":
    DATA_ROOT = _configured_root("root")
    DATA_TARGET = None
    if DATA_ROOT is None or not Path(DATA_ROOT).is_dir():
        raise ValueError(
            f"config dataset.folder.root is {DATA_ROOT!r}, which is not a folder: point it at a "
            "dataset in MVTec AD layout (<root>/<category>/train/good, ...)"
        )
elif _configured_root("root") is not None:
    DATA_ROOT = _configured_root("root")
    DATA_TARGET = None
else:
    DATA_ROOT = "resources/mvtec/mvtec_anomaly_detection"
    DATA_TARGET = DATA_ROOT

if DATASET["categories"] == "all":
    if DATA_TARGET is not None:
        raise ValueError(
            f"config dataset.categories is 'all', but the {SOURCE} dataset does not exist before "
            "the workflow runs: list its categories explicitly"
        )
    CATEGORIES = list_categories(DATA_ROOT)
else:
    CATEGORIES = list(DATASET["categories"])

# elpv has image-level labels only: pixel metrics are reported as missing for it.
REQUIRE_MASKS = SOURCE != "elpv"


wildcard_constraints:
    category="|".join(map(str, CATEGORIES)) if CATEGORIES else "[^/]+",
    seed=r"\d+",
    detector="|".join(DETECTORS) if DETECTORS else "[^/]+",
    ratio=r"[0-9.]+",


def data_input():
    """The rule output that creates the dataset, or nothing for a dataset that already exists."""
    return [DATA_TARGET] if DATA_TARGET is not None else []


def manifest(category="{category}", seed="{seed}"):
    return f"{RESULTS}/splits/{category}/seed{seed}.csv"


def split_info(category="{category}", seed="{seed}"):
    return f"{RESULTS}/splits/{category}/seed{seed}.json"


def embedding_cache(category="{category}"):
    return f"{RESULTS}/embeddings/{category}/{BACKBONE_TAG}.h5"


def cell_path(kind, part, detector="{detector}", category="{category}", seed="{seed}"):
    """Output of one job of the grid: kind "scores" (.h5) or "metrics" (.csv); part "ranked"
    (robustness curve, rankings, oracle) or "refined-r{ratio}"."""
    suffix = "h5" if kind == "scores" else "csv"
    return f"{RESULTS}/{kind}/{detector}/{category}/seed{seed}/{part}.{suffix}"


def detector_spec(name):
    """What a job needs to build the detector: name, type, params, random_state (not threads,
    which Snakemake may lower to fit --cores and which no result depends on)."""
    detector = DETECTORS[name]
    return {
        "name": name,
        "type": detector["type"],
        "params": detector.get("params", {}),
        "random_state": RANDOM_STATE,
    }


def spec_params(spec):
    """A DetectorSpec as a rule param (threads come from the job)."""
    return {
        "name": spec.name,
        "type": spec.type,
        "params": dict(spec.params),
        "random_state": spec.random_state,
    }


def staged_dir(detector="{detector}", category="{category}", seed="{seed}"):
    """Where a rank job stages the refits of its cell's refine jobs (scripts/staged_refits.py);
    each refine job moves its own files out."""
    return f"{RESULTS}/staged/{detector}/{category}/seed{seed}"


def detector_strategies(wildcards):
    """The configured strategies that apply to the job's detector: those whose required
    capabilities the detector class has (sroc.strategies.strategies_for)."""
    return strategies.strategies_for(
        DETECTORS[wildcards.detector]["type"], REFINEMENT["strategies"]
    )


def per_ratio_strategies(wildcards):
    """The job's strategies that rank in each ratio's refine job (kind ranked_per_ratio)."""
    return [
        s
        for s in detector_strategies(wildcards)
        if strategies.get(s).kind == "ranked_per_ratio"
    ]


def refinement_setup(wildcards, per_ratio=False):
    """What the job's strategies read (sroc.experiment.RefinementSetup.from_params): only the
    refinement keys they declare, so that a change to another key (a new refinement ratio, a
    refiner no strategy of the job uses) does not re-run the job. ``per_ratio``: only the
    strategies that rank in each ratio's refine job."""
    chosen = (
        per_ratio_strategies(wildcards) if per_ratio else detector_strategies(wildcards)
    )
    read = strategies.settings_read(chosen)
    return {
        "detector": detector_spec(wildcards.detector),
        "pollution_ratio": REFINEMENT["pollution_ratio"],
        "refiner": (
            spec_params(sroc_config.refiner_spec(config)) if "refiner" in read else None
        ),
        "consensus": [
            spec_params(spec)
            for spec in sroc_config.consensus_specs(config)
            if "consensus" in read
        ],
        "settings": {key: REFINEMENT[key] for key in read},
        "strategy_params": {
            name: sroc_config.strategy_params(config, name)
            for name in chosen
            if strategies.get(name).params
        },
    }


def detector_threads(wildcards):
    return DETECTORS[wildcards.detector].get("threads", 1)


def detector_mem_mb(wildcards, input):
    """Memory of one grid job, from the detector's own estimate on this category's cache."""
    from sroc.detectors import estimate_memory_mb
    from sroc.feature_cache import cache_shapes

    run = DETECTORS[wildcards.detector]
    if not Path(input.cache).exists():
        return 8000  # the cache is not built yet (dry run); estimated when the job is scheduled
    n_images, shapes = cache_shapes(input.cache)
    # Every image of the category bounds both the training and the test set of any split; the
    # cell's features are held once besides the detector's own estimate.
    feature_mb = n_images * sum(c * h * w for c, h, w in shapes.values()) * 4 / 2**20
    return int(
        feature_mb
        + estimate_memory_mb(
            run["type"], run.get("params", {}), n_images, n_images, shapes
        )
    )


def detector_runtime(wildcards, input, attempt):
    """Minutes one grid job may take: the strategies' fits and scorings (sroc.strategies) priced
    by the detector class's runtime_seconds_per_image, x10 (a cluster kills a job that outlives
    its runtime)."""
    from sroc.feature_cache import cache_shapes

    if not Path(input.cache).exists():
        return 60
    n_images, _ = cache_shapes(input.cache)
    detector = DETECTORS[wildcards.detector]
    model = sroc_costs.PerImageCost(
        detector["type"],
        n_images,
        REFINEMENT,
        sroc_config.refiner_spec(config),
        sroc_config.consensus_specs(config),
    )
    chosen = detector_strategies(wildcards)
    if "ratio" in wildcards.keys():
        seconds = strategies.refine_job_cost(chosen, model, float(wildcards.ratio))
    else:
        seconds = len(RATIOS) * model.test_run(n_images)
        seconds += strategies.rank_job_cost(chosen, model)
        # and the refits it stages for the refine jobs (sroc.experiment)
        seconds += STAGED_REFITS_SECONDS
    return max(10, int(10 * attempt * seconds / 60))


def ranked_outputs(kind):
    return expand(
        cell_path(kind, "ranked"), detector=DETECTORS, category=CATEGORIES, seed=SEEDS
    )


def refined_outputs(kind):
    return expand(
        cell_path(kind, "refined-r{ratio}"),
        detector=DETECTORS,
        category=CATEGORIES,
        seed=SEEDS,
        ratio=REFINED_RATIOS if REFINEMENT["strategies"] else [],
    )


def all_targets():
    targets = [
        f"{RESULTS}/tables/split_summary.csv",
        f"{RESULTS}/tables/split_summary.md",
    ]
    targets += [embedding_cache(c) for c in CATEGORIES]
    if DETECTORS:
        targets += [f"{RESULTS}/runs.parquet", f"{RESULTS}/runs.csv", *report_targets()]
        # The per-image scores are results too: a deleted one is recomputed.
        targets += ranked_outputs("scores") + refined_outputs("scores")
    return targets


include: "report_targets.smk"
