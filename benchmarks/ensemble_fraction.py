"""The sparse ensembles on a finished run's splits: recovery and refinement F1 against the
members' fraction f and the aggregate (the curve that chose ``ensemble_oob``'s defaults), and the
contamination that each ``ratio: auto`` strategy estimates against the truth (docs/refinement.md).

For every (category, seed) split of a finished workflow run (``<results>/<dataset>/splits`` and
its embedding caches) and every detector named with ``--detectors`` (config entries):

- at the config's pollution ratio p: the test AUROC of the detector fitted on the clean and on
  the polluted training set; for each fraction f, the B members' out-of-bag scores
  (``sroc.ensembles``, the strategy's own bags and seed), aggregated by each of
  ``--aggregates``; the top round(p N) images removed (r = p), the refinement F1 of that
  removal (precision = recall at r = p) and the test AUROC of the detector refitted on the
  rest. One row per (detector, f, aggregate): the mean F1, and the recovery of the mean AUROCs,
  ``(refined - polluted) / (clean - polluted)``, as the workflow's recovery table defines it.
- with ``--estimate-ratios``: at each of these pollution ratios, the ratio that every
  ``ratio: auto`` strategy of the registry (``sroc_auto``, ``ensemble_auto``, ...) estimates,
  run as the grid runs it (the config's settings and strategy parameters). One row per
  (detector, strategy, true ratio): the mean estimate and its range over the cells.

The last line is ``best_f1: <x>``, the curve's best mean F1. Image scores only: no maps.

    .venv/bin/python benchmarks/ensemble_fraction.py --results results \\
        --config config/shared.yaml config/shared_magnetic_tile.yaml \\
        --estimate-ratios 0 0.05 0.1 0.15 0.2
    .venv/bin/python benchmarks/ensemble_fraction.py --quick   # synthetic features, seconds
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # the sibling fit_cost

from fit_cost import run_categories  # noqa: E402

from sroc import ensembles, refinement, strategies  # noqa: E402
from sroc.config import (  # noqa: E402
    detector_specs,
    load_config_plugins,
    read_layered,
    refinement_settings,
    strategy_params,
)
from sroc.experiment import Cell, RefinementSetup, strategy_seed  # noqa: E402
from sroc.metrics import image_auroc  # noqa: E402
from sroc.splits import n_injected, read_manifest  # noqa: E402

DEFAULT_FRACTIONS = [0.1, 0.2, 0.3, 0.5]


class SyntheticCell:
    """A cell with :class:`sroc.experiment.Cell`'s interface, for the quick mode: 60 training
    goods, a pollution set of 12 defective images of one kind (close to each other, so that they
    hide each other from a detector fitted on all of them) and a test set of both."""

    GOODS, DEFECTS = 60, 12

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        shift = np.zeros((8, 2, 2), dtype=np.float32)
        shift[0] = 4.0

        def images(n, centre, spread):
            return centre + spread * rng.standard_normal((n, 8, 2, 2)).astype(np.float32)

        self._features = np.concatenate(
            [images(self.GOODS, 0.0, 1.0), images(self.DEFECTS, shift, 0.2)]
        )
        self._ids = [f"train/{i:03d}" for i in range(self.GOODS)]
        self._ids += [f"pollution/{i:03d}" for i in range(self.DEFECTS)]
        self.test_features = {
            "stage": np.concatenate([images(30, 0.0, 1.0), images(10, shift, 0.2)])
        }
        self.test = pd.DataFrame({"label": np.r_[np.zeros(30, int), np.ones(10, int)]})

    def training_set(self, ratio: float) -> pd.DataFrame:
        # Goods replaced by pollution images, as sroc.splits.training_set does.
        n_polluted = n_injected(self.GOODS, ratio)
        ids = self._ids[n_polluted : self.GOODS] + self._ids[self.GOODS :][:n_polluted]
        return pd.DataFrame({"image_id": ids, "polluted": [i.startswith("p") for i in ids]})

    def features_of(self, image_ids) -> dict[str, np.ndarray]:
        return {"stage": self._features[[self._ids.index(i) for i in image_ids]]}


def workflow_cell(results: Path, dataset: str, category: str, seed: int) -> Cell:
    """The grid's cell of (category, seed) from a finished run's split and embedding cache."""
    caches = sorted((results / dataset / "embeddings" / category).glob("*.h5"))
    split = results / dataset / "splits" / category / f"seed{seed}.csv"
    if not caches or not split.is_file():
        raise SystemExit(
            f"no embedding cache or no split {split}: run the workflow with this config "
            "first (its embed and split rules suffice: --until embed split)"
        )
    return Cell(read_manifest(split), str(caches[-1]))


def test_auroc(factory, features, cell) -> float:
    scores, _ = refinement.score_timed(factory().fit(features), cell.test_features)
    return image_auroc(cell.test["label"].to_numpy(dtype=int), scores)


def fraction_rows(cell, category, seed, spec, fractions, aggregates, n_members, ratio):
    """The curve's rows of one cell and detector: one per (fraction, aggregate)."""
    factory = spec.factory()
    train = cell.training_set(ratio)
    ids = train["image_id"].tolist()
    polluted = train["polluted"].to_numpy(dtype=bool)
    features = cell.features_of(ids)
    clean_auroc = test_auroc(factory, cell.features_of(cell.training_set(0.0)["image_id"]), cell)
    polluted_auroc = test_auroc(factory, features, cell)
    n_removed = refinement.n_removed(len(ids), ratio)
    rng_seed = strategy_seed(category, seed)
    rows = []
    for fraction in fractions:
        started = time.perf_counter()
        try:
            bags = ensembles.ensemble_bags(len(ids), n_members, fraction, rng_seed)
            out_of_bag = ensembles.out_of_bag_scores(features, ids, factory, bags)
        except ValueError as error:  # a member too small for the detector: no row
            print(f"{category} seed {seed} {spec.name} f = {fraction}: {error}", file=sys.stderr)
            continue
        ensemble_seconds = time.perf_counter() - started
        for aggregate in aggregates:
            ranking = ensembles.out_of_bag_ranking(out_of_bag, ids, aggregate, rng_seed)
            found = int(polluted[refinement.removed_positions(ranking, ratio)].sum())
            kept = refinement.kept_positions(ranking, ratio)
            rows.append(
                {
                    "category": category,
                    "seed": seed,
                    "detector": spec.name,
                    "fraction": fraction,
                    "aggregate": aggregate,
                    "f1": 2 * found / (n_removed + int(polluted.sum())),
                    "clean_auroc": clean_auroc,
                    "polluted_auroc": polluted_auroc,
                    "refined_auroc": test_auroc(
                        factory, refinement.subset_features(features, kept), cell
                    ),
                    "ensemble_seconds": ensemble_seconds,
                }
            )
    return rows


