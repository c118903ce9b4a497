"""Fit plus score time and memory of every detector, and PatchCore's IVF recall, on real data.

For each ``--category`` (default: magnetic_tile and the piped category PA_BDP01_TL from
../shared/data), ``--n-train`` random training goods and ``--n-test`` random test images (all of
them when fewer exist) are embedded once with the default backbone (tf_efficientnet_lite2,
380 px) into an embedding cache under ``--cache-dir`` (reused by later runs). Then:

- each detector, with its default hyper-parameters and ``--threads`` threads, is fitted and
  scores the test images in a fresh process, which reports wall times and its peak resident
  memory next to ``estimate_memory_mb`` (what the workflow declares as mem_mb);
- PatchCore's IVFFlat search is compared with exact search (faiss IndexFlatL2) on
  ``--recall-queries`` random test patches: recall@5 (the fraction of the 5 exact nearest
  memory patches that IVF returns) and the speed-up of IVF over exact search, for the default
  ``n_probes`` and a few others.

The machine is shared: times are noisy; ratios are measured within one run. The last line is
``min_ivf_recall: <x>``, the smallest recall@5 at the default ``n_probes`` over the categories.

    .venv/bin/python benchmarks/detectors.py [--category magnetic_tile/magnetic_tile ...]
    .venv/bin/python benchmarks/detectors.py --quick   # tiny synthetic images, seconds
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sroc.backbones import BackboneConfig
from sroc.datasets import make_synthetic_dataset
from sroc.datasets.layout import index_category
from sroc.detectors import (
    DETECTORS,
    INTERPRETER_OVERHEAD_MB,
    PatchCoreDetector,
    estimate_memory_mb,
    make_detector,
)
from sroc.embeddings import build_cache
from sroc.feature_cache import cache_shapes, load_features

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_CATEGORIES = ("magnetic_tile/magnetic_tile", "piped/PA_BDP01_TL")
PROBE_SWEEP = (4, 8, 16, 24, 32, 48)


def subset_cache(
    data_root: Path,
    dataset_category: str,
    n_train: int,
    n_test: int,
    seed: int,
    cache_dir: Path,
    config: BackboneConfig,
) -> tuple[Path, list[str], list[str]]:
    """Embed a seeded random subset of one category once; return the cache and the ids."""
    dataset, category = dataset_category.split("/")
    index = index_category(data_root / dataset, category, verify_pixels=False)
    rng = np.random.default_rng(seed)
    train = index[index["origin"] == "train"]
    test = index[index["origin"] == "test"]
    train = train.iloc[np.sort(rng.choice(len(train), min(n_train, len(train)), replace=False))]
    test = test.iloc[np.sort(rng.choice(len(test), min(n_test, len(test)), replace=False))]
    subset = pd.concat([train, test]).sort_values("image_id").reset_index(drop=True)
    path = cache_dir / f"{dataset}-{category}-{len(train)}-{len(test)}-seed{seed}-{config.tag()}.h5"
    if not path.exists():
        build_cache(subset, path, config, threads=2, progress=False)
    return path, train["image_id"].tolist(), test["image_id"].tolist()


def split_features(cache: Path, train_ids: list[str], test_ids: list[str]):
    features, _ = load_features(cache, train_ids + test_ids)
    n = len(train_ids)
    return {s: a[:n] for s, a in features.items()}, {s: a[n:] for s, a in features.items()}


def memory_status_mb(field: str) -> float:
    """A memory figure of this process from /proc (VmRSS: now, VmHWM: peak since exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def time_detector(name: str, cache: str, train_ids, test_ids, threads: int, queue) -> None:
    """Child process: fit and score one detector; report times and memory."""
    train, test = split_features(Path(cache), train_ids, test_ids)
    loaded_mb = memory_status_mb("VmRSS")
    detector = make_detector(name, n_jobs=threads)
    started = time.perf_counter()
    detector.fit(train)
    fitted = time.perf_counter()
    scores, maps = detector.score(test)
    done = time.perf_counter()
    assert np.isfinite(scores).all() and np.isfinite(maps).all(), name
    queue.put((fitted - started, done - fitted, loaded_mb, memory_status_mb("VmHWM"), maps.shape))


def timing_table(cache: Path, train_ids, test_ids, threads: int, names) -> pd.DataFrame:
    """One fresh process per detector, so that each peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    _, shapes = cache_shapes(cache)
    inputs_mb = (
        (len(train_ids) + len(test_ids)) * sum(np.prod(chw) for chw in shapes.values()) * 4 / 2**20
    )
    rows = []
    for name in names:
        queue = context.Queue()
        child = context.Process(
            target=time_detector, args=(name, str(cache), train_ids, test_ids, threads, queue)
        )
        child.start()
        fit_s, score_s, loaded_mb, peak_mb, map_shape = queue.get()
        child.join()
        estimate = estimate_memory_mb(name, {}, len(train_ids), len(test_ids), shapes)
        rows.append(
            {
                "detector": name,
                "fit_s": round(fit_s, 1),
                "score_s": round(score_s, 1),
                "total_s": round(fit_s + score_s, 1),
                "map": "x".join(map(str, map_shape[1:])),
                "peak_rss_mb": round(peak_mb),
                "estimate_mb": round(estimate),
                # What fit and score added above the loaded features, against the estimate of
                # the detector's own state and scratch space.
                "detector_mb": round(peak_mb - loaded_mb),
                "estimate_detector_mb": round(estimate - INTERPRETER_OVERHEAD_MB - inputs_mb),
            }
        )
    return pd.DataFrame(rows)


def ivf_recall(cache: Path, train_ids, test_ids, threads: int, n_queries: int, seed: int):
    """Recall@5 and speed-up of IVFFlat over exact search on random test patches."""
    train, test = split_features(cache, train_ids, test_ids)
    ivf = PatchCoreDetector(n_jobs=threads, random_state=seed)
    started = time.perf_counter()
    ivf.fit(train)
    ivf_fit_s = time.perf_counter() - started
    exact = PatchCoreDetector(index="flat", n_jobs=threads).fit(train)
    patches = ivf.patch_features(test)
    rng = np.random.default_rng(seed)
    queries = patches[np.sort(rng.choice(len(patches), min(n_queries, len(patches)), False))]
    started = time.perf_counter()
    _, exact_ids = exact.kneighbors(queries)
    exact_s = time.perf_counter() - started
    default_probes = ivf.n_probes
    rows = []
    for n_probes in sorted({*PROBE_SWEEP, default_probes}):
        ivf.set_params(n_probes=n_probes)
        started = time.perf_counter()
        _, ids = ivf.kneighbors(queries)
        ivf_s = time.perf_counter() - started
        recall = np.mean(
            [len(set(a) & set(b)) / len(a) for a, b in zip(ids, exact_ids, strict=True)]
        )
        rows.append(
            {
                "n_probes": n_probes,
                "default": n_probes == default_probes,
                "recall_at_5": round(float(recall), 4),
                "ivf_s": round(ivf_s, 2),
                "exact_s": round(exact_s, 2),
                "speed_up": round(exact_s / ivf_s, 1),
            }
        )
    info = {
        "memory_patches": ivf.memory_bank_.shape[0],
        "dim": ivf.memory_bank_.shape[1],
        "n_lists": ivf.n_lists_,
        "queries": len(queries),
        "ivf_fit_s": round(ivf_fit_s, 1),
    }
    return pd.DataFrame(rows), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--category",
        nargs="+",
        default=list(DEFAULT_CATEGORIES),
        help="dataset/category under --data-root",
    )
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
    parser.add_argument("--recall-queries", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=REPO / "results" / "benchmarks")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny synthetic category at 64 px, embedded at 64 px: checks it runs, in seconds",
    )
    args = parser.parse_args()
    config = BackboneConfig()
    with tempfile.TemporaryDirectory(prefix="sroc-bench-") as scratch:
        if args.quick:
            config = BackboneConfig(input_size=64)
            make_synthetic_dataset(
                Path(scratch) / "synthetic",
                ["grid_texture"],
                image_size=64,
                n_train=12,
                n_test_good=2,
                n_test_per_defect=2,
                defect_types=["spot"],
            )
            args.data_root, args.category = Path(scratch), ["synthetic/grid_texture"]
            args.cache_dir, args.recall_queries = Path(scratch) / "cache", 200
        if not args.data_root.is_dir():
            raise SystemExit(f"{args.data_root} not found: pass --data-root with the real datasets")
        run(args, config)


def run(args: argparse.Namespace, config: BackboneConfig) -> None:

    recalls = []
    for dataset_category in args.category:
        cache, train_ids, test_ids = subset_cache(
            args.data_root,
            dataset_category,
            args.n_train,
            args.n_test,
            args.seed,
            args.cache_dir,
            config,
        )
        print(
            f"\n## {dataset_category}: {len(train_ids)} train, {len(test_ids)} test images, "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
            f"{args.threads} threads, cache {cache.name}\n",
            flush=True,
        )
        table = timing_table(cache, train_ids, test_ids, args.threads, args.detectors)
        print(table.to_markdown(index=False))
        print(f"\n(load average over the last minute: {os.getloadavg()[0]:.1f})", flush=True)
        sweep, info = ivf_recall(
            cache, train_ids, test_ids, args.threads, args.recall_queries, args.seed
        )
        print(f"\nPatchCore IVFFlat vs exact IndexFlatL2: {info}\n")
        print(sweep.to_markdown(index=False), flush=True)
        recalls.append(float(sweep.loc[sweep["default"], "recall_at_5"].iloc[0]))
    print(f"\nmin_ivf_recall: {min(recalls):.4f}")


if __name__ == "__main__":
    main()
