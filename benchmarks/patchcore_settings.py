"""PatchCore settings: accuracy and seconds of cheaper settings next to the paper's.

For each setting of ``SETTINGS`` (the paper's: every training patch, IVFFlat; and cheaper ones:
greedy coreset, a stride-16 patch grid, random projection, per-layer equalisation), on

- ``piped``: every category of ../shared/data/piped (masks): fit on train/good, score the test
  images; image AUROC, AU-PRO (maps resized and smoothed as the evaluation does), fit and score
  seconds, averaged over the categories;
- ``elpv``: one cell (mono, seed 0, 20 % pollution, as the workflow's split): fit on the
  polluted training set, score the test set (image AUROC) and self-score the training set
  leave-one-image-out (image scores only, as SROC refinement does); fit + test score +
  self-score seconds, the refinement grid's cost per fit.

Embedding caches (default backbone from config/config.yaml) are built once under ``--scratch``,
outside the repository. Detectors run with ``--threads`` threads. The machine is shared: the
seconds are noisy, the ratios to the paper's setting in the same run less so. ``--quick`` runs
every setting on tiny synthetic features in a few seconds (the test suite does).

    .venv/bin/python benchmarks/patchcore_settings.py [--datasets piped elpv] [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sroc.detectors import PatchCoreDetector
from sroc.geometry import resize_maps, scale_sigma
from sroc.metrics import PixelGroundTruth, image_auroc

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
POLLUTION_RATIO = 0.2
SMOOTHING_SIGMA = 4.0

# name -> PatchCoreDetector parameters. "paper" is config/mvtec.yaml's PatchCore.
SETTINGS: dict[str, dict] = {
    "paper": {},
    "layer_dim128": {"layer_dim": 128},
    "proj128": {"projection_dim": 128},
    "coreset10": {"coreset_ratio": 0.1},
    "coreset1_flat": {"coreset_ratio": 0.01, "index": "flat"},
    "stride16": {"grid_stage": "blocks.4"},
    "stride16_coreset10_flat": {"grid_stage": "blocks.4", "coreset_ratio": 0.1, "index": "flat"},
    "stride16_coreset1_flat": {"grid_stage": "blocks.4", "coreset_ratio": 0.01, "index": "flat"},
    "stride16_proj128_coreset10_flat": {
        "grid_stage": "blocks.4",
        "projection_dim": 128,
        "coreset_ratio": 0.1,
        "index": "flat",
    },
    "stride16_proj128_coreset1_flat": {
        "grid_stage": "blocks.4",
        "projection_dim": 128,
        "coreset_ratio": 0.01,
        "index": "flat",
    },
    "stride16_layer128_proj128_coreset1_flat": {
        "grid_stage": "blocks.4",
        "layer_dim": 128,
        "projection_dim": 128,
        "coreset_ratio": 0.01,
        "index": "flat",
    },
    "b45_coreset1_flat": {
        "stages": ["blocks.4", "blocks.5"],
        "coreset_ratio": 0.01,
        "index": "flat",
    },
    # A stride-32 grid: blocks.4 area-averaged onto blocks.5's grid, 4x fewer patches.
    **{
        f"b45_stride32{'_proj128' if projected else ''}_coreset{round(100 * ratio)}_flat": {
            "stages": ["blocks.4", "blocks.5"],
            "grid_stage": "blocks.5",
            **({"projection_dim": 128} if projected else {}),
            "coreset_ratio": ratio,
            "index": "flat",
        }
        for projected, ratios in ((False, (0.1, 0.01, 0.15, 0.2, 0.25)), (True, (0.2, 0.25)))
        for ratio in ratios
    },
    # All three stages on the stride-32 grid (blocks.2 and blocks.4 area-averaged onto it).
    "stride32_coreset10_flat": {"grid_stage": "blocks.5", "coreset_ratio": 0.1, "index": "flat"},
    "stride32_coreset25_flat": {"grid_stage": "blocks.5", "coreset_ratio": 0.25, "index": "flat"},
}


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def evaluate_setting(params, train, test, labels, ground_truth, input_size, threads, self_score):
    """Fit, score the test set, optionally self-score the training set; metrics and seconds."""
    detector = PatchCoreDetector(n_jobs=threads, random_state=0, **params)
    _, fit_s = timed(detector.fit, train)
    (scores, maps), score_s = timed(detector.score, test)
    row = {"fit_s": fit_s, "score_s": score_s, "image_auroc": image_auroc(labels, scores)}
    if ground_truth is not None:
        resized = [
            resize_maps(m[None], shape, scale_sigma(SMOOTHING_SIGMA, input_size, shape))[0]
            for m, shape in zip(maps, ground_truth.shapes, strict=True)
        ]
        row["au_pro"] = ground_truth.evaluate(resized)["au_pro"]
    if self_score:
        # Leave-one-image-out self-scoring of the training set, as SROC refinement does.
        detector.set_params(exclude_self=True)
        _, row["self_score_s"] = timed(detector.score, train)
    row["memory_patches"] = int(detector.memory_bank_.shape[0])
    return row


def split_features(features, metadata, train_ids, test_ids):
    position = pd.Series(np.arange(len(metadata)), index=metadata["image_id"])
    train_rows = position[list(train_ids)].to_numpy()
    test_rows = position[list(test_ids)].to_numpy()
    return (
        {s: a[train_rows] for s, a in features.items()},
        {s: a[test_rows] for s, a in features.items()},
    )


def backbone_config():
    import yaml

    from sroc.backbones import BackboneConfig

    section = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["backbone"]
    return BackboneConfig(**{k: v for k, v in section.items() if k != "threads"})


def cached(index, path: Path, config) -> tuple[dict, pd.DataFrame]:
    from sroc.embeddings import build_cache
    from sroc.feature_cache import load_features

    if not path.exists():
        build_cache(index, path, config, threads=2, progress=False)
    return load_features(path)


def piped_cells(data: Path, scratch: Path, categories):
    from sroc.datasets.layout import image_size, index_category

    config = backbone_config()
    for category in categories:
        index = index_category(data / "piped", category)
        features, metadata = cached(index, scratch / f"piped-{category}-{config.tag()}.h5", config)
        train_ids = metadata.loc[metadata["origin"] == "train", "image_id"]
        test = metadata[metadata["origin"] == "test"].reset_index(drop=True)
        train, test_features = split_features(features, metadata, train_ids, test["image_id"])
        ground_truth = PixelGroundTruth.from_mask_paths(
            test["mask_path"].tolist(), [image_size(path) for path in test["path"]]
        )
        yield category, train, test_features, test["label"].to_numpy(), ground_truth


def elpv_cell(scratch: Path):
    import yaml

    from sroc.datasets import prepare_elpv
    from sroc.datasets.layout import index_category
    from sroc.splits import make_split, test_set, training_set

    config = backbone_config()
    elpv = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["dataset"]["elpv"]
    root = scratch / "elpv"
    if not root.exists():
        prepare_elpv(
            root,
            elpv["good_probabilities"],
            elpv["defective_probabilities"],
            elpv["test_good_every"],
        )
    index = index_category(root, "mono", require_masks=False)
    features, metadata = cached(index, scratch / f"elpv-mono-{config.tag()}.h5", config)
    manifest = make_split(index, seed=0)
    train = training_set(manifest, POLLUTION_RATIO)
    test = test_set(manifest)
    train_features, test_features = split_features(
        features, metadata, train["image_id"], test["image_id"]
    )
    return train_features, test_features, test["label"].to_numpy()


def synthetic_cell(seed: int):
    """Tiny features with the default backbone's stage names, labels and masks (--quick)."""
    rng = np.random.default_rng(seed)
    shapes = {"blocks.2": (6, 8, 8), "blocks.4": (8, 4, 4), "blocks.5": (10, 2, 2)}

    def features(n, shift):
        out = {}
        for name, (c, h, w) in shapes.items():
            maps = rng.normal(size=(n, c, h, w)).astype(np.float32)
            maps[:, :, : h // 2, : w // 2] += shift[:, None, None, None]
            out[name] = maps
        return out

    labels = np.array([0] * 6 + [1] * 6)
    train = features(20, np.zeros(20, dtype=np.float32))
    test = features(12, 3.0 * labels.astype(np.float32))
    masks = [np.zeros((32, 32), dtype=bool) for _ in labels]
    for mask, label in zip(masks, labels, strict=True):
        mask[:16, :16] = bool(label)
    return train, test, labels, PixelGroundTruth(masks)


def quick_settings() -> dict[str, dict]:
    """The settings scaled to tiny inputs: 1 % of 1,280 patches is below 5 neighbours."""
    scaled = {}
    for name, params in SETTINGS.items():
        params = dict(params)
        if params.get("coreset_ratio") == 0.01:
            params["coreset_ratio"] = 0.05
        if "projection_dim" in params:
            params["projection_dim"] = 8
        if "layer_dim" in params:
            params["layer_dim"] = 8
        scaled[name] = params
    return scaled


def summary(rows: list[dict], columns) -> pd.DataFrame:
    table = pd.DataFrame(rows).groupby("setting", sort=False)[columns].mean()
    if "paper" not in table.index:
        return table
    paper = table.loc["paper"]
    table["d_auroc_pts"] = 100 * (table["image_auroc"] - paper["image_auroc"])
    for column in ("fit_s", "total_s"):
        if column in table:
            table[f"{column}_vs_paper"] = table[column] / paper[column]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/sroc-patchcore-settings"))
    parser.add_argument("--datasets", nargs="+", default=["piped", "elpv"])
    parser.add_argument("--categories", nargs="*", default=None, help="piped categories")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--elpv-settings", nargs="+", default=None, help="settings run on elpv (default: all)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    pd.set_option("display.width", 200)

    if args.quick:
        settings = quick_settings()
        rows = []
        for seed in (0, 1):
            train, test, labels, ground_truth = synthetic_cell(seed)
            for name, params in settings.items():
                row = evaluate_setting(params, train, test, labels, ground_truth, 32, 1, True)
                rows.append({"setting": name, **row})
        table = summary(rows, ["image_auroc", "au_pro", "fit_s", "score_s", "self_score_s"])
        print(table.round(3).to_string())
        print(f"quick_min_auroc: {table['image_auroc'].min():.3f}")
        return

    args.scratch.mkdir(parents=True, exist_ok=True)
    input_size = backbone_config().input_size
    if "piped" in args.datasets:
        categories = args.categories or sorted(
            p.name for p in (args.data / "piped").iterdir() if p.is_dir()
        )
        rows = []
        for category, train, test, labels, ground_truth in piped_cells(
            args.data, args.scratch, categories
        ):
            for name in args.settings:
                row = evaluate_setting(
                    SETTINGS[name],
                    train,
                    test,
                    labels,
                    ground_truth,
                    input_size,
                    args.threads,
                    False,
                )
                rows.append({"setting": name, "category": category, **row})
                print(category, name, {k: round(v, 3) for k, v in row.items()}, flush=True)
        table = summary(rows, ["image_auroc", "au_pro", "fit_s", "score_s", "memory_patches"])
        print(f"\npiped, mean over {len(categories)} categories, {args.threads} threads")
        print(table.round(3).to_string(), flush=True)
    if "elpv" in args.datasets:
        train, test, labels = elpv_cell(args.scratch)
        rows = []
        for name in args.elpv_settings or args.settings:
            row = evaluate_setting(
                SETTINGS[name], train, test, labels, None, input_size, args.threads, True
            )
            row["total_s"] = row["fit_s"] + row["score_s"] + row["self_score_s"]
            rows.append({"setting": name, **row})
            print("elpv", name, {k: round(v, 3) for k, v in row.items()}, flush=True)
        columns = ["image_auroc", "fit_s", "score_s", "self_score_s", "total_s", "memory_patches"]
        table = summary(rows, columns)
        print(f"\nelpv mono, seed 0, {POLLUTION_RATIO:.0%} pollution, {args.threads} threads")
        print(table.round(3).to_string(), flush=True)


if __name__ == "__main__":
    main()
