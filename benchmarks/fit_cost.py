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

It then projects the default grid. Per (category, seed, detector) cell: one fit and test scoring
per pollution ratio (the robustness curve); then each configured strategy's own work, as its entry
in sroc.strategies prices it (``cost``: its fits and scorings, e.g. n_folds fits on (1 - 1/n_folds)
N scoring N/n_folds for cross-validation, the refiner's and consensus members' own fits and
self-scores, the single-run strategies' refits); and for every refinement ratio r > 0 one refit
on the kept images and a test scoring per strategy with a ratio curve. A fit or scoring of another
size than the measured one is scaled by its FLOP count (the detector class's ``fit_flops`` and
``score_flops``). Test sets get maps only when the dataset has masks. Every job (one ``rank`` and
one ``refine`` per ratio r > 0 per cell) adds a measured overhead: a fresh Python, the imports and
the feature load. Jobs run in parallel on ``--cores``: the grid's wall time is the sum of seconds x
threads over the cores. The last line is ``default_grid_minutes: <x>``.

The machine is shared: times are noisy, ratios are measured within one run.

    .venv/bin/python benchmarks/fit_cost.py --results results
    .venv/bin/python benchmarks/fit_cost.py --data-root ../shared/data --category piped/PA_BDP01_TL
    .venv/bin/python benchmarks/fit_cost.py --quick   # tiny random features, seconds
"""

import argparse
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from sroc import strategies
from sroc.config import (
    DetectorSpec,
    consensus_specs,
    detector_specs,
    load_config_plugins,
    refinement_settings,
    refiner_spec,
    validate_config,
)
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


def job_overhead_seconds(cell: MeasuredCell, repeats: int = 2) -> float:
    """Wall time of a fresh Python that imports what a detector job imports and loads the
    cell's training features (imports only in quick mode, which has no cache)."""
    load = ""
    if cell.cache is not None:
        load = f"load_features({str(cell.cache)!r}, {cell.train_ids!r})"
    code = (
        "import sroc.detectors, sroc.metrics, sroc.runs, sroc.splits\n"
        f"from sroc.feature_cache import load_features\n{load}\n"
    )
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        best = min(best, time.perf_counter() - started)
    return best


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


def _results_caches(results: Path, config: dict) -> list[Path]:
    dataset = config["dataset"]["name"]
    caches = []
    for category in config["dataset"]["categories"]:
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


def cell_seconds(spec: DetectorSpec, model: MeasuredCost, config: dict) -> tuple[float, int]:
    """Seconds of one (category, seed, detector) cell of the grid, and its number of jobs: the
    robustness curve, then every strategy's own work and refits (sroc.strategies)."""
    refinement = refinement_settings(config)
    chosen = strategies.strategies_for(spec.type, refinement["strategies"])
    cost = model.cost
    measured_test_s = cost.score_maps_s if model.cell.has_masks else cost.score_image_s
    ratios = list((config.get("pollution") or {}).get("ratios", [0.0, 0.05, 0.1, 0.15, 0.2]))
    seconds = len(ratios) * (cost.fit_s + measured_test_s)
    seconds += strategies.rank_job_cost(chosen, model)
    refined = [r for r in refinement["ratios"] if r > 0]
    for ratio in refined:
        seconds += strategies.refine_job_cost(chosen, model, ratio)
    return seconds, 1 + len(refined)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument("--data-root", type=Path, help="measure these categories instead")
    parser.add_argument("--category", nargs="+", default=["piped/PA_BDP01_TL"])
    parser.add_argument("--cache-dir", type=Path, default=REPO / "results" / "benchmarks")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="tiny random features, seconds")
    parser.add_argument(
        "--repeats", type=int, default=3, help="fit and image-only scoring: best of this many"
    )
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    load_config_plugins(config)
    validate_config(config)
    specs = detector_specs(config)
    refinement = refinement_settings(config)
    seeds = (config.get("pollution") or {}).get("seeds", DEFAULT_SEEDS)
    categories = (config.get("dataset") or {}).get("categories", [])

    if args.quick:
        cells = [_quick_cell(config)]
    else:
        caches = (
            _built_caches(args, config) if args.data_root else _results_caches(args.results, config)
        )
        cells = [_cell_from_cache(cache, config) for cache in caches]
    print(
        f"config {args.config}: detectors {[s.name for s in specs]}, {len(categories)} "
        f"categories, seeds {list(seeds)}; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs (a shared machine: times are noisy)"
    )
    limits = {
        t: measure_limit(t, repeats=2 if args.quick else 5) for t in {s.n_jobs for s in specs}
    }
    for threads, limit in sorted(limits.items()):
        print(f"matmul limit on {threads} thread(s): {limit.describe()}")

    # The detectors that rank for another: the refiner and the consensus members.
    others = [refiner_spec(config), *consensus_specs(config)]
    cell_totals = {}
    for cell in cells:
        n_train = len(next(iter(cell.train.values())))
        n_test = len(next(iter(cell.test.values())))
        print(
            f"\n## {cell.category}: {n_train} train ({cell.n_polluted} polluted), {n_test} test "
            f"images; test maps in the grid: {'yes' if cell.has_masks else 'no (no masks)'}"
        )
        overhead = job_overhead_seconds(cell, 1 if args.quick else 2)
        print(f"per-job overhead (python, imports, feature load): {overhead:.2f} s")
        other_costs = {other.name: measure(other, cell) for other in others}
        cell_totals[cell.category] = 0.0
        rows = []
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
            seconds, jobs = cell_seconds(spec, model, config)
            job_seconds = (seconds + jobs * overhead) * spec.n_jobs
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

    per_category = np.mean(list(cell_totals.values()))
    if sorted(cell_totals) == sorted(categories):
        total = sum(cell_totals.values()) * len(seeds)
        basis = "each category measured"
    else:
        total = per_category * len(categories) * len(seeds)
        basis = f"the mean of the measured cell(s) for each of the {len(categories)} categories"
    print(
        f"\ngrid: {len(categories)} categories x {len(seeds)} seeds x {len(specs)} detectors, "
        f"{basis}; {total / 60:.1f} core-minutes over {args.cores} cores (embedding not counted)"
    )
    print(f"default_grid_minutes: {total / args.cores / 60:.2f}")


if __name__ == "__main__":
    main()
