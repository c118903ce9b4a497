"""``sroc clean`` and ``sroc.clean``: an unlabelled folder in, suspects, lists and a report out."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import sroc
from sroc.clean import (
    DEFAULT_DETECTOR,
    CleanError,
    copy_images,
    detector_factory,
    list_images,
    run_clean,
)
from sroc.cli import main
from sroc.datasets import make_synthetic_dataset
from sroc.refinement import sroc_ranking

SHARED_DATA = next(
    (p / "shared" / "data" for p in Path(__file__).resolve().parents if (p / "shared").is_dir()),
    None,
)
BACKBONE = {"name": "tf_efficientnet_lite0", "input_size": 128, "batch_size": 8}
CLI_BACKBONE = ["--backbone", "tf_efficientnet_lite0", "--input-size", "128"]
N_TRAIN = 40
N_DEFECTIVE = 4  # 10 % of the training images


@pytest.fixture(scope="module", autouse=True)
def onnx_cache(tmp_path_factory):
    """Exported ONNX models go to a temporary folder, not the user's cache."""
    previous = os.environ.get("SROC_CACHE_DIR")
    os.environ["SROC_CACHE_DIR"] = str(tmp_path_factory.mktemp("sroc-cache"))
    yield
    if previous is None:
        del os.environ["SROC_CACHE_DIR"]
    else:
        os.environ["SROC_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def polluted_folder(tmp_path_factory) -> tuple[Path, set[str]]:
    """A synthetic category's training set with 10 % of it replaced by defective images, in
    nested folders and in png, bmp and tif files; returns the folder and the defective paths."""
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic") / "data",
        categories=["stripe_texture"],
        seed=1,
        image_size=128,
        n_train=N_TRAIN,
        n_test_good=0,
        n_test_per_defect=2,
    )
    category = root / "stripe_texture"
    folder = tmp_path_factory.mktemp("line") / "images"
    goods = sorted((category / "train" / "good").glob("*.png"))[N_DEFECTIVE:]
    for number, path in enumerate(goods):
        suffix = (".png", ".bmp", ".tif")[number % 3]
        target = folder / f"day{number % 2}" / f"part_{path.stem}{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).save(target)
    defective = set()
    for path in sorted(p for p in (category / "test").glob("*/*.png"))[:N_DEFECTIVE]:
        target = folder / "day0" / f"part_{path.parent.name}_{path.stem}.png"
        shutil.copy(path, target)
        defective.add(str(target))
    return folder, defective


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folder``: its modification time and content hash."""
    return {
        str(path): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# --------------------------------------------------------------------------------------------
# Ranking against a brute-force reference


def test_default_ranking_is_leave_one_out_knn_with_ties_by_id():
    rng = np.random.default_rng(0)
    features = {"a": rng.normal(size=(12, 3, 2, 2)).astype(np.float32)}
    features["a"][7] = features["a"][3]  # a tie: identical images score alike
    ids = np.array([f"img{i:02d}" for i in range(12)])
    factory = detector_factory(DEFAULT_DETECTOR, None, threads=1, random_state=0, exclude_self=True)
    ranking = sroc_ranking(features, ids, factory)
    pooled = features["a"].astype(np.float64).mean(axis=(2, 3))
    distances = np.linalg.norm(pooled[:, None] - pooled[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    expected = np.sort(distances, axis=1)[:, :5].mean(axis=1)
    np.testing.assert_allclose(ranking.scores, expected, rtol=1e-6)
    order = ranking.order.tolist()
    assert sorted(order) == list(range(12))
    assert np.all(np.diff(ranking.scores[ranking.order]) <= 1e-12)
    assert order.index(3) < order.index(7)


# --------------------------------------------------------------------------------------------
# End to end


def test_cli_end_to_end_flags_the_defective_images(polluted_folder, tmp_path, capsys):
    folder, defective = polluted_folder
    before = snapshot(folder)
    out, copy = tmp_path / "out", tmp_path / "kept"
    ratio = str(N_DEFECTIVE / N_TRAIN)
    args = ["clean", str(folder), "--out", str(out), *CLI_BACKBONE, "--threads", "2", "--quiet"]
    assert main([*args, "--ratio", ratio, "--copy-clean", str(copy)]) == 0
    assert snapshot(folder) == before

    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns) == ["path", "score", "rank", "suspect"]
    assert set(scores["path"]) == {str(p) for p in list_images(folder)} and len(scores) == N_TRAIN
    assert scores["rank"].tolist() == list(range(1, N_TRAIN + 1))
    assert scores["score"].is_monotonic_decreasing
    suspects = set(scores.loc[scores["suspect"], "path"])
    assert scores.loc[scores["suspect"], "rank"].max() == len(suspects) == N_DEFECTIVE
    found = len(suspects & defective) / len(defective)
    with capsys.disabled():
        print(f"\nfixed ratio {ratio}: {found:.0%} of the defective images are suspects")
    assert found >= 0.8
    assert (out / "suspects.txt").read_text().splitlines() == scores.loc[
        scores["suspect"], "path"
    ].tolist()
    kept = (out / "clean.txt").read_text().splitlines()
    assert set(kept) == set(scores["path"]) - suspects

    report = (out / "report.html").read_text()
    for path in suspects:
        assert path in report
    assert not re.search(r"""src=["'](?!data:)""", report), "the report must be self-contained"
    assert "histogram" in report and "tf_efficientnet_lite0" in report

    copied = {str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()}
    assert copied == {str(Path(p).relative_to(folder)) for p in kept}
    some = Path(kept[0])
    assert (copy / some.relative_to(folder)).read_bytes() == some.read_bytes()

    # A second run (ratio auto, the default) reuses the embedding cache.
    cache_files = sorted((out / "cache").glob("*.h5"))
    assert len(cache_files) == 1
    cache_mtime = cache_files[0].stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert sorted((out / "cache").glob("*.h5")) == cache_files
    assert cache_files[0].stat().st_mtime_ns == cache_mtime
    auto = pd.read_csv(out / "scores.csv")
    auto_suspects = set(auto.loc[auto["suspect"], "path"])
    with capsys.disabled():
        print(
            f"\nratio auto: {len(auto_suspects)} suspects, {len(auto_suspects & defective)} of "
            f"the {len(defective)} defective images"
        )
    assert auto[["path", "score"]].equals(scores[["path", "score"]])
    assert snapshot(folder) == before


