"""Fit and scoring cost of every configured detector on real features, and the default grid's
projected wall time.

Features: the embedding caches that README command 1 builds, ``<--results>/<dataset>/
embeddings/<category>/*.h5`` for every category of the config; or, with ``--data-root``, caches
of ``--category dataset/category`` built under ``--cache-dir`` (as benchmarks/detectors.py
does); or, with ``--quick``, tiny random features. One cell per category: the split of seed 0
(``sroc.splits.make_split``), its training set at ``refinement.pollution_ratio`` and its test set.

For each detector of the config (``detectors:``, a list of ``{name, type, params, threads}``), on
its configured threads, it measures:

- fit seconds (best of ``--repeats``, default 3);
- test-scoring seconds, with maps and with image scores only (``score(features, maps=False)``,
  best of ``--repeats``; when the detector's ``score`` has no ``maps`` argument, the script says
  so and reuses the with-maps time);
- training self-scoring seconds (image scores only; ``exclude_self=True`` where the detector has
  it, as refinement scores the training set);
- the FLOPs of the dominant linear algebra, counted from the shapes (2 per multiply-add; see
  the detectors' ``fit_flops`` and ``score_flops`` methods), and the achieved GFLOP/s as a
  fraction of this machine's float32 matmul limit, measured in the same run with
  benchmarks/matmul_limit.py (OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset in a subprocess).

It prints each strategy's projected own work per cell (the registry's ``cost``), then projects
the default grid. Per (category, seed, detector) cell: one fit and test scoring
per pollution ratio (the robustness curve); then each configured strategy's own work, as its entry
in sroc.strategies prices it (``cost``: its fits and scorings, e.g. n_folds fits on (1 - 1/n_folds)
N scoring N/n_folds for cross-validation, the refiner's and consensus members' own fits and
self-scores, the single-run strategies' refits); and for every refinement ratio r > 0 one refit
on the kept images and a test scoring per strategy with a ratio curve. A fit or scoring of another
size than the measured one is scaled by its FLOP count (the detector class's ``fit_flops`` and
``score_flops``). Test sets get maps only when the dataset has masks. Jobs follow the workflow's
structure (docs/refinement.md, "The grid and its jobs"): one ``rank`` job per cell, which also
refits the refinement ratios in order while their projected seconds stay within
``sroc.experiment.STAGED_REFITS_SECONDS``, and one ``refine`` job per ratio r > 0, which either
adopts those staged refits or, past the budget, does its own. A job that loads the cell adds a
measured overhead (a fresh Python, Snakemake's script preamble, the rule script's imports, the
feature load); an adopting job adds its own (a fresh Python, the preamble, the standard library).
Jobs run in parallel on ``--cores``: the grid's wall time is the sum of seconds x threads over the
cores. The last line is ``default_grid_minutes: <x>``.

``--measured`` also reads the finished run under ``--results`` (``<results>/<dataset>``, the
workflow's ``results_dir``) and prints the projected and the measured grid side by side: its
``rank`` and ``refine`` jobs, their job-minutes and the grid's wall time (the first grid job's
start to the last one's end) on the cores the run had. Job timings come from Snakemake's metadata
in the run's working folder (``.snakemake/metadata``: a job starts when Snakemake marks its
outputs incomplete and ends at its last output's modification time; the latest job of every
output, across invocations), or, where there is none, from Snakemake's own logs
(``.snakemake/log/*.snakemake.log``, to the second). It also gives the job-seconds outside the
fits and scorings the run recorded (``fit_seconds`` + ``score_seconds`` of runs.parquet, each r = 0
copy counted once, and of every stored ranking).

The machine is shared: times are noisy, ratios are measured within one run.

    .venv/bin/python benchmarks/fit_cost.py --results results
    .venv/bin/python benchmarks/fit_cost.py --data-root ../shared/data --category piped/PA_BDP01_TL
    .venv/bin/python benchmarks/fit_cost.py --quick   # tiny random features, seconds
    .venv/bin/python benchmarks/fit_cost.py --config config/synthetic.yaml --measured  # with a run
    .venv/bin/python benchmarks/fit_cost.py --results results \
        --config config/shared.yaml config/shared_magnetic_tile.yaml  # layered, as --configfile
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from sroc import strategies
from sroc.config import (
    DetectorSpec,
    consensus_specs,
    detector_specs,
    load_config_plugins,
    read_layered,
    refinement_settings,
    refiner_spec,
    validate_config,
)
from sroc.experiment import STAGED_REFITS_SECONDS
from sroc.splits import make_split, n_injected, test_set, training_set

# The sibling module, also when this file is loaded by path rather than run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_limit import measure_limit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "config" / "config.yaml"
DEFAULT_SEEDS = [0, 1, 2]
# Quick mode: the real backbone's channels (tf_efficientnet_lite2 blocks.2/4/5) on tiny grids.
QUICK_SHAPES = {"blocks.2": (48, 16, 16), "blocks.4": (120, 8, 8), "blocks.5": (208, 4, 4)}


# --------------------------------------------------------------------------------------------
# Measurements


@dataclass
class MeasuredCell:
    """One category's training set (at the refined pollution ratio) and test set, measured."""

    category: str
    train: dict
    test: dict
    n_polluted: int
    has_masks: bool
    cache: Path | None = None
    train_ids: list = field(default_factory=list)
    test_ids: list = field(default_factory=list)


