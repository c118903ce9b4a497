"""The Snakemake workflow: config validation, DAG construction, an end-to-end run, re-runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

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
        if in_table and len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
        elif in_table and parts and parts[0] == "total":
            break
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
    assert "download_mvtec" not in jobs and "extract_mvtec" not in jobs
    assert elapsed < 30, f"the dry run took {elapsed:.1f} s"
