"""Adding a strategy or a detector touches one file: this one registers both, and the workflow,
the report and benchmarks/fit_cost.py take them from here through the config's ``plugins:``.

The module is also the plugin file: the Snakemake processes import it by path (sroc.plugins), so
its top level holds only the registrations and what they need.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sroc import refinement, strategies
from sroc.detectors.base import BaseDetector, gap_embedding

THIS_FILE = Path(__file__).resolve()
TOY_STATE_MB = 1234.0  # the toy detector's memory estimate, recognisable in the job's resources


# ---------------------------------------------------------------------------------------------
# The toy strategy: random removal in reverse


def reverse_random_ranking(inputs: strategies.RankingInputs) -> refinement.Ranking:
    """The ``random`` ranking of the same cell, read backwards."""
    forward = refinement.random_ranking(inputs.image_ids, inputs.rng_seed)
    return refinement.Ranking("reverse_random", -forward.scores, forward.order[::-1].copy(), 0,
                              0.0, 0.0)  # fmt: skip


if "reverse_random" not in strategies.STRATEGIES:
    strategies.register(
        strategies.Strategy(
            name="reverse_random",
            label="random, reversed",
            kind="ranked",
            function=reverse_random_ranking,
            cost=lambda model: 0.0,
            ranked_by=lambda inputs: "none",
        )
    )


# ---------------------------------------------------------------------------------------------
# The toy detector: a Gaussian with a diagonal covariance on globally pooled features


class DiagonalGaussianDetector(BaseDetector, name="toy_diagonal", label="Diagonal Gaussian"):
    """Image score: the squared standardised distance of the pooled features to the training
    mean, per channel variance (plus ``reg``); the map repeats the image score on the grid."""

    runtime_seconds_per_image = 0.001

    def __init__(self, reg: float = 1e-3, stages=None, n_jobs=None, random_state=None):
        self.reg = reg
        self.stages = stages
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _fit(self, features):
        pooled = gap_embedding(features, self.stages_)
        self.mean_ = pooled.mean(axis=0)
        self.variance_ = pooled.var(axis=0) + self.reg

    def _score(self, features, maps):
        pooled = gap_embedding(features, self.stages_)
        scores = (((pooled - self.mean_) ** 2) / self.variance_).sum(axis=1)
        if not maps:
            return scores, None
        grid = np.broadcast_to(scores[:, None, None], (len(scores), *self.grid_hw_))
        return scores, grid.astype(np.float32)

    def _estimate_state_mb(self, n_train, n_test, shapes):
        return TOY_STATE_MB

    def fit_flops(self, shapes, n_fit):
        return 3.0 * n_fit * sum(math.prod(chw) for chw in self.used_shapes(shapes).values())

    def score_flops(self, shapes, n_fit, n_score, maps):
        return 3.0 * n_score * sum(math.prod(chw) for chw in self.used_shapes(shapes).values())


# ---------------------------------------------------------------------------------------------
# Tests


def _toy_config(tmp_path: Path) -> dict:
    from workflow_runs import tiny_config

    config = tiny_config()
    config["plugins"] = [str(THIS_FILE)]
    config["detectors"] = [
        {"name": "knn", "type": "knn", "params": {"n_neighbors": 3}},
        {"name": "toy", "type": "toy_diagonal", "params": {"reg": 0.01}},
    ]
    config["refinement"]["strategies"] = ["sroc", "random", "reverse_random", "oracle",
                                          "sroc_loo"]  # fmt: skip
    return config


def test_the_toy_strategy_and_detector_are_registered_from_this_file():
    from sroc.detectors import make_detector

    assert strategies.get("reverse_random").label == "random, reversed"
    assert strategies.strategies_for("toy_diagonal", ["sroc", "reverse_random", "sroc_loo"]) == [
        "sroc",
        "reverse_random",
    ]  # the toy has no leave-one-out scoring: sroc_loo is left out for it
    detector = make_detector("toy_diagonal", reg=0.5)
    assert detector.get_params()["reg"] == 0.5


@pytest.mark.slow
def test_the_grid_runs_a_strategy_and_a_detector_registered_in_a_plugin(tmp_path):
    from workflow_runs import snakemake

    from sroc.runs import read_rankings, read_score_file_runs

    config = _toy_config(tmp_path)
    result = snakemake(tmp_path, config, "--cores", "2")
    results = tmp_path / "results" / "synthetic"
    runs = pd.read_parquet(results / "runs.parquet")

    # Both detectors ran the toy strategy at every refinement ratio; the toy detector has no
    # leave-one-out scoring, so sroc_loo ran for KNN only.
    reverse = runs[runs["strategy"] == "reverse_random"]
    assert sorted(reverse.groupby("detector")["refinement_ratio"].apply(sorted).tolist()) == [
        [0.0, 0.2],
        [0.0, 0.2],
    ]
    assert set(runs.loc[runs["strategy"] == "sroc_loo", "detector"]) == {"knn"}
    assert set(runs["detector_type"]) == {"knn", "toy_diagonal"}

    # The toy ranking removes the last images of the random order, and the run refits on the
    # rest: check its removed images against the stored random ranking.
    category = config["dataset"]["categories"][0]
    for detector in ("knn", "toy"):
        stored = read_rankings(results / "scores" / detector / category / "seed0" / "ranked.h5")
        random_order = stored["random"].order
        n = len(random_order)
        expected_removed = set(stored["random"].image_ids[random_order[::-1][: round(0.2 * n)]])
        row = reverse[(reverse["detector"] == detector) & (reverse["refinement_ratio"] == 0.2)]
        assert int(row["n_removed"].iloc[0]) == len(expected_removed)
        refined = read_score_file_runs(
            results / "scores" / detector / category / "seed0" / "refined-r0.2.h5"
        )
        (run,) = [r for r in refined if r.strategy == "reverse_random"]
        assert set(run.removed_ids) == expected_removed

    # The report takes the label from the registry: the recovery table and the strategy figure.
    recovery = pd.read_csv(results / "tables" / "recovery.csv")
    assert "reverse_random" in set(recovery["strategy"])
    assert "random, reversed" in (results / "tables" / "recovery.md").read_text()
    assert (results / "figures" / "figure5_strategies.png").stat().st_size > 0
    curves_log = (results / "logs" / "report" / "figure5_strategies.log").read_text()
    assert "Traceback" not in curves_log

    # The toy detector's jobs were sized from its own memory estimate.
    log = result.stdout + result.stderr
    toy_jobs = [
        block for block in log.split("\n\n") if "detector=toy" in block and "rule rank" in block
    ]
    mem = [int(part.split("=")[1]) for block in toy_jobs for part in block.replace(",", " ").split()
           if part.startswith("mem_mb=")]  # fmt: skip
    assert mem and min(mem) >= TOY_STATE_MB


def test_fit_cost_projects_a_plugin_detector_and_strategy(tmp_path):
    config = yaml.safe_load((THIS_FILE.parents[1] / "config" / "config.yaml").read_text())
    config["plugins"] = [str(THIS_FILE)]
    config["detectors"] = [{"name": "toy", "type": "toy_diagonal"}]
    config["refinement"]["strategies"] = ["sroc", "reverse_random", "oracle"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    benchmark = THIS_FILE.parents[1] / "benchmarks" / "fit_cost.py"
    result = subprocess.run(
        [sys.executable, str(benchmark), "--quick", "--repeats", "1", "--config", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    row = next(line for line in result.stdout.splitlines() if line.startswith("| toy "))
    assert "maps=False" in row
    minutes = float(result.stdout.strip().splitlines()[-1].split(":")[1])
    assert minutes > 0