def test_python_api_is_exported_and_notes_mixed_sizes_and_skipped_files(polluted_folder, tmp_path):
    folder, _ = polluted_folder
    paths = [tmp_path / f"{i}.png" for i in range(11)]
    sources = list_images(folder)[:11]
    for number, (source, path) in enumerate(zip(sources, paths, strict=True)):
        image = Image.open(source)
        (image.resize((100, 80)) if number < 3 else image).save(path)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(paths[5].read_bytes()[:200])
    given = [*paths, corrupt]

    with pytest.raises(CleanError, match=r"(?s)1 image\(s\) cannot be read.*corrupt\.png"):
        sroc.clean(given, ratio=0.1, backbone=BACKBONE, progress=False)

    run = run_clean(given, ratio=0.1, backbone=BACKBONE, skip_bad=True, progress=False)
    assert [path for path, _ in run.skipped] == [str(corrupt)]
    assert len(run.frame) == 11 and run.frame["suspect"].sum() == 1
    assert any("2 sizes" in note for note in run.notes)
    frame = sroc.clean(given, ratio=0.1, backbone=BACKBONE, skip_bad=True, progress=False)
    assert frame[["path", "score", "rank", "suspect"]].equals(
        run.frame[["path", "score", "rank", "suspect"]]
    )
    assert any("2 sizes" in note for note in frame.attrs["notes"])


# --------------------------------------------------------------------------------------------
# Errors


def test_empty_folder_and_too_few_images_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    assert main(["clean", str(empty), "--out", str(tmp_path / "out")]) == 2
    assert "no image" in capsys.readouterr().err

    few = tmp_path / "few"
    few.mkdir()
    for i in range(9):
        Image.fromarray(np.full((16, 16, 3), i * 20, np.uint8)).save(few / f"{i}.png")
    assert main(["clean", str(few), "--out", str(tmp_path / "out"), *CLI_BACKBONE]) == 2
    assert "only 9 readable image(s)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.csv"))


def test_inputs_are_never_written(polluted_folder, tmp_path, capsys):
    folder, _ = polluted_folder
    for option in (
        ["--out", str(folder / "out")],
        ["--out", str(tmp_path), "--cache-dir", str(folder / "day0" / "cache")],
        ["--out", str(tmp_path), "--copy-clean", str(folder / "kept")],
    ):
        assert main(["clean", str(folder), *option]) == 2
        assert "inside IMAGES_DIR" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(["clean", str(folder), "--out", str(tmp_path), "--copy-clean", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(CleanError, match="already exists"):
        copy_images([], folder, existing)


@pytest.mark.parametrize(
    "ratio, message", [("often", "neither"), (0.7, "outside"), (-0.1, "outside")]
)
def test_bad_ratio_is_refused(polluted_folder, ratio, message):
    folder, _ = polluted_folder
    with pytest.raises(CleanError, match=message):
        run_clean(list_images(folder), ratio=ratio, progress=False)


def test_copy_keeps_relative_paths_and_times_and_leaves_nothing_on_failure(tmp_path):
    source = tmp_path / "source"
    (source / "a").mkdir(parents=True)
    files = [source / "a" / "1.png", source / "2.png"]
    for path in files:
        path.write_bytes(path.name.encode())
    os.utime(files[0], ns=(1_000_000_000, 1_000_000_000))
    copied = copy_images(files, source, tmp_path / "kept")
    assert (copied / "a" / "1.png").read_bytes() == b"1.png"
    assert (copied / "a" / "1.png").stat().st_mtime_ns == 1_000_000_000
    with pytest.raises(FileNotFoundError):
        copy_images([*files, source / "missing.png"], source, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "source"]


# --------------------------------------------------------------------------------------------
# Real data


@pytest.mark.shared
@pytest.mark.skipif(SHARED_DATA is None, reason="../shared/data is absent")
def test_real_data_suspects_beat_random_selection(tmp_path, capsys):
    """10 % pollution of the piped paper category hardest for KNN in docs/clean.md: 45 healthy
    images and 5 with impurities. Random selection finds 10 % defective among its picks."""
    category = "PA_FVN01_TL"
    root = SHARED_DATA / "piped" / category
    healthy = sorted((root / "train" / "good").glob("*")) + sorted(
        (root / "test" / "good").glob("*")
    )
    defective = sorted((root / "test" / "impurity").glob("*"))[::9][:5]
    paths = healthy[:45] + defective
    truth = len(defective) / len(paths)
    for ratio in (truth, "auto"):
        frame = sroc.clean(
            paths, ratio=ratio, backbone=BACKBONE, cache_dir=tmp_path, threads=2, progress=False
        )
        suspects = frame.loc[frame["suspect"], "path"]
        share = suspects.isin([str(p) for p in defective]).mean() if len(suspects) else np.nan
        with capsys.disabled():
            print(f"\n{category} ratio {ratio}: {len(suspects)} suspects, {share:.0%} defective")
        if ratio == truth:
            assert share >= 3 * truth