@dataclass
class Cost:
    fit_s: float
    score_maps_s: float
    score_image_s: float
    self_s: float
    image_only: str  # how image-only scoring was measured
    image_only_computes_maps: bool  # score(maps=False) is missing or computed maps anyway
    fit_flops: float
    score_maps_flops: float
    score_image_flops: float
    self_flops: float


def _timed(function, repeats: int = 1):
    """The best of ``repeats`` wall times of ``function()``, and its last result."""
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def _score(detector, features, maps: bool):
    """score(features, maps=maps); (result, True) if the argument exists, else a full score."""
    try:
        return detector.score(features, maps=maps), True
    except TypeError as error:
        if "maps" not in str(error):
            raise
        return detector.score(features), False


def measure(spec: DetectorSpec, cell: MeasuredCell, repeats: int = 1):
    """The :class:`Cost` of ``spec`` on ``cell``, and the detector fitted on its training set.
    Fit and image-only scoring take the best of ``repeats`` runs: a grid job fits and scores
    several times in one process, so its first, cold call (page faults, library set-up) is the
    exception there."""

    def build(**extra):
        return spec.factory(**extra)()

    shapes = {s: a.shape[1:] for s, a in cell.train.items()}
    n_train, n_test = len(next(iter(cell.train.values()))), len(next(iter(cell.test.values())))
    fit_s, detector = _timed(lambda: build().fit(cell.train), repeats)
    score_maps_s, ((scores, _), _) = _timed(lambda: _score(detector, cell.test, True))
    score_image_s, ((image_scores, maps), supported) = _timed(
        lambda: _score(detector, cell.test, False), repeats
    )
    if not np.isfinite(scores).all() or not np.isfinite(image_scores).all():
        raise RuntimeError(f"{spec.name}: non-finite scores")
    image_only = "maps=False" if supported else "no maps argument: full score timed"
    if supported and maps is not None:
        image_only = "maps=False still returned maps"
    # FLOPs of what ran: with maps when image-only scoring is not available.
    image_maps = not supported or maps is not None
    # Refinement scores the training set leave-one-out where the detector offers it.
    self_detector = detector
    if type(detector).supports_exclude_self:
        self_detector = build(exclude_self=True).fit(cell.train)
    self_s, _ = _timed(lambda: _score(self_detector, cell.train, False))
    cost = Cost(
        fit_s,
        score_maps_s,
        score_image_s,
        self_s,
        image_only,
        image_maps,
        detector.fit_flops(shapes, n_train),
        detector.score_flops(shapes, n_train, n_test, True),
        detector.score_flops(shapes, n_train, n_test, image_maps),
        detector.score_flops(shapes, n_train, n_train, image_maps),
    )
    return cost, detector


# What every grid job's Python runs before its work: Snakemake's script preamble, then the rule
# script's imports (scripts/rank.py, scripts/refine.py).
PREAMBLE = "import pickle, snakemake.logging, snakemake.iocontainers\n"
JOB_IMPORTS = (
    "from sroc import config, experiment, runs\n"
    "from sroc.logs import rule_logging\n"
    "from sroc.plugins import load_plugins\n"
)


