"""Embedding cache: round trip against a direct forward pass, atomicity, errors, reading."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sroc import embeddings
from sroc.backbones import BackboneConfig, create_model
from sroc.datasets.layout import DatasetError, index_category
from sroc.embeddings import build_cache
from sroc.feature_cache import (
    IncompleteCacheError,
    cache_shapes,
    load_features,
    read_cache_index,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CONFIG = BackboneConfig(name="tf_efficientnet_lite0", input_size=64, batch_size=4)

# (origin/defect_type, file name, height, width, mode): varied sizes, gray JPEG and RGB PNG.
IMAGES = [
    ("train/good", "000.png", 48, 64, "RGB"),
    ("train/good", "001.png", 64, 64, "RGB"),
    ("train/good", "002.jpg", 70, 50, "L"),
    ("train/good", "003.png", 33, 90, "RGB"),
    ("train/good", "004.png", 64, 80, "RGB"),
    ("test/good", "000.png", 64, 64, "RGB"),
    ("test/good", "001.jpg", 40, 40, "L"),
    ("test/scratch", "000.png", 64, 64, "RGB"),
    ("test/scratch", "001.png", 50, 60, "RGB"),
    ("test/stain", "000.png", 64, 48, "RGB"),
    ("test/stain", "001.png", 45, 45, "RGB"),
]


def write_category(root: Path, category: str = "widget") -> Path:
    rng = np.random.default_rng(0)
    for folder, name, height, width, mode in IMAGES:
        path = root / category / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        channels = 3 if mode == "RGB" else 1
        pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        # Smooth texture plus noise, so features are not those of pure noise.
        ramp = np.linspace(0, 120, width, dtype=np.float64)[None, :, None]
        pixels = np.clip(pixels * 0.5 + ramp, 0, 255).astype(np.uint8)
        Image.fromarray(pixels.squeeze(axis=2) if channels == 1 else pixels, mode).save(path)
        if not folder.endswith("good"):
            mask = np.zeros((height, width), np.uint8)
            mask[5:15, 5:20] = 255
            mask_path = root / category / "ground_truth" / folder.split("/")[1] / name
            mask_path = mask_path.with_name(f"{Path(name).stem}_mask.png")
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(mask_path)
    return root


def reference_features(paths, config: BackboneConfig) -> dict[str, np.ndarray]:
    """Independent forward pass: PIL decode + whole-image bicubic resize + (x - 0.5) / 0.5 into
    the unmodified timm model, stage outputs taken with forward hooks."""
    model = create_model(config)
    captured: dict[str, list] = {stage: [] for stage in config.stages}
    for stage in config.stages:
        model.get_submodule(stage).register_forward_hook(
            lambda module, args, output, stage=stage: captured[stage].append(output.numpy())
        )
    size = config.input_size
    for path in paths:
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
        pixels = (np.asarray(resized, np.float32) / 255.0 - 0.5) / 0.5
        with torch.no_grad():
            model(torch.from_numpy(pixels.transpose(2, 0, 1)[None].copy()))
    return {stage: np.concatenate(values) for stage, values in captured.items()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    root = write_category(tmp_path_factory.mktemp("data"))
    return root, index_category(root, "widget")


@pytest.fixture(scope="module")
def built(dataset, onnx_dir, tmp_path_factory) -> Path:
    _, index = dataset
    path = tmp_path_factory.mktemp("cache") / "widget" / f"{CONFIG.tag()}.h5"
    build_cache(index, path, CONFIG, threads=2, progress=False, onnx_dir=onnx_dir)
    return path


def test_round_trip_equals_direct_forward_pass(dataset, built):
    _, index = dataset
    features, metadata = load_features(built)
    reference = reference_features(index["path"], CONFIG)
    assert list(features) == ["blocks.2", "blocks.4", "blocks.5"]
    for stage, values in features.items():
        assert values.dtype == np.float32
        assert values.shape == reference[stage].shape == (len(index), *values.shape[1:])
        np.testing.assert_allclose(values, reference[stage], rtol=1e-3, atol=1e-3)
        assert np.abs(reference[stage]).max() > 1
    assert metadata["image_id"].tolist() == index["image_id"].tolist()


def test_cache_layout_and_metadata(dataset, built):
    _, index = dataset
    with h5py.File(built, "r") as h5:
        assert h5.attrs["complete"] == 1
        assert h5.attrs["config_hash"] == CONFIG.config_hash()
        assert json.loads(h5.attrs["backbone_config"]) == CONFIG.to_dict()
        assert h5.attrs["runtime"] == "onnxruntime"
        for stage, dataset_ in h5["features"].items():
            assert dataset_.dtype == np.float16
            assert dataset_.chunks == (1, *dataset_.shape[1:]), stage
        assert h5["images/label"].dtype == np.int8
        assert h5["images/height"].dtype == np.int32
    metadata = read_cache_index(built)
    expected_sizes = {
        f"{folder}/{Path(name).stem}": (height, width) for folder, name, height, width, _ in IMAGES
    }
    for column in ("image_id", "category", "origin", "defect_type", "label", "mask_path", "path"):
        assert metadata[column].tolist() == index[column].tolist(), column
    sizes = list(zip(metadata["height"], metadata["width"], strict=True))
    assert sizes == [expected_sizes[image_id] for image_id in metadata["image_id"]]
    assert cache_shapes(built) == (
        len(IMAGES),
        {"blocks.2": (40, 8, 8), "blocks.4": (112, 4, 4), "blocks.5": (192, 2, 2)},
    )


def test_load_subset_in_requested_order(built):
    everything, metadata = load_features(built)
    ids = metadata["image_id"].tolist()
    wanted = [ids[7], ids[0], ids[1], ids[2], ids[9], ids[4]]
    features, rows = load_features(built, image_ids=wanted, stages=["blocks.5", "blocks.2"])
    assert list(features) == ["blocks.2", "blocks.5"]  # stored (finest-first) order
    assert rows["image_id"].tolist() == wanted
    positions = [ids.index(image_id) for image_id in wanted]
    for stage, values in features.items():
        np.testing.assert_array_equal(values, everything[stage][positions])
    with pytest.raises(KeyError, match="test/good/999"):
        load_features(built, image_ids=["test/good/999"])
    with pytest.raises(KeyError, match="blocks.3"):
        load_features(built, stages=["blocks.3"])
    with pytest.raises(ValueError, match="repeat"):
        load_features(built, image_ids=[ids[0], ids[0]])


def test_onnx_model_is_cached_and_reused(dataset, built, onnx_dir, tmp_path):
    _, index = dataset
    exported = onnx_dir / f"{CONFIG.tag()}.onnx"
    stamp = exported.stat().st_mtime_ns
    build_cache(index.iloc[:3], tmp_path / "again.h5", CONFIG, progress=False, onnx_dir=onnx_dir)
    assert exported.stat().st_mtime_ns == stamp
    assert load_features(tmp_path / "again.h5")[1]["image_id"].tolist() == list(
        index["image_id"][:3]
    )


def test_float32_torch_cache_agrees(dataset, built, tmp_path):
    _, index = dataset
    config = dataclasses.replace(CONFIG, feature_dtype="float32", runtime="torch", batch_size=5)
    path = tmp_path / "f32.h5"
    build_cache(index, path, config, progress=False)
    with h5py.File(path, "r") as h5:
        assert h5.attrs["runtime"] == "torch"
        assert all(d.dtype == np.float32 for d in h5["features"].values())
    full, _ = load_features(path)
    half, _ = load_features(built)
    for stage in full:
        np.testing.assert_allclose(half[stage], full[stage], rtol=1e-3, atol=1e-3)


def test_corrupt_image_fails_with_its_name_and_leaves_nothing(dataset, tmp_path, onnx_dir):
    root, index = dataset
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(index["path"][5]).read_bytes()[:200])  # truncated PNG
    corrupt = index.copy()
    corrupt.loc[5, "path"] = str(broken)
    target = tmp_path / "out" / "cache.h5"
    with pytest.raises(DatasetError, match="broken.png"):
        build_cache(corrupt, target, CONFIG, progress=False, onnx_dir=onnx_dir)
    assert not target.exists() and leftovers(target.parent) == []


def test_failure_mid_way_leaves_no_cache_and_next_run_completes(
    dataset, tmp_path, onnx_dir, monkeypatch
):
    _, index = dataset
    real_select = embeddings.select_runner
    calls = []

    def failing_select(*args, **kwargs):
        runner, runtime, outputs = real_select(*args, **kwargs)

        def failing_runner(batch):
            calls.append(len(batch))
            raise RuntimeError("injected failure after the first batch")

        return failing_runner, runtime, outputs

    target = tmp_path / "cache.h5"
    monkeypatch.setattr(embeddings, "select_runner", failing_select)
    with pytest.raises(RuntimeError, match="injected"):
        build_cache(index, target, CONFIG, progress=False, onnx_dir=onnx_dir)
    assert calls[0] == 4  # failed on the second batch, after the first was written
    assert not target.exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(embeddings, "select_runner", real_select)
    build_cache(index, target, CONFIG, progress=False, onnx_dir=onnx_dir)
    assert load_features(target)[1]["image_id"].tolist() == index["image_id"].tolist()


KILLED_BUILD = textwrap.dedent(
    """
    import sys, time
    import pandas as pd
    import sroc.datasets.layout
    from sroc.backbones import BackboneConfig
    from sroc.embeddings import build_cache

    read_image = sroc.datasets.layout.read_image

    def slow_read(path):
        time.sleep(0.4)
        return read_image(path)

    sroc.datasets.layout.read_image = slow_read
    config = BackboneConfig(name="tf_efficientnet_lite0", input_size=64, batch_size=2)
    build_cache(pd.read_pickle(sys.argv[1]), sys.argv[2], config, progress=False,
                onnx_dir=sys.argv[3])
    """
)


def test_killed_build_is_refused_and_rebuilt(dataset, tmp_path, onnx_dir):
    _, index = dataset
    index.to_pickle(tmp_path / "index.pkl")
    target = tmp_path / "cache" / "widget.h5"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_BUILD,
            str(tmp_path / "index.pkl"),
            str(target),
            str(onnx_dir),
        ],
        env=env,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (target.parent.is_dir() and leftovers(target.parent)):
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "the build never started writing"
        time.sleep(0.05)
    time.sleep(1.0)  # a few batches into the file
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert not target.exists()
    (temporary,) = leftovers(target.parent)
    with pytest.raises(IncompleteCacheError, match="rebuild"):
        load_features(target.parent / temporary)

    build_cache(index, target, CONFIG, progress=False, onnx_dir=onnx_dir)
    assert load_features(target)[1]["image_id"].tolist() == index["image_id"].tolist()


def test_cache_readers_and_backbone_config_import_no_torch():
    """Grid jobs only read caches, and the workflow builds backbone configurations when it
    parses: neither may pay for importing torch."""
    code = (
        "import sys, sroc.feature_cache, sroc.backbones.config, sroc.backbones.geometry; "
        "loaded = [m for m in ('torch', 'timm', 'onnxruntime') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_unfinished_or_foreign_files_are_refused(tmp_path):
    unfinished = tmp_path / "unfinished.h5"
    with h5py.File(unfinished, "w") as h5:
        h5.create_dataset("features/blocks.2", data=np.zeros((1, 2, 2, 2), np.float16))
    with pytest.raises(IncompleteCacheError, match="unfinished"):
        load_features(unfinished)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(IncompleteCacheError, match="not a readable HDF5"):
        cache_shapes(garbage)
    with pytest.raises(FileNotFoundError, match="build it first"):
        read_cache_index(tmp_path / "absent.h5")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda index: index.drop(columns=["mask_path"]), r"lacks column\(s\) \['mask_path'\]"),
        (lambda index: index.assign(category=["a", "b"] * 5 + ["a"]), "mixes categories"),
        (lambda index: pd.concat([index, index.iloc[:1]]), "repeats image ids"),
        (lambda index: index.iloc[:0], "no image"),
    ],
)
def test_bad_index_is_rejected(dataset, tmp_path, change, message):
    _, index = dataset
    with pytest.raises(ValueError, match=message):
        build_cache(change(index), tmp_path / "x.h5", CONFIG, progress=False)
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
def test_real_jpegs_of_varying_size(tmp_path, onnx_dir):
    index = index_category(SHARED_DATA / "magnetic_tile", "magnetic_tile", verify_pixels=False)
    subset = index.iloc[:: len(index) // 6].reset_index(drop=True)
    path = tmp_path / "magnetic_tile.h5"
    build_cache(subset, path, CONFIG, threads=2, progress=False, onnx_dir=onnx_dir)
    features, metadata = load_features(path)
    for row in metadata.itertuples():
        with Image.open(row.path) as image:
            assert (row.height, row.width) == (image.height, image.width)
    assert metadata["height"].nunique() > 1 or metadata["width"].nunique() > 1
    reference = reference_features(metadata["path"], CONFIG)
    for stage, values in features.items():
        np.testing.assert_allclose(values, reference[stage], rtol=1e-3, atol=1e-3)


# --- aspect ratio ----------------------------------------------------------------------------


def test_padded_cache_stores_each_images_box_and_padded_features(dataset, tmp_path):
    from sroc.backbones import FeatureExtractor, input_geometry
    from sroc.datasets.layout import read_image
    from sroc.feature_cache import input_boxes

    _, index = dataset
    config = dataclasses.replace(CONFIG, aspect="pad", runtime="torch")
    path = tmp_path / f"{config.tag()}.h5"
    build_cache(index, path, config, threads=2, progress=False)
    features, metadata = load_features(path)
    boxes, canvas = input_boxes(path)
    assert canvas == (64, 64)
    for row, box in zip(metadata.itertuples(), boxes, strict=True):
        assert tuple(box) == input_geometry("pad", 64, row.height, row.width).box
    assert tuple(boxes[metadata["image_id"].tolist().index("train/good/003")]) == (
        (64 - 23) // 2, 0, 23, 64,  # 33 x 90 -> 23 x 64
    )  # fmt: skip
    extractor = FeatureExtractor(config)
    batch = np.stack([extractor.preprocess(read_image(p)) for p in metadata["path"]])
    for stage, values in extractor.run_torch(batch).items():
        np.testing.assert_allclose(features[stage], values, rtol=1e-3, atol=1e-3)
    subset = metadata["image_id"].tolist()[3:0:-1]
    np.testing.assert_array_equal(input_boxes(path, subset)[0], boxes[3:0:-1])


def test_squashed_cache_has_no_boxes_and_reads_as_whole_canvas(built):
    from sroc.feature_cache import input_boxes

    with h5py.File(built, "r") as h5:
        assert "input_box" not in h5["images"] and "input_canvas" not in h5.attrs
    boxes, canvas = input_boxes(built)
    assert canvas == (64, 64) and (boxes == [0, 0, 64, 64]).all()


def test_tiled_cache_has_wide_grids(tmp_path):
    from sroc.backbones import FeatureExtractor
    from sroc.datasets.layout import read_image

    rng = np.random.default_rng(1)
    for folder, name in [("train/good", "000"), ("train/good", "001"), ("test/good", "000")]:
        target = tmp_path / "data" / "wide" / folder / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 100, 3), dtype=np.uint8)).save(target)
    index = index_category(tmp_path / "data", "wide")
    config = dataclasses.replace(CONFIG, aspect="tile", runtime="torch")
    path = tmp_path / f"{config.tag()}.h5"
    build_cache(index, path, config, threads=1, progress=False)
    n_images, shapes = cache_shapes(path)
    assert n_images == 3
    assert shapes == {"blocks.2": (40, 8, 20), "blocks.4": (112, 4, 10), "blocks.5": (192, 2, 5)}
    extractor = FeatureExtractor(config)
    geometry = extractor.geometry(40, 100)
    features, metadata = load_features(path)
    batch = np.stack([extractor.preprocess(read_image(p)) for p in metadata["path"]])
    expected = extractor.tiled(extractor.run_torch, geometry)(batch)
    for stage, values in features.items():
        np.testing.assert_allclose(values, expected[stage], rtol=1e-3, atol=1e-3)


def test_tiles_of_different_aspect_ratios_fail_with_the_file_and_the_fix(dataset, tmp_path):
    _, index = dataset
    config = dataclasses.replace(CONFIG, aspect="tile", runtime="torch")
    with pytest.raises(ValueError, match=r"\(\d+x\d+, HxW\).*aspect='pad'") as error:
        build_cache(index, tmp_path / "x.h5", config, progress=False)
    assert "widget" in str(error.value)  # the file's path
    assert not (tmp_path / "x.h5").exists() and not leftovers(tmp_path)
