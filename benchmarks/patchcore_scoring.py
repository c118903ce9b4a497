"""PatchCore's exact test scoring and greedy coreset as fractions of the matmul limit.

Random float32 features with the elpv cell's shapes (392 train, 487 test images; blocks.4
120 x 24 x 24 and blocks.5 208 x 12 x 12 of the default tf_efficientnet_lite2 at 380 px) and
config/config.yaml's PatchCore parameters (stride-32 grid, 128-d projection, 20 % coreset,
exact search), one thread. One run measures:

- the single-thread float32 matmul limit (:func:`matmul_limit.measure_limit`, in a subprocess
  without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE), before and after the runs: the larger rate;
- ``fit``, with the coreset's time, its greedy steps (each one sgemv over the active set, a
  matrix-vector product bound by cache bandwidth, hence also compared with the best rate of
  that sgemv alone, measured here) and its refreshes (matrix products, folding the centres
  selected since the last refresh into every point's distance);
- ``score`` (maps included) and its parts: patch features (of which the projection), the
  exact search (its candidate products, the candidate selection, the exact differences and
  the choice of the k nearest) and the rest. The scoring's FLOPs are those of the candidate
  products, 2 x queries x memory x D (the rest is O(queries x D)): GFLOP/s of the search alone
  and of the whole scoring.

The machine is shared: compare the fractions within one run. The last line is
``scoring_fraction_of_limit: <x>`` (the whole scoring's).

    .venv/bin/python benchmarks/patchcore_scoring.py [--n-train 392 --n-test 487] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml
from scipy.linalg.blas import get_blas_funcs
from threadpoolctl import threadpool_limits

from sroc.detectors import PatchCoreDetector, coreset, neighbours, patchcore

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_limit import measure_limit  # noqa: E402

ELPV_SHAPES = {"blocks.4": (120, 24, 24), "blocks.5": (208, 12, 12)}


def config_params() -> dict:
    """config/config.yaml's PatchCore parameters."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    (entry,) = [d for d in config["detectors"] if d["type"] == "patchcore"]
    return dict(entry.get("params") or {})


def random_features(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s: rng.standard_normal((n, *chw), dtype=np.float32) for s, chw in ELPV_SHAPES.items()}


