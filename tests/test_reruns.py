"""Incremental re-runs, faults and determinism of the workflow, on a tiny synthetic grid.

The re-run tests read the jobs a dry run plans after a config edit: only the jobs whose inputs or
params changed, and what aggregates them, may run again.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from workflow_runs import (
    assert_same_file,
    assert_same_results,
    detector_entry,
    planned_jobs,
    snakemake,
    snakemake_command,
    tiny_config,
)

pytestmark = pytest.mark.slow

# Jobs that make the data, the index, the splits and their summary: no detector, backbone or
# refinement setting reaches them.
DATA_RULES = {
    "make_synthetic", "prepare_elpv", "download_mvtec", "extract_mvtec", "index_category",
    "split", "split_summary",
}  # fmt: skip
UPSTREAM_FOLDERS = {"data", "index", "splits", "embeddings", "logs"}


def job_set(jobs):
    return {(rule, tuple(sorted(wildcards.items()))) for rule, wildcards in jobs}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny grid run to completion on 2 cores; tests plan on it or on a copy of it."""
    workdir = tmp_path_factory.mktemp("reruns") / "run"
    config = tiny_config()
    snakemake(workdir, config, "--cores", "2")
    return workdir, config


def copy_run(workdir: Path, destination: Path) -> Path:
    """A copy of a finished run, with Snakemake's records and the files' mtimes."""
    shutil.copytree(workdir, destination, symlinks=True)
    return destination


def test_nothing_changed_plans_nothing(finished):
    workdir, config = finished
    assert planned_jobs(workdir, config) == []


def test_a_detector_parameter_reruns_that_detector_and_the_aggregation_only(finished):
    workdir, config = finished
    changed = copy.deepcopy(config)
    detector_entry(changed, "knn")["params"]["n_neighbors"] = 2
    plan = planned_jobs(workdir, changed)
    everything = planned_jobs(workdir, changed, "--forceall")
    detector_rules = {rule for rule, wildcards in everything if "detector" in wildcards}
    # Every detector job and all that depends on one: the aggregation is the rest of it.
    downstream = planned_jobs(workdir, changed, "--forcerun", *detector_rules)
    assert {w.get("detector") for _, w in plan} <= {"knn", None}
    knn_jobs = [job for job in everything if job[1].get("detector") == "knn"]
    assert job_set(job for job in plan if "detector" in job[1]) == job_set(knn_jobs)
    aggregation = [job for job in downstream if "detector" not in job[1]]
    assert job_set(job for job in plan if "detector" not in job[1]) == job_set(aggregation)
    assert aggregation and knn_jobs
    assert not {rule for rule, _ in plan} & (DATA_RULES | {"embed"})


def test_a_new_backbone_reruns_the_embeddings_and_everything_downstream(finished):
    workdir, config = finished
    changed = copy.deepcopy(config)
    changed["backbone"]["input_size"] = 128
    plan = planned_jobs(workdir, changed)
    downstream = planned_jobs(workdir, changed, "--forcerun", "embed")
    assert job_set(plan) == job_set(downstream)
    assert "embed" in {rule for rule, _ in plan} and not {rule for rule, _ in plan} & DATA_RULES


def test_a_new_refinement_ratio_adds_its_cells_and_the_aggregation_only(finished):
    workdir, config = finished
    changed = copy.deepcopy(config)
    new_ratio = 0.1
    assert new_ratio not in changed["refinement"]["ratios"]
    changed["refinement"]["ratios"] = sorted(changed["refinement"]["ratios"] + [new_ratio])
    plan = planned_jobs(workdir, changed)
    cells = [job for job in plan if "detector" in job[1]]
    assert cells and all(float(w["ratio"]) == new_ratio for _, w in cells)
    assert {rule for rule, _ in cells} == {"refine"}
    n_detectors = len(changed["detectors"])
    n_categories = len(changed["dataset"]["categories"])
    assert len(cells) == n_detectors * n_categories * len(changed["pollution"]["seeds"])
    others = {rule for rule, w in plan if "detector" not in w}
    assert "collect_runs" in others and not others & (DATA_RULES | {"embed"})


