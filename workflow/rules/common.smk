import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

# The library lives beside the workflow; an installed copy (pip install -e .) works the same.
sys.path.insert(0, str(Path(workflow.basedir)))

from sroc.backbones import BackboneConfig  # noqa: E402
from sroc.data import list_categories  # noqa: E402

validate(config, schema="../schemas/config.schema.yaml")

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
DETECTORS = config.get("detectors", {})
EVALUATION = {"fpr_limit": 0.3, "resolution": None, **config.get("evaluation", {})}

if max(RATIOS) > config["pollution"]["set_fraction"] + 1e-9:
    raise ValueError(
        f"config pollution.ratios reaches {max(RATIOS)}, above pollution.set_fraction "
        f"{config['pollution']['set_fraction']}: the pollution set cannot supply it; lower the "
        "ratio or raise set_fraction"
    )


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


def data_input():
    """The rule output that creates the dataset, or nothing for a dataset that already exists."""
    return [DATA_TARGET] if DATA_TARGET is not None else []


def manifest(category="{category}", seed="{seed}"):
    return f"{RESULTS}/splits/{category}/seed{seed}.csv"


def split_info(category="{category}", seed="{seed}"):
    return f"{RESULTS}/splits/{category}/seed{seed}.json"


def embedding_cache(category="{category}"):
    return f"{RESULTS}/embeddings/{category}/{BACKBONE_TAG}.h5"


def detector_scores(detector="{detector}", category="{category}", seed="{seed}"):
    return f"{RESULTS}/scores/{detector}/{category}/seed{seed}.h5"


def detector_mem_mb(wildcards, input):
    """Memory of one detector job, from the detector's own estimate on this category's cache."""
    from sroc.detectors import estimate_memory_mb
    from sroc.embeddings import cache_shapes

    run = DETECTORS[wildcards.detector]
    if not Path(input.cache).exists():
        return 8000  # the cache is not built yet (dry run); estimated when the job is scheduled
    n_images, shapes = cache_shapes(input.cache)
    # Every image of the category bounds both the training and the test set of any split.
    return int(
        estimate_memory_mb(
            run["type"], run.get("params", {}), n_images, n_images, shapes
        )
    )


def all_targets():
    targets = [
        f"{RESULTS}/tables/split_summary.csv",
        f"{RESULTS}/tables/split_summary.md",
    ]
    targets += [embedding_cache(c) for c in CATEGORIES]
    return targets


include: "report_targets.smk"