def _fresh_python_seconds(code: str, repeats: int) -> float:
    """Best wall time of a fresh Python that runs ``code`` (scripts/ on its path, as Snakemake
    puts a rule script's folder there)."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "scripts"), str(REPO)])}
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=environment)
        best = min(best, time.perf_counter() - started)
    return best


def job_overhead_seconds(cell: MeasuredCell, repeats: int = 2) -> float:
    """Wall time of a fresh Python that does what a rank or refine job does before its work:
    Snakemake's script preamble, the script's imports, and the cell's features (training
    candidates and test set; imports only in quick mode, which has no cache)."""
    load = ""
    if cell.cache is not None:
        load = f"load_features({str(cell.cache)!r}, {cell.train_ids + cell.test_ids!r})"
    code = f"{PREAMBLE}{JOB_IMPORTS}from sroc.feature_cache import load_features\n{load}\n"
    return _fresh_python_seconds(code, repeats)


def adopting_job_overhead_seconds(repeats: int = 2) -> float:
    """Wall time of a refine job that adopts what its rank job staged (scripts/refine.py): a
    fresh Python, Snakemake's script preamble and scripts/staged_refits.py (checksums and moves
    not counted: milliseconds)."""
    return _fresh_python_seconds(f"{PREAMBLE}import staged_refits\n", repeats)


# --------------------------------------------------------------------------------------------
# Cells


def _cell_from_cache(cache: Path, config: dict) -> MeasuredCell:
    from sroc.feature_cache import load_features, read_cache_index

    pollution = config.get("pollution") or {}
    refinement = refinement_settings(config)
    index = read_cache_index(cache)
    manifest = make_split(
        index,
        seed=0,
        set_fraction=pollution.get("set_fraction", 0.2),
        min_test_defective=pollution.get("min_test_defective", 1),
    )
    train = training_set(manifest, refinement["pollution_ratio"])
    test = test_set(manifest)
    train_ids, test_ids = train["image_id"].tolist(), test["image_id"].tolist()
    features, _ = load_features(cache, train_ids + test_ids)
    n = len(train_ids)
    return MeasuredCell(
        category=str(index["category"].iloc[0]),
        train={s: a[:n] for s, a in features.items()},
        test={s: a[n:] for s, a in features.items()},
        n_polluted=int(train["polluted"].sum()),
        has_masks=bool((test["mask_path"].fillna("") != "").any()),  # "" where no mask
        cache=cache,
        train_ids=train_ids,
        test_ids=test_ids,
    )


def _quick_cell(config: dict) -> MeasuredCell:
    rng = np.random.default_rng(0)
    n_train, n_test = 40, 10

    def features(n):
        return {s: rng.random((n, *chw), dtype=np.float32) for s, chw in QUICK_SHAPES.items()}

    ratio = refinement_settings(config)["pollution_ratio"]
    return MeasuredCell(
        "random", features(n_train), features(n_test), n_injected(n_train, ratio), True
    )


def run_categories(results: Path, config: dict) -> list[str]:
    """The config's categories; ``all``: those the run under ``results`` embedded."""
    categories = (config.get("dataset") or {}).get("categories", [])
    if categories != "all":
        return list(categories)
    embeddings = results / config["dataset"]["name"] / "embeddings"
    return sorted(p.name for p in embeddings.iterdir()) if embeddings.is_dir() else []


def _results_caches(results: Path, config: dict) -> list[Path]:
    dataset = config["dataset"]["name"]
    caches = []
    for category in run_categories(results, config):
        found = sorted((results / dataset / "embeddings" / category).glob("*.h5"))
        if not found:
            raise SystemExit(
                f"no embedding cache under {results / dataset / 'embeddings' / category}: run "
                "README command 1 first (or pass --data-root, or --quick)"
            )
        caches.append(found[-1])
    return caches


def _built_caches(args, config: dict) -> list[Path]:
    from detectors import subset_cache

    from sroc.backbones import BackboneConfig

    backbone = BackboneConfig.from_dict(
        {k: v for k, v in (config.get("backbone") or {}).items() if k != "threads"}
    )
    every = 10**9  # subset_cache keeps min(n, available): every image
    return [
        subset_cache(args.data_root, name, every, every, 0, args.cache_dir, backbone)[0]
        for name in args.category
    ]


# --------------------------------------------------------------------------------------------
# Grid projection


