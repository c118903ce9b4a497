"""The benchmarks in benchmarks/: every quick mode runs and prints its key figure, the matmul
limit is measured without the OpenBLAS throttling variables, and fit_cost's grid projection
counts the fits the grid runs."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import fit_cost  # noqa: E402
from matmul_limit import THROTTLING_VARIABLES, measure_limit  # noqa: E402

from sroc.detectors import make_detector  # noqa: E402
from sroc.splits import round_half_up  # noqa: E402


def run_quick(script: str) -> str:
    """Run ``benchmarks/<script> --quick`` in a fresh process; return its stdout."""
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, f"{script} --quick failed:\n{completed.stderr[-4000:]}"
    return completed.stdout


def last_value(stdout: str, key: str) -> float:
    last = stdout.strip().splitlines()[-1]
    match = re.fullmatch(rf"{re.escape(key)}: (\S+)", last)
    assert match, f"last line {last!r} is not '{key}: <number>'"
    value = float(match.group(1))
    assert math.isfinite(value), last
    return value


@pytest.mark.parametrize(
    ("script", "key", "floor"),
    [
        ("metrics.py", "au_pro_speedup", 0),
        ("matmul_limit.py", "matmul_limit_gflops", 0),
        ("fit_cost.py", "default_grid_minutes", 0),
        # The quick data's anomalies are strong: every PatchCore setting must separate them.
        ("patchcore_settings.py", "quick_min_auroc", 0.9),
        ("patchcore_scoring.py", "scoring_fraction_of_limit", 0),
        pytest.param("detectors.py", "min_ivf_recall", 0, marks=pytest.mark.slow),
        pytest.param("embed_throughput.py", "throughput_ratio", 0, marks=pytest.mark.slow),
    ],
)
def test_quick_mode_prints_its_key_figure(script, key, floor):
    assert last_value(run_quick(script), key) > floor


def test_every_benchmark_has_a_quick_mode_test():
    tested = {
        "metrics.py",
        "matmul_limit.py",
        "fit_cost.py",
        "patchcore_settings.py",
        "patchcore_scoring.py",
        "detectors.py",
        "embed_throughput.py",
    }
    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    assert scripts == tested, f"add the quick mode of {sorted(scripts - tested)} to this test"


def test_matmul_limit_runs_without_the_throttling_variables(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "1048576")
    limit = measure_limit(threads=1, size=256, repeats=1)
    assert limit.environment == {name: None for name in THROTTLING_VARIABLES}
    assert limit.gflops > 0 and limit.threads == 1
    assert limit.blas["internal_api"] in ("openblas", "mkl", "blis", "unknown")
    # The variables stay set in this process.
    assert os.environ["OPENBLAS_CORETYPE"] == "Haswell"


def test_detector_specs_read_the_config_list_with_one_thread_by_default():
    config = {
        "detectors": [
            {"name": "knn3", "type": "knn", "params": {"n_neighbors": 3}},
            {"name": "padim", "type": "padim", "params": {"n_features": 10}, "threads": 2},
        ]
    }
    assert [(s.name, s.type, s.params, s.n_jobs) for s in fit_cost.detector_specs(config)] == [
        ("knn3", "knn", {"n_neighbors": 3}, 1),
        ("padim", "padim", {"n_features": 10}, 2),
    ]


def test_flop_counts_match_torch_flop_counter_for_the_matmul_detectors():
    """PaDiM's fit is one (d x n)(n x d) covariance product per location; KNN's image scoring is
    one (m x D)(D x n) distance product: FlopCounterMode counts the same products."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    shapes = {"a": (6, 4, 4), "b": (10, 2, 2)}
    locations, channels, n, m, d = 16, 16, 30, 7, 5
    padim = make_detector("padim", n_features=d)
    with FlopCounterMode(display=False) as counter:
        for _ in range(locations):
            torch.zeros(d, n) @ torch.zeros(n, d)
    covariance_flops = counter.get_total_flops()
    expected = covariance_flops + locations * d**3 / 3  # plus a Cholesky factor per location
    assert padim.fit_flops(shapes, n) == pytest.approx(expected)

    knn = make_detector("knn")
    with FlopCounterMode(display=False) as counter:
        torch.zeros(m, channels) @ torch.zeros(channels, n)
    pooling = m * sum(math.prod(chw) for chw in shapes.values())
    flops = knn.score_flops(shapes, n, m, maps=False)
    assert flops == pytest.approx(counter.get_total_flops() + pooling)