def estimate_rows(cell, category, seed, spec, config, ratios):
    """The ratio every ``ratio: auto`` strategy estimates on this cell at each true ratio."""
    settings = refinement_settings(config)
    rows = []
    for ratio in ratios:
        setup = RefinementSetup(
            detector=spec,
            pollution_ratio=ratio,
            rng_seed=strategy_seed(category, seed),
            settings=settings,
            strategy_params=settings["strategy_params"],
        )
        inputs = setup.inputs(cell)
        for name in strategies.auto_ratio_strategies():
            strategy = strategies.get(name)
            if strategy.applies_to(spec.type):
                selection = strategy.function(setup.for_strategy(inputs, strategy))
                rows.append(
                    {
                        "category": category,
                        "seed": seed,
                        "detector": spec.name,
                        "strategy": name,
                        "true_ratio": ratio,
                        "estimated_ratio": selection.ratio,
                    }
                )
    return rows


def curve_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean F1 and the recovery of the mean AUROCs per (detector, fraction, aggregate)."""
    grouped = rows.groupby(["detector", "fraction", "aggregate"], sort=True)
    table = grouped[["f1", "clean_auroc", "polluted_auroc", "refined_auroc"]].mean()
    table["recovery"] = (table["refined_auroc"] - table["polluted_auroc"]) / (
        table["clean_auroc"] - table["polluted_auroc"]
    )
    table["ensemble_seconds"] = grouped["ensemble_seconds"].mean()
    table["cells"] = grouped.size()
    return table.reset_index()


def estimate_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean, lowest and highest estimate per (detector, strategy, true ratio)."""
    grouped = rows.groupby(["detector", "strategy", "true_ratio"], sort=True)["estimated_ratio"]
    return grouped.agg(["mean", "min", "max", "size"]).reset_index()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, nargs="+", default=[])
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument("--detectors", nargs="+", help="config detector names (default: all)")
    parser.add_argument("--fractions", type=float, nargs="+", default=DEFAULT_FRACTIONS)
    parser.add_argument("--aggregates", nargs="+", default=list(ensembles.ENSEMBLE_AGGREGATES))
    parser.add_argument("--members", type=int, help="B (default: the strategy's setting)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the config's seeds")
    parser.add_argument("--estimate-ratios", type=float, nargs="*", default=[])
    parser.add_argument("--out", type=Path, help="write every cell's rows to <out>_*.csv")
    parser.add_argument("--quick", action="store_true", help="synthetic features: seconds")
    args = parser.parse_args(argv)

    config = read_layered([REPO / "config" / "config.yaml", *args.config])
    load_config_plugins(config)
    ratio = refinement_settings(config)["pollution_ratio"]
    n_members = args.members or strategy_params(config, "ensemble_oob")["n_members"]
    specs = [s for s in detector_specs(config) if not args.detectors or s.name in args.detectors]
    dataset = "synthetic" if args.quick else config["dataset"]["name"]
    if args.quick:
        specs = [s for s in specs if s.type in ("knn", "mahalanobis")]
        categories, seeds = ["synthetic"], args.seeds or [0, 1]
        args.estimate_ratios = args.estimate_ratios or [0.0, ratio]
    else:
        categories = run_categories(args.results, config)
        seeds = args.seeds or (config.get("pollution") or {}).get("seeds", [0])
    if not specs:
        raise SystemExit(f"no detector named {args.detectors} in the config's detectors")

    curve, estimates = [], []
    for seed in seeds:
        for category in categories:
            if args.quick:
                cell = SyntheticCell(seed)
            else:
                cell = workflow_cell(args.results, dataset, category, seed)
            for spec in specs:
                curve += fraction_rows(
                    cell, category, seed, spec, args.fractions, args.aggregates, n_members, ratio
                )
                estimates += estimate_rows(cell, category, seed, spec, config, args.estimate_ratios)
                print(f"measured {category} seed {seed} {spec.name}", file=sys.stderr, flush=True)
    curve = pd.DataFrame(curve)
    if args.out:
        curve.to_csv(f"{args.out}_curve.csv", index=False)
    table = curve_table(curve)
    print(f"{dataset}: B = {n_members}, pollution p = {ratio}, removal r = p")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if estimates:
        estimates = pd.DataFrame(estimates)
        if args.out:
            estimates.to_csv(f"{args.out}_estimates.csv", index=False)
        print(f"{dataset}: the ratio each ratio: auto strategy estimates, against the truth")
        print(estimate_table(estimates).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"best_f1: {table['f1'].max():.3f}")


if __name__ == "__main__":
    main()