class Timers:
    """Seconds and calls per label, of functions wrapped in place for one measurement."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.records: dict[str, list] = {}

    def wrap(self, owner, name: str, label: str, record=None, returned=False):
        """Time ``owner.name``, or with ``returned`` the functions it returns."""
        original = getattr(owner, name)
        if returned:
            replacement = lambda *a, **k: self.timed(original(*a, **k), label, record)  # noqa: E731
        else:
            replacement = self.timed(original, label, record)
        setattr(owner, name, replacement)
        return original

    def timed(self, original, label: str, record=None):

        def timed(*args, **kwargs):
            started = time.perf_counter()
            result = original(*args, **kwargs)
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started
            if record is not None:
                self.records.setdefault(label, []).append(record(args, result))
            return result

        return timed

    @contextmanager
    def wrapped(self, *targets):
        # Targets absent from this version of the code (another checkout's) are left out.
        present = [t for t in targets if t[0] is not None and hasattr(t[0], t[1])]
        originals = [(owner, name, self.wrap(owner, name, *rest)) for owner, name, *rest in present]
        try:
            yield self
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


def sgemv_gflops(rows: int, dim: int, repeats: int) -> float:
    """Best rate of the coreset step's sgemv alone (rows x dim float32, cache-resident)."""
    points = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    out = np.empty(rows, dtype=np.float32)
    gemv = get_blas_funcs("gemv", dtype=np.float32)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(100):
            gemv(-2.0, points.T, points[i], beta=1.0, y=out, trans=1, overwrite_y=1)
        best = max(best, 100 * 2 * points.size / (time.perf_counter() - started) / 1e9)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=392)
    parser.add_argument("--n-test", type=int, default=487)
    parser.add_argument("--quick", action="store_true", help="40 + 40 images: seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test = 40, 40
    limit = measure_limit(1, repeats=2 if args.quick else 5)
    params = {**config_params(), "n_jobs": 1}
    train, test = random_features(args.n_train, 0), random_features(args.n_test, 1)
    print(f"limit: {limit.describe()}")
    print(f"PatchCore {params}; {args.n_train} train, {args.n_test} test images {ELPV_SHAPES}")

    detector = PatchCoreDetector(**params)
    fit_timers = Timers()
    steps = (coreset, "greedy_steps", "steps", lambda a, r: (a[0].shape, len(r)))
    selection = (patchcore, "greedy_coreset_indices", "coreset", lambda a, r: (a[0].shape, len(r)))
    with threadpool_limits(1), fit_timers.wrapped(steps, selection):
        started = time.perf_counter()
        detector.fit(train)
        fit_s = time.perf_counter() - started
    (((n_points, dim), n_select),) = fit_timers.records["coreset"]
    step_flops = sum(2 * rows * d * n for (rows, d), n in fit_timers.records["steps"])
    # Every selected centre but the last batch is folded into all points once ([p, 1] products).
    last_batch = fit_timers.records["steps"][-1][1]
    refresh_flops = 2 * n_points * (dim + 1) * (10 + n_select - last_batch)
    coreset_s, steps_s = fit_timers.seconds["coreset"], fit_timers.seconds["steps"]
    active_rows = max(shape[0] for shape, _ in fit_timers.records["steps"])
    with threadpool_limits(1):
        matvec = sgemv_gflops(active_rows, dim, 3 if args.quick else 10)

    score_timers = Timers()
    targets = [
        (detector, "patch_features", "patch features"),
        (patchcore, "_thread_independent_product", "projection"),
        (patchcore, "nearest_sq_distances", "search"),
        (neighbours, "exact_sq_distances", "exact differences"),
        (neighbours.CandidateSearch, "__call__", "candidates"),
        (neighbours, "get_blas_funcs", "products", None, True),
    ]
    with threadpool_limits(1), score_timers.wrapped(*targets):
        started = time.perf_counter()
        detector.score(test)
        score_s = time.perf_counter() - started
    # The machine is shared: measure the limit again after the runs and keep the larger rate.
    after = measure_limit(1, repeats=2 if args.quick else 5)
    print(f"limit before {limit.gflops:.1f}, after {after.gflops:.1f} GFLOP/s: the larger one")
    limit = max(limit, after, key=lambda rate: rate.gflops)
    seconds = {label: 0.0 for _, _, label, *_ in targets} | score_timers.seconds
    queries = args.n_test * detector.grid_hw_[0] * detector.grid_hw_[1]
    memory, dim = detector.memory_bank_.shape
    search_flops = 2 * queries * memory * dim

    def rate(flops: float, s: float) -> str:
        return f"{flops / s / 1e9:6.1f} GFLOP/s = {flops / s / 1e9 / limit.gflops:.3f} of the limit"

    print(f"\nfit {fit_s:.3f} s; coreset {coreset_s:.3f} s ({n_select} of {n_points} x {dim})")
    print(f"  greedy steps {steps_s:.3f} s: {rate(step_flops, steps_s)}")
    print(f"    = {step_flops / steps_s / 1e9 / matvec:.3f} of the step's sgemv alone "
          f"({matvec:.1f} GFLOP/s on {active_rows} x {dim}, cache-resident)")  # fmt: skip
    print(f"  refreshes and rest {coreset_s - steps_s:.3f} s: "
          f"{rate(refresh_flops, coreset_s - steps_s)}")  # fmt: skip
    print(f"  whole coreset: {rate(step_flops + refresh_flops, coreset_s)}")
    print(f"\nscore {score_s:.3f} s ({queries} queries x {memory} memory x {dim}: "
          f"{search_flops / 1e9:.1f} GFLOP)")  # fmt: skip
    features_s, search_s = seconds["patch features"], seconds["search"]
    candidates_s, exact_s = seconds["candidates"], seconds["exact differences"]
    products_s = seconds["products"]
    if candidates_s == 0:  # a version without CandidateSearch: all but the exact differences
        candidates_s = search_s - exact_s
    for label, s in [
        ("patch features", features_s),
        ("  of which the projection", seconds["projection"]),
        ("exact search", search_s),
        ("  candidate products (BLAS)", products_s),
        ("  candidate selection (group minima, threshold)", candidates_s - products_s),
        ("  exact_sq_distances (older code)", exact_s),
        ("  rest: exact differences, the k nearest", search_s - candidates_s - exact_s),
        ("rest of the scoring", score_s - features_s - search_s),
    ]:
        print(f"  {label:50s} {s:7.3f} s  {s / score_s:6.1%}")
    print(f"  products alone: {rate(search_flops, products_s)}")
    print(f"  search alone:  {rate(search_flops, search_s)}")
    print(f"  whole scoring: {rate(search_flops, score_s)}")
    coreset_fraction = (step_flops + refresh_flops) / coreset_s / 1e9 / limit.gflops
    print(f"coreset_fraction_of_limit: {coreset_fraction:.3f}")
    print(f"scoring_fraction_of_limit: {search_flops / score_s / 1e9 / limit.gflops:.3f}")


if __name__ == "__main__":
    main()