def test_a_killed_detector_job_is_rerun_and_nothing_partial_is_kept(finished, tmp_path):
    workdir, config = finished
    run = copy_run(workdir, tmp_path / "run")
    everything = planned_jobs(run, config, "--forceall")
    detector_rules = sorted({rule for rule, wildcards in everything if "detector" in wildcards})
    # Keep the data, splits and embeddings; drop the detectors' outputs and all that follows.
    dataset = run / "results" / config["dataset"]["name"]
    for path in dataset.iterdir():
        if path.is_dir() and path.name not in UPSTREAM_FOLDERS:
            shutil.rmtree(path)
        elif path.is_file():
            path.unlink()
    config_path = run / "config.yaml"
    process = subprocess.Popen(
        snakemake_command(run, config_path, "--cores", "1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    headers = tuple(f"{kind}rule {rule}:" for rule in detector_rules for kind in ("", "local"))
    started = None
    for line in process.stdout:
        if started is None and line.startswith(headers):
            started = line
        if started and line.strip().startswith("output:"):
            outputs = [Path(run, p) for p in line.split(":", 1)[1].strip().split(", ")]
            break
    assert started, "no detector job started"
    time.sleep(0.5)  # the job is importing or fitting: far from done
    os.killpg(process.pid, signal.SIGKILL)  # the whole job, as a node failure would
    process.wait()
    assert not any(path.exists() for path in outputs), "a killed job left its output in place"
    snakemake(run, config, "--unlock", "--cores", "1")
    resumed = snakemake(run, config, "--cores", "2")  # results do not depend on the cores
    assert "Finished jobid" in resumed.stderr
    assert all(path.exists() for path in outputs)
    assert_same_results(run, workdir)


def test_a_failing_job_names_its_cause_and_keep_going_finishes_the_rest(finished, tmp_path):
    workdir, config = finished
    run = copy_run(workdir, tmp_path / "run")
    dataset = run / "results" / config["dataset"]["name"]
    shutil.rmtree(dataset / "scores" / "mahalanobis")  # independent work left to do
    broken = copy.deepcopy(config)
    detector_entry(broken, "knn")["params"]["n_neighbors"] = 1000  # more than the training set
    result = snakemake(run, broken, "--cores", "2", "--keep-going", check=False)
    assert result.returncode != 0
    causes = [
        log for log in (dataset / "logs").rglob("*.log")
        if "knn" in log.parts and "n_neighbors=1000 must be in" in log.read_text()
    ]  # fmt: skip
    assert causes, "no knn log names the cause"
    reference = workdir / "results" / config["dataset"]["name"] / "scores" / "mahalanobis"
    expected = sorted(path.relative_to(reference) for path in reference.rglob("*.h5"))
    for name in expected:
        assert_same_file(dataset / "scores" / "mahalanobis" / name, reference / name, str(name))
    assert expected


def test_one_core_and_two_cores_give_identical_results(finished, tmp_path):
    workdir, config = finished
    snakemake(tmp_path / "one_core", config, "--cores", "1")
    assert assert_same_results(tmp_path / "one_core", workdir) > 5


def test_refine_jobs_adopt_staged_refits_and_compute_the_same_without(finished, tmp_path):
    """The tiny grid's refits are cheap: its rank jobs stage them and every refine job adopts
    its own, leaving nothing staged. A refine job that finds nothing staged, or staged files
    whose key is not its own, computes the same outputs itself."""
    workdir, config = finished
    dataset = workdir / "results" / config["dataset"]["name"]
    refine_logs = sorted((dataset / "logs" / "refine").rglob("*.log"))
    assert refine_logs and all("adopted the refits" in log.read_text() for log in refine_logs)
    assert not [path for path in (dataset / "staged").rglob("*") if path.is_file()]
    assert not list((dataset / "staged").glob("*/*/*"))  # each cell's folder removed

    run = copy_run(workdir, tmp_path / "run")
    cell = Path("knn", config["dataset"]["categories"][0], "seed0")
    results = run / "results" / config["dataset"]["name"]
    for kind, suffix in (("scores", "h5"), ("metrics", "csv")):
        (results / kind / cell / f"refined-r0.2.{suffix}").unlink()
    # Stale staging: another ratio's files under this ratio's name, with a key of its own.
    staged = results / "staged" / cell
    staged.mkdir(parents=True, exist_ok=True)
    shutil.copy(results / "scores" / cell / "ranked.h5", staged / "refined-r0.2.h5")
    shutil.copy(results / "metrics" / cell / "ranked.csv", staged / "refined-r0.2.csv")
    (staged / "refined-r0.2.key.json").write_text('{"params": "another job"}')
    plan = planned_jobs(run, config)
    assert {rule for rule, w in plan if "detector" in w} == {"refine"}
    snakemake(run, config, "--cores", "1")
    log = results / "logs" / "refine" / cell.parent / "seed0-r0.2.log"
    assert "adopted" not in log.read_text()
    assert not [path for path in staged.rglob("*") if path.is_file()]  # stale files removed
    assert_same_results(run, workdir)
