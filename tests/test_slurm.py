"""The workflow on a live SLURM cluster gives the results of a local run.

CI brings up a single-node cluster (../shared/tools/local_slurm.sh up); without one the test is
skipped with the reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from workflow_runs import REPO, assert_same_results, snakemake, tiny_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def cluster_problem() -> str | None:
    """Why no SLURM job can run here, or None when a node is ready."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client (sinfo, sbatch): bring a cluster up with local_slurm.sh up"
    try:
        states = subprocess.run(
            ["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    ready = {"idle", "mixed", "allocated"} & set(states.stdout.split())
    if states.returncode != 0 or not ready:
        return f"no SLURM node is ready: {(states.stderr or states.stdout).strip()!r}"
    return None


def test_slurm_run_gives_the_results_of_a_local_run(tmp_path):
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)
    config = tiny_config()
    profiles = REPO / "profiles"
    on_slurm = snakemake(
        tmp_path / "slurm", config,
        "--profile", str(profiles / "slurm"), "--profile", str(profiles / "slurm-local"),
        timeout=900,
    )  # fmt: skip
    snakemake(tmp_path / "local", config, "--cores", "2")
    log = on_slurm.stdout + on_slurm.stderr
    submissions = re.findall(r"has been submitted with SLURM jobid", log)
    finished = re.findall(r"Finished jobid: \d+ \(Rule: (?!all\))", log)
    assert submissions, "no job went to SLURM"
    # Grouping: the split, detector and evaluation jobs of a seed share one submission.
    assert len(submissions) < len(finished), (len(submissions), len(finished))
    assert assert_same_results(tmp_path / "slurm", tmp_path / "local") > 5