def test_grid_projection_counts_every_fit_of_a_cell():
    """With fits costing n_fit / N seconds and free scoring, a cell costs the sum of its fit
    sizes over N, enumerated here from the grid's definition."""
    config = {
        "pollution": {"ratios": [0.0, 0.1, 0.2]},
        "refinement": {
            "pollution_ratio": 0.2,
            "ratios": [0.0, 0.25, 0.5],
            "strategies": [
                "sroc", "random", "cross_validation", "stoc", "oracle", "by_refiner",
                "sroc_loo", "iterative_sroc", "consensus", "sroc_auto",
                "patch_sroc",  # PatchCore only: no fit for this KNN cell
            ],
            "n_folds": 4,
            "iterative_steps": 3,
            "refiner": "mahalanobis",
            "consensus": ["knn", "padim"],
        },
    }  # fmt: skip
    rng = np.random.default_rng(0)
    n, n_test, n_polluted = 40, 10, 8
    shapes = {"a": (6, 4, 4)}
    cell = fit_cost.MeasuredCell(
        "c",
        {"a": rng.random((n, *shapes["a"]), dtype=np.float32)},
        {"a": rng.random((n_test, *shapes["a"]), dtype=np.float32)},
        n_polluted,
        has_masks=False,
    )
    spec = fit_cost.DetectorSpec("knn", name="knn")
    detector = make_detector("knn").fit(cell.train)
    full_fit = detector.fit_flops(shapes, n)
    tiny = 1e-12  # scoring: nearly free, but a nonzero measured time to scale from
    self_s = 0.5
    cost = fit_cost.Cost(1.0, tiny, tiny, self_s, "", False, full_fit, 1.0, 1.0, 1.0)
    members = {m: make_detector(m).fit(cell.train) for m in ("knn", "padim", "mahalanobis")}

    def other(fit_s, self_s, name):  # a measured cost whose FLOPs are the detector's at n
        flops = members[name].fit_flops(shapes, n)
        return fit_cost.Cost(fit_s, 0, 0, self_s, "", False, flops, 1.0, 1.0, 1.0), members[name]

    others = {
        "refiner": other(2.0, 3.0, "mahalanobis"),
        "knn": other(4.0, 1.0, "knn"),
        "padim": other(5.0, 1.0, "padim"),
    }
    refinement = fit_cost.refinement_settings(config)
    model = fit_cost.MeasuredCost(
        detector,
        cost,
        cell,
        refinement,
        fit_cost.refiner_spec(config),
        fit_cost.consensus_specs(config),
        others,
    )
    seconds, jobs = fit_cost.cell_seconds(spec, model, config)
    fit_sizes = [n] * 3  # robustness curve
    fit_sizes += [n - n / 4] * 4  # cross-validation
    fit_sizes += [n / 4] * 4  # STOC
    fit_sizes += [n - n_polluted]  # oracle
    fit_sizes += [n]  # sroc_loo's leave-one-out model
    fit_sizes += [n, n - n_polluted]  # sroc_auto: its leave-one-out model, then its refit
    for ratio in (0.25, 0.5):
        fit_sizes += [n] * 3  # iterative_sroc ranks for each ratio: one fit per step
        # One refit per strategy with a ratio curve: all but the oracle and sroc_auto.
        fit_sizes += [round_half_up((1 - ratio) * n)] * 8
    self_scores = 1 + 1 + 3 * 2 + 1  # sroc, sroc_loo, iterative_sroc's steps per ratio, sroc_auto
    others_s = (2.0 + 3.0) + (4.0 + 1.0) + (5.0 + 1.0)  # the refiner, the consensus members
    expected = sum(fit_sizes) / n + self_scores * self_s + others_s
    assert seconds == pytest.approx(expected, rel=1e-6)
    assert jobs == 3  # one rank job and one refine job per ratio > 0


def test_image_only_scoring_is_detected_and_other_type_errors_propagate():
    class WithoutMapsArgument:
        def score(self, features):
            return np.zeros(2), np.zeros((2, 3, 3), np.float32)

    class WithMapsArgument:
        def score(self, features, maps=True):
            return np.zeros(2), None if not maps else np.zeros((2, 3, 3), np.float32)

    class Broken:
        def score(self, features, maps=True):
            raise TypeError("unsupported operand")

    (_, maps), supported = fit_cost._score(WithoutMapsArgument(), {}, False)
    assert not supported and maps is not None
    (_, maps), supported = fit_cost._score(WithMapsArgument(), {}, False)
    assert supported and maps is None
    with pytest.raises(TypeError, match="unsupported operand"):
        fit_cost._score(Broken(), {}, False)
