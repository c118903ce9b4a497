"""Helpers for tests that run the workflow: a tiny configuration, a Snakemake call, the jobs a
dry run plans, and a comparison of two runs' results by content (never by mtime)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
# Measured wall times, not results: they differ between any two runs.
TIMING = re.compile(r"_seconds$")
# What the workflow computes, compared file by file; logs and plots are not results.
RESULT_SUFFIXES = {".h5", ".csv", ".parquet", ".json"}
SKIPPED_FOLDERS = {"logs", "plots", "data"}


def tiny_config() -> dict:
    """config/synthetic.yaml cut down to one category, one seed and two detectors; 20 training
    images, so that one fold of five still holds KNN's 3 neighbours."""
    config = yaml.safe_load((REPO / "config" / "synthetic.yaml").read_text())
    config["dataset"]["categories"] = config["dataset"]["categories"][:1]
    config["dataset"]["synthetic"].update(image_size=64, n_train=20, n_test_good=4)
    config["dataset"]["synthetic"]["n_test_per_defect"] = 3
    config["pollution"]["seeds"] = [0]
    config["pollution"]["ratios"] = [0.0, 0.2]
    config["backbone"]["input_size"] = 96
    config["detectors"] = [d for d in config["detectors"] if d["name"] in ("knn", "mahalanobis")]
    next(d for d in config["detectors"] if d["name"] == "knn")["params"] = {"n_neighbors": 3}
    config["refinement"]["ratios"] = [0.0, 0.2]
    # The paper's strategies: these tests are about execution, not about what goes beyond it.
    config["refinement"]["strategies"] = [
        "sroc", "random", "cross_validation", "stoc", "oracle", "by_refiner",
    ]  # fmt: skip
    return config


def detector_entry(config: dict, name: str) -> dict:
    """The configuration of detector ``name``."""
    return next(d for d in config["detectors"] if d["name"] == name)


def snakemake(
    workdir: Path, config: dict, *args: str, check: bool = True, timeout: float | None = None
):
    """Run the workflow in ``workdir`` with ``config`` and ``args``; the completed process."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        snakemake_command(workdir, config_path, *args),
        capture_output=True, text=True, env=os.environ.copy(), timeout=timeout,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout}\n{result.stderr}")
    return result


def snakemake_command(workdir: Path, config_path: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir), "--configfile", str(config_path), *args,
    ]  # fmt: skip


def planned_jobs(workdir: Path, config: dict, *args: str) -> list[tuple[str, dict]]:
    """The jobs a dry run plans, as (rule, wildcards), the target rule ``all`` left out."""
    result = snakemake(workdir, config, "--dry-run", "--cores", "1", *args)
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", result.stdout):
        header = re.match(r"(?:local)?rule (\w+):", block)
        if header is None or header.group(1) == "all":
            continue
        found = re.search(r"^\s+wildcards: (.*)$", block, flags=re.MULTILINE)
        wildcards = dict(
            item.split("=", 1) for item in found.group(1).split(", ")
        ) if found else {}  # fmt: skip
        jobs.append((header.group(1), wildcards))
    return jobs


def result_files(workdir: Path) -> dict[str, Path]:
    """Every result file of a run, by its path under results/."""
    root = workdir / "results"
    return {
        str(path.relative_to(root)): path
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and path.suffix in RESULT_SUFFIXES
        and not path.name.startswith(".")
        and not SKIPPED_FOLDERS & set(path.relative_to(root).parts[1:-1])
    }


def assert_same_results(first: Path, second: Path) -> int:
    """Assert two runs wrote the same result files with equal contents; the number compared."""
    files_a, files_b = result_files(first), result_files(second)
    assert files_a.keys() == files_b.keys(), set(files_a) ^ set(files_b)
    for name, path in files_a.items():
        assert_same_file(path, files_b[name], name, roots=(first, second))
    return len(files_a)


def assert_same_file(
    first: Path, second: Path, name: str, roots: tuple[Path, Path] | None = None
) -> None:
    """Assert two result files hold the same data, whatever their bytes. Timings are left out;
    paths inside the runs' folders (``roots``) are compared relative to them."""
    compare = {".h5": _compare_hdf5, ".json": _compare_json}.get(first.suffix, _compare_table)
    # A copied run's files may name the folder it was copied from: either root reads "<run>".
    relative = _relative_to(roots or ())
    compare(first, second, name, (relative, relative))


def _relative_to(roots):
    """A function that writes the paths under ``roots`` in a value relative to them."""
    prefixes = sorted({str(p) for root in roots for p in (Path(root), Path(root).resolve())})

    def relative(value):
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str):
            for prefix in prefixes[::-1]:  # a path before its own prefix
                value = value.replace(prefix, "<run>")
            return value
        if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
            return np.array([relative(item) for item in value.ravel()], dtype=object).reshape(
                value.shape
            )
        return value

    return relative


def _compare_table(first: Path, second: Path, name: str, relative) -> None:
    read = pd.read_parquet if first.suffix == ".parquet" else pd.read_csv
    table_a, table_b = read(first), read(second)
    for table, to_relative in zip((table_a, table_b), relative, strict=True):
        for column in table.select_dtypes(include=["object", "string"]).columns:
            table[column] = table[column].map(to_relative)
    kept = [column for column in table_a.columns if not TIMING.search(str(column))]
    assert list(table_a.columns) == list(table_b.columns), name
    pd.testing.assert_frame_equal(table_a[kept], table_b[kept], check_exact=True, obj=name)


def _compare_json(first: Path, second: Path, name: str, relative) -> None:
    pairs = zip((first, second), relative, strict=True)
    texts = [to_relative(path.read_text()) for path, to_relative in pairs]
    assert json.loads(texts[0]) == json.loads(texts[1]), name


def _compare_hdf5(first: Path, second: Path, name: str, relative) -> None:
    with h5py.File(first, "r") as file_a, h5py.File(second, "r") as file_b:
        items_a, items_b = _hdf5_items(file_a), _hdf5_items(file_b)
        assert items_a.keys() == items_b.keys(), f"{name}: {set(items_a) ^ set(items_b)}"
        for key, (attrs_a, data_a) in items_a.items():
            attrs_b, data_b = items_b[key]
            where = f"{name}:{key}"
            assert attrs_a.keys() == attrs_b.keys(), where
            for attr, value in attrs_a.items():
                if not TIMING.search(attr):
                    same = _equal(relative[0](value), relative[1](attrs_b[attr]))
                    assert same, f"{where} attribute {attr}"
            assert _equal(relative[0](data_a), relative[1](data_b)), f"{where} data differ"


def _hdf5_items(file: h5py.File) -> dict[str, tuple[dict, object]]:
    items = {"/": (dict(file.attrs), None)}

    def visit(path, obj):
        data = obj[()] if isinstance(obj, h5py.Dataset) else None
        items[path] = (dict(obj.attrs), data)

    file.visititems(visit)
    return items


def _equal(a, b) -> bool:
    if a is None or b is None:
        return a is b
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    if a.dtype.kind == "O":
        return all(
            x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
            for x, y in zip(a.ravel(), b.ravel(), strict=True)
        )
    return bool(np.array_equal(a, b))
