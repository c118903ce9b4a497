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


# (script, the key of its quick mode's last line, a floor the value must exceed)
QUICK_MODES = [
    ("metrics.py", "au_pro_speedup", 0),
    ("matmul_limit.py", "matmul_limit_gflops", 0),
    ("fit_cost.py", "default_grid_minutes", 0),
    # The quick data's anomalies are strong: every PatchCore setting must separate them.
    ("patchcore_settings.py", "quick_min_auroc", 0.9),
    ("patchcore_scoring.py", "scoring_fraction_of_limit", 0),
    # A tight group of defects that hides itself from KNN fitted on all: a sparse member
    # (f = 0.1) leaves most of the group out, so the out-of-bag ranking finds it.
    ("ensemble_fraction.py", "best_f1", 0.5),
    pytest.param("detectors.py", "min_ivf_recall", 0, marks=pytest.mark.slow),
    pytest.param("embed_throughput.py", "throughput_ratio", 0, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("script", "key", "floor"), QUICK_MODES)
def test_quick_mode_prints_its_key_figure(script, key, floor):
    assert last_value(run_quick(script), key) > floor


def test_every_benchmark_has_a_quick_mode_test():
    tested = {mode.values[0] if hasattr(mode, "values") else mode[0] for mode in QUICK_MODES}
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


def test_grid_projection_counts_every_fit_of_a_cell(monkeypatch):
    """With fits costing n_fit / N seconds and free scoring, a cell costs the sum of its fit
    sizes over N, enumerated here from the grid's definition; the rank job stages the refits of
    the ratios, in order, while they fit its budget."""
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
    jobs = fit_cost.cell_seconds(spec, model, config)
    fit_sizes = [n] * 3  # robustness curve
    fit_sizes += [n - n / 4] * 4  # cross-validation
    fit_sizes += [n / 4] * 4  # STOC
    fit_sizes += [n - n_polluted]  # oracle
    fit_sizes += [n]  # sroc_loo's leave-one-out model
    fit_sizes += [n - n_polluted]  # sroc_auto: its refit (it cuts sroc_loo's ranking)
    self_scores = 1 + 1  # sroc, sroc_loo
    ratio_s = {}
    for ratio in (0.25, 0.5):
        # iterative_sroc ranks at every ratio (at most one fit per step), then one refit per
        # strategy with a ratio curve: all but the oracle and sroc_auto
        sizes = [n] * 3 + [round_half_up((1 - ratio) * n)] * 8
        ratio_s[ratio] = sum(sizes) / n + 3 * self_s
        fit_sizes += sizes
        self_scores += 3
    others_s = (2.0 + 3.0) + (4.0 + 1.0) + (5.0 + 1.0)  # the refiner, the consensus members
    expected = sum(fit_sizes) / n + self_scores * self_s + others_s
    assert jobs.seconds == pytest.approx(expected, rel=1e-6)
    # Both ratios' refits fit the budget: the rank job stages them for the refine jobs.
    assert sum(ratio_s.values()) <= fit_cost.STAGED_REFITS_SECONDS
    assert (jobs.loading_jobs, jobs.adopting_jobs) == (1, 2)
    # A budget for the first ratio only: the second ratio's refine job loads the cell itself.
    monkeypatch.setattr(fit_cost, "STAGED_REFITS_SECONDS", ratio_s[0.25] * 1.001)
    jobs = fit_cost.cell_seconds(spec, model, config)
    assert (jobs.loading_jobs, jobs.adopting_jobs) == (2, 1)
    assert jobs.seconds == pytest.approx(expected, rel=1e-6)


def _finished_run(root: Path, dataset: str = "elpv") -> Path:
    """A run's folder as the workflow leaves it, with what fit_cost.py --measured reads: two
    grid jobs in Snakemake's metadata (one output each, as Snakemake writes its records) and its
    log, runs.parquet (an r = 0 copy among its rows) and a score file with a ranking."""
    import base64
    import json

    import h5py
    import pandas as pd

    results = root / "results" / dataset
    metadata = root / ".snakemake" / "metadata"
    metadata.mkdir(parents=True)
    jobs = [
        ("rank", "scores/knn/c/seed0/ranked.h5", "logs/rank/knn/c/seed0.log", 100.0, 110.0),
        ("refine", "scores/knn/c/seed0/refined-r0.2.h5", "logs/refine/knn/c/seed0-r0.2.log",
         110.5, 111.0),
        ("embed", "embeddings/c/x.h5", "logs/embed/c.log", 0.0, 90.0),  # not a grid job
    ]  # fmt: skip
    for rule, output, log, start, end in jobs:
        key = f"results/{dataset}/{output}"
        record = {"rule": rule, "log": [f"results/{dataset}/{log}"], "starttime": start,
                  "endtime": end}  # fmt: skip
        name = base64.urlsafe_b64encode(key.encode()).decode()
        (metadata / name).write_text(json.dumps(record))
    (root / ".snakemake" / "log").mkdir()
    (root / ".snakemake" / "log" / "2026-01-01T000000.000000.snakemake.log").write_text(
        "Provided cores: 2\n"
    )
    results.mkdir(parents=True)
    pd.DataFrame(
        {
            "run": ["none/p=0.2", "sroc/r=0", "sroc/r=0.2"],
            "strategy": ["none", "sroc", "sroc"],
            "fit_seconds": [1.0, 1.0, 2.0],
            "score_seconds": [0.5, 0.5, 0.5],
        }
    ).to_parquet(results / "runs.parquet")
    (results / "logs" / "refine" / "knn" / "c").mkdir(parents=True)
    (results / "logs" / "refine" / "knn" / "c" / "seed0-r0.2.log").write_text(
        "2026-01-01 00:00:00,000 INFO refine: adopted the refits at r=0.2 that the rank job ...\n"
    )
    scores = results / "scores" / "knn" / "c" / "seed0"
    scores.mkdir(parents=True)
    with h5py.File(scores / "ranked.h5", "w") as file:
        file.create_group("rankings/sroc").attrs.update({"fit_seconds": 0.0, "score_seconds": 1.5})
    return results


def test_measured_run_reads_the_grid_jobs_and_what_they_recorded(tmp_path):
    measured = fit_cost.measure_run(_finished_run(tmp_path))
    assert sorted(measured.jobs["rule"]) == ["rank", "refine"]
    assert measured.source == "Snakemake metadata" and measured.cores == 2
    assert measured.jobs.set_index("rule")["adopted"].to_dict() == {"rank": False, "refine": True}
    assert measured.job_seconds == pytest.approx(10.0 + 0.5)
    assert measured.span_seconds == pytest.approx(11.0)
    assert measured.recorded_runs_s == pytest.approx(1.5 + 2.5)  # the r = 0 copy once
    assert measured.recorded_rankings_s == pytest.approx(1.5)


def test_measured_run_falls_back_on_snakemakes_log(tmp_path):
    """Without metadata, the job timings come from Snakemake's log, to the second."""
    results = _finished_run(tmp_path)
    for record in (tmp_path / ".snakemake" / "metadata").iterdir():
        record.unlink()
    (tmp_path / ".snakemake" / "log" / "2026-01-01T000000.000000.snakemake.log").write_text(
        "Provided cores: 2\n"
        "[Mon Dec  7 11:34:22 2026]\nlocalrule rank:\n    jobid: 3\n"
        "[Mon Dec  7 11:34:23 2026]\nlocalrule embed:\n    jobid: 4\n"
        "[Mon Dec  7 11:34:32 2026]\nFinished jobid: 3 (Rule: rank)\n"
        "[Mon Dec  7 11:34:33 2026]\nrule refine:\n    jobid: 5\n"
        "[Mon Dec  7 11:34:35 2026]\nFinished jobid: 5 (Rule: refine)\n"
        "Finished jobid: 4 (Rule: embed)\n"
    )
    measured = fit_cost.measure_run(results)
    assert measured.source.startswith("Snakemake logs")
    assert sorted(measured.jobs["rule"]) == ["rank", "refine"]
    assert measured.job_seconds == 10 + 2 and measured.span_seconds == 13


def test_quick_mode_prints_the_projected_and_the_measured_grid_side_by_side(tmp_path):
    _finished_run(tmp_path)  # config/config.yaml's dataset, elpv
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "fit_cost.py"), "--quick", "--measured",
         "--results", str(tmp_path / "results"), "--cores", "2"],
        cwd=REPO, env=environment, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    out = completed.stdout
    table = out[out.index("## projected and measured grid") :]
    assert "| grid jobs " in table and "1 rank, 1 refine (1 adopting staged refits)" in table
    row = next(line for line in table.splitlines() if line.startswith("| grid job-minutes"))
    projected, measured = (float(cell) for cell in row.strip("|").split("|")[1:3])
    assert projected > 0 and measured == pytest.approx(10.5 / 60, abs=0.01)
    assert re.search(r"grid minutes on 2 cores .*\| 0\.18 \(first grid job", table)
    assert "outside recorded fits and scorings: 5.0 s of 10.5 s (48%)" in table
    assert last_value(out, "default_grid_minutes") > 0
    assert "measured_grid_minutes: 0.18" in out


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