@dataclass
class MeasuredCost:
    """The :class:`sroc.costs.CellCost` of one detector on one cell: a fit or scoring of
    another size than the measured one is scaled by its FLOP count; ``others`` holds the measured
    costs of the detectors that rank for another (the refiner, the consensus members) and those
    detectors fitted, by spec name."""

    detector: object
    cost: Cost
    cell: MeasuredCell
    settings: dict
    refiner: DetectorSpec
    consensus: list[DetectorSpec]
    others: dict[str, tuple[Cost, object]]

    def __post_init__(self):
        self.shapes = {s: a.shape[1:] for s, a in self.cell.train.items()}
        self.n = len(next(iter(self.cell.train.values())))
        self.n_test = len(next(iter(self.cell.test.values())))
        self.n_polluted = self.cell.n_polluted

    def fit(self, n_fit: float) -> float:
        return self.cost.fit_s * self.detector.fit_flops(self.shapes, n_fit) / self.cost.fit_flops

    def score(self, n_fit: float, n_score: float, maps: bool = False) -> float:
        base_s = self.cost.score_maps_s if maps else self.cost.score_image_s
        base_flops = self.cost.score_maps_flops if maps else self.cost.score_image_flops
        ran_maps = maps or self.cost.image_only_computes_maps
        flops = self.detector.score_flops(self.shapes, n_fit, n_score, ran_maps)
        return base_s * flops / base_flops

    def self_score(self) -> float:
        return self.cost.self_s

    def test_run(self, n_fit: float) -> float:
        return self.fit(n_fit) + self.score(n_fit, self.n_test, self.cell.has_masks)

    def ranking_by(self, spec: DetectorSpec) -> float:
        other, _ = self.others[spec.name]
        return other.fit_s + other.self_s

    def for_detector(self, spec: DetectorSpec) -> "MeasuredCost":
        cost, detector = self.others[spec.name]
        return replace(self, detector=detector, cost=cost)


@dataclass
class CellJobs:
    """The projected work of one (category, seed, detector) cell: its seconds of fits and
    scorings, its jobs that load the cell (the rank job, and the refine jobs of the ratios whose
    refits it leaves to them) and its refine jobs that adopt what the rank job staged."""

    seconds: float
    loading_jobs: int
    adopting_jobs: int


def cell_seconds(spec: DetectorSpec, model: MeasuredCost, config: dict) -> CellJobs:
    """The :class:`CellJobs` of one (category, seed, detector) cell of the grid: the robustness
    curve, every strategy's own work and refits (sroc.strategies); the rank job stages the
    refits of the ratios, in order, while their projected seconds stay within
    sroc.experiment.STAGED_REFITS_SECONDS (scripts/rank.py)."""
    refinement = refinement_settings(config)
    chosen = strategies.strategies_for(spec.type, refinement["strategies"])
    cost = model.cost
    measured_test_s = cost.score_maps_s if model.cell.has_masks else cost.score_image_s
    ratios = list((config.get("pollution") or {}).get("ratios", [0.0, 0.05, 0.1, 0.15, 0.2]))
    seconds = len(ratios) * (cost.fit_s + measured_test_s)
    seconds += strategies.rank_job_cost(chosen, model)
    refined = [r for r in sorted(refinement["ratios"]) if r > 0] if refinement["strategies"] else []
    staged, staging = 0.0, True
    loading, adopting = 1, 0
    for ratio in refined:
        ratio_s = strategies.refine_job_cost(chosen, model, ratio)
        seconds += ratio_s
        staging = staging and staged + ratio_s <= STAGED_REFITS_SECONDS
        if staging:
            staged += ratio_s
            adopting += 1
        else:
            loading += 1
    return CellJobs(seconds, loading, adopting)


# --------------------------------------------------------------------------------------------
# A finished run, measured


GRID_RULES = ("rank", "refine")
# What the log of a refine job that adopted staged refits says (scripts/refine.py).
ADOPTED = "adopted the refits"


@dataclass
class MeasuredRun:
    """The grid jobs of a finished run: per job its rule, start and end (epoch seconds); the
    seconds of fits and scorings its score files and runs.parquet record; where the timings
    came from; the cores Snakemake was given (None if no log says)."""

    jobs: pd.DataFrame
    recorded_runs_s: float
    recorded_rankings_s: float
    source: str
    cores: int | None

    @property
    def job_seconds(self) -> float:
        return float((self.jobs["end"] - self.jobs["start"]).sum())

    @property
    def span_seconds(self) -> float:
        return float(self.jobs["end"].max() - self.jobs["start"].min())


def _workdir(dataset_dir: Path) -> Path:
    """The folder Snakemake ran in: the nearest one above the results with a .snakemake."""
    for folder in dataset_dir.resolve().parents:
        if (folder / ".snakemake").is_dir():
            return folder
    raise SystemExit(f"no .snakemake folder above {dataset_dir}: not a finished run's results")


def _metadata_jobs(workdir: Path, dataset_dir: Path) -> pd.DataFrame:
    """Grid jobs from Snakemake's metadata (.snakemake/metadata, one JSON record per output, the
    latest job that wrote it): a job starts when Snakemake marks its outputs incomplete and ends
    at its last output's modification time. Outputs of one job share its log."""
    logs = dataset_dir.resolve() / "logs"
    jobs = {}
    for path in (workdir / ".snakemake" / "metadata").rglob("*"):
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rule, log = record.get("rule"), record.get("log") or []
        if rule not in GRID_RULES or not log or record.get("starttime") is None:
            continue
        if not (workdir / log[0]).resolve().is_relative_to(logs):
            continue
        start, end = jobs.get((rule, log[0]), (math.inf, -math.inf))
        jobs[(rule, log[0])] = (min(start, record["starttime"]), max(end, record["endtime"]))
    rows = []
    for (rule, log), (start, end) in jobs.items():
        path = workdir / log
        text = path.read_text(errors="replace") if path.is_file() else ""
        adopted = rule == "refine" and ADOPTED in text
        rows.append({"rule": rule, "log": log, "start": start, "end": end, "adopted": adopted})
    return pd.DataFrame(rows, columns=["rule", "log", "start", "end", "adopted"])


LOG_TIME = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
LOG_RULE = re.compile(r"^(?:local)?rule (\w+):$")
LOG_JOBID = re.compile(r"^\s+jobid: (\d+)$")
LOG_FINISHED = re.compile(r"^Finished jobid: (\d+)")


def _log_jobs(workdir: Path) -> pd.DataFrame:
    """Grid jobs from Snakemake's own logs (.snakemake/log/*.snakemake.log), to the second: each
    job's header follows the time it started, its "Finished jobid" line the time it ended."""
    rows = []
    for log in sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log")):
        now, rule, started = None, None, {}
        for line in log.read_text(errors="replace").splitlines():
            if found := LOG_TIME.match(line):
                now = time.mktime(time.strptime(found.group(1), "%a %b %d %H:%M:%S %Y"))
            elif found := LOG_RULE.match(line):
                rule = found.group(1)
            elif (found := LOG_JOBID.match(line)) and rule in GRID_RULES:
                started[found.group(1)] = (rule, now)
                rule = None
            elif (found := LOG_FINISHED.match(line)) and found.group(1) in started:
                job_rule, start = started.pop(found.group(1))
                rows.append({"rule": job_rule, "log": str(log), "start": start, "end": now})
    # Which refine jobs adopted staged refits: unknown from Snakemake's log.
    return pd.DataFrame(rows, columns=["rule", "log", "start", "end"]).assign(adopted=None)


def _cores(workdir: Path) -> int | None:
    """The cores of the newest Snakemake log ("Provided cores: N")."""
    for log in sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"), reverse=True):
        if found := re.search(r"^Provided cores: (\d+)", log.read_text(errors="replace"), re.M):
            return int(found.group(1))
    return None


def measure_run(dataset_dir: Path) -> MeasuredRun:
    """The grid jobs of the finished run whose results are ``dataset_dir``
    (``<results_dir>/<dataset>``): their timings from Snakemake's metadata, or from its logs
    where there is no metadata; the seconds of fits and scorings the run recorded."""
    import h5py

    workdir = _workdir(dataset_dir)
    jobs, source = _metadata_jobs(workdir, dataset_dir), "Snakemake metadata"
    if jobs.empty:
        jobs, source = _log_jobs(workdir), "Snakemake logs (to the second)"
    if jobs.empty:
        raise SystemExit(f"no rank or refine job of {dataset_dir} in {workdir / '.snakemake'}")
    table = pd.read_parquet(dataset_dir / "runs.parquet")
    # Each strategy's r = 0 row repeats the unrefined run: counted once.
    copies = table["run"].str.endswith("/r=0") & (table["strategy"] != "none")
    runs_s = float(table.loc[~copies, ["fit_seconds", "score_seconds"]].to_numpy().sum())
    rankings_s = 0.0
    for path in (dataset_dir / "scores").rglob("*.h5"):
        with h5py.File(path, "r") as scores:
            for group in scores.get("rankings", {}).values():
                rankings_s += float(group.attrs.get("fit_seconds", 0.0))
                rankings_s += float(group.attrs.get("score_seconds", 0.0))
    return MeasuredRun(jobs, runs_s, rankings_s, source, _cores(workdir))


def print_side_by_side(
    measured: MeasuredRun, projected_s: float, projected_jobs: tuple[int, int], cores: int
) -> None:
    """The projected and the measured grid, side by side."""
    jobs = measured.jobs
    by_rule = jobs.groupby("rule").size().to_dict()
    run_cores = measured.cores or cores
    recorded = measured.recorded_runs_s + measured.recorded_rankings_s
    outside = measured.job_seconds - recorded
    known = jobs["adopted"].dropna()
    adopted = f" ({int(known.sum())} adopting staged refits)" if len(known) else ""
    rows = [
        ("grid jobs", f"{sum(projected_jobs)} ({projected_jobs[0]} loading the cell, "
         f"{projected_jobs[1]} adopting staged refits)",
         ", ".join(f"{n} {rule}" for rule, n in sorted(by_rule.items())) + adopted),
        ("grid job-minutes", f"{projected_s / 60:.2f}", f"{measured.job_seconds / 60:.2f}"),
        (f"grid minutes on {run_cores} cores", f"{projected_s / run_cores / 60:.2f}",
         f"{measured.span_seconds / 60:.2f} (first grid job's start to last one's end)"),
    ]  # fmt: skip
    print(f"\n## projected and measured grid ({measured.source}; {len(jobs)} jobs)")
    print(pd.DataFrame(rows, columns=["", "projected", "measured"]).to_markdown(index=False))
    print(
        f"measured job-seconds outside recorded fits and scorings: {outside:.1f} s of "
        f"{measured.job_seconds:.1f} s ({outside / measured.job_seconds:.0%}); recorded: "
        f"{measured.recorded_runs_s:.1f} s in runs.parquet, {measured.recorded_rankings_s:.1f} s "
        "in the rankings"
    )
    print(f"measured_grid_minutes: {measured.span_seconds / 60:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        type=Path,
        nargs="+",
        default=[DEFAULT_CONFIG],
        help="config files, each later one layered over the earlier ones (--configfile A B)",
    )
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument("--data-root", type=Path, help="measure these categories instead")
    parser.add_argument("--category", nargs="+", default=["piped/PA_BDP01_TL"])
    parser.add_argument("--cache-dir", type=Path, default=REPO / "results" / "benchmarks")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="tiny random features, seconds")
    parser.add_argument(
        "--measured",
        action="store_true",
        help="also the measured grid of the finished run under --results, beside the projection",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="fit and image-only scoring: best of this many"
    )
    args = parser.parse_args(argv)
    config = read_layered(args.config)
    load_config_plugins(config)
    validate_config(config)
    specs = detector_specs(config)
    refinement = refinement_settings(config)
    seeds = (config.get("pollution") or {}).get("seeds", DEFAULT_SEEDS)
    categories = run_categories(args.results, config)
    if args.quick and not categories:  # "all" of a dataset not embedded: the quick cell's
        categories = [_quick_cell(config).category]

    if args.quick:
        cells = [_quick_cell(config)]
    else:
        caches = (
            _built_caches(args, config) if args.data_root else _results_caches(args.results, config)
        )
        cells = [_cell_from_cache(cache, config) for cache in caches]
    print(
        f"config {' + '.join(map(str, args.config))}: detectors {[s.name for s in specs]}, "
        f"{len(categories)} categories, seeds {list(seeds)}; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a shared machine: times are noisy)"
    )
    limits = {
        t: measure_limit(t, repeats=2 if args.quick else 5) for t in {s.n_jobs for s in specs}
    }
    for threads, limit in sorted(limits.items()):
        print(f"matmul limit on {threads} thread(s): {limit.describe()}")

    # The detectors that rank for another: the refiner and the consensus members.
    others = [refiner_spec(config), *consensus_specs(config)]
    cell_totals, cell_jobs = {}, {}
    for cell in cells:
        n_train = len(next(iter(cell.train.values())))
        n_test = len(next(iter(cell.test.values())))
        print(
            f"\n## {cell.category}: {n_train} train ({cell.n_polluted} polluted), {n_test} test "
            f"images; test maps in the grid: {'yes' if cell.has_masks else 'no (no masks)'}"
        )
        overhead = job_overhead_seconds(cell, 1 if args.quick else 2)
        adopting = adopting_job_overhead_seconds(1 if args.quick else 2)
        print(
            f"per-job overhead: {overhead:.2f} s for a job that loads the cell (python, "
            f"Snakemake's preamble, imports, feature load), {adopting:.2f} s for a refine job "
            "that adopts staged refits"
        )
        other_costs = {other.name: measure(other, cell) for other in others}
        cell_totals[cell.category] = 0.0
        cell_jobs[cell.category] = [0, 0]
        rows, strategy_rows = [], []
        for spec in specs:
            try:
                cost, detector = measure(spec, cell, args.repeats)
            except (TypeError, ValueError) as error:
                if args.quick:  # quick mode checks that every detector still runs
                    raise
                print(f"{spec.name}: not measured ({error}); left out of the projection")
                continue
            limit = limits[spec.n_jobs].gflops
            model = MeasuredCost(
                detector, cost, cell, refinement, others[0], others[1:], other_costs
            )
            jobs = cell_seconds(spec, model, config)
            chosen = strategies.strategies_for(spec.type, refinement["strategies"])
            strategy_rows.append(
                {"detector": spec.name, **{n: strategies.get(n).cost(model) for n in chosen}}
            )
            seconds = jobs.seconds
            job_seconds = (
                seconds + jobs.loading_jobs * overhead + jobs.adopting_jobs * adopting
            ) * spec.n_jobs
            cell_jobs[cell.category][0] += jobs.loading_jobs
            cell_jobs[cell.category][1] += jobs.adopting_jobs
            cell_totals[cell.category] += job_seconds
            rows.append(
                {
                    "detector": spec.name,
                    "fit_s": cost.fit_s,
                    "score_maps_s": cost.score_maps_s,
                    "score_image_s": cost.score_image_s,
                    "self_s": cost.self_s,
                    "fit_gflop": cost.fit_flops / 1e9,
                    "score_maps_gflop": cost.score_maps_flops / 1e9,
                    "score_image_gflop": cost.score_image_flops / 1e9,
                    "fit_of_limit": cost.fit_flops / cost.fit_s / 1e9 / limit,
                    "score_image_of_limit": cost.score_image_flops
                    / cost.score_image_s
                    / 1e9
                    / limit,
                    "self_of_limit": cost.self_flops / cost.self_s / 1e9 / limit,
                    "fit_plus_image_score_s": cost.fit_s + cost.score_image_s,
                    "cell_min": seconds / 60,
                    "image_only": cost.image_only,
                }
            )
        print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))
        print(
            "projected seconds of each strategy's own work in a cell (its rankings' fits and "
            "scorings, a single-run strategy's run; the refits of the ratios come on top):"
        )
        print(pd.DataFrame(strategy_rows).to_markdown(index=False, floatfmt=".3g"))

    per_category = np.mean(list(cell_totals.values()))
    if sorted(cell_totals) == sorted(categories):
        total = sum(cell_totals.values()) * len(seeds)
        n_jobs = np.sum(list(cell_jobs.values()), axis=0) * len(seeds)
        basis = "each category measured"
    else:
        total = per_category * len(categories) * len(seeds)
        n_jobs = np.mean(list(cell_jobs.values()), axis=0) * len(categories) * len(seeds)
        basis = f"the mean of the measured cell(s) for each of the {len(categories)} categories"
    if args.measured:
        dataset_dir = args.results / config["dataset"]["name"]
        print_side_by_side(
            measure_run(dataset_dir), total, tuple(int(round(n)) for n in n_jobs), args.cores
        )
    print(
        f"\ngrid: {len(categories)} categories x {len(seeds)} seeds x {len(specs)} detectors, "
        f"{basis}; {total / 60:.1f} core-minutes over {args.cores} cores (embedding not counted)"
    )
    print(f"default_grid_minutes: {total / args.cores / 60:.2f}")


if __name__ == "__main__":
    main()
