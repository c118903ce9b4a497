"""Shallow one-class detectors on frozen CNN features (section 3.1 of the SROC paper).

One module per detector (``knn``, ``mahalanobis``, ``padim``, ``patchcore``) on a common base
(``base``), with the numerical building blocks they share (``linalg``, ``neighbours``) and the
map post-processing (``maps``). Anomaly maps are returned on the finest grid among the stages a
detector uses (48x48 for tf_efficientnet_lite2 at 380 px), unsmoothed; the evaluation brings
them to ground-truth size and smooths them once with :func:`resize_maps` (see docs/detectors.md).
``score(features, maps=False)`` returns image scores only. :func:`validate_params` checks a
config entry's parameters before any job runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sroc.detectors.base import INTERPRETER_OVERHEAD_MB, WORKSPACE_MB, BaseDetector, align_stages
from sroc.detectors.knn import KNNDetector
from sroc.detectors.linalg import cholesky_factors, ledoit_wolf, whiten
from sroc.detectors.mahalanobis import MahalanobisDetector
from sroc.detectors.maps import crop_resize_maps, resize_maps, scale_sigma
from sroc.detectors.padim import PaDiMDetector
from sroc.detectors.patchcore import PatchCoreDetector, greedy_coreset_indices

__all__ = [
    "DETECTORS",
    "INTERPRETER_OVERHEAD_MB",
    "WORKSPACE_MB",
    "BaseDetector",
    "KNNDetector",
    "MahalanobisDetector",
    "PaDiMDetector",
    "PatchCoreDetector",
    "align_stages",
    "cholesky_factors",
    "estimate_memory_mb",
    "greedy_coreset_indices",
    "ledoit_wolf",
    "make_detector",
    "crop_resize_maps",
    "detector_class",
    "resize_maps",
    "scale_sigma",
    "validate_params",
    "whiten",
]

DETECTORS: dict[str, type[BaseDetector]] = {
    "knn": KNNDetector,
    "mahalanobis": MahalanobisDetector,
    "padim": PaDiMDetector,
    "patchcore": PatchCoreDetector,
}


def detector_class(name: str) -> type[BaseDetector]:
    """The detector class registered as ``name``."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}")
    return DETECTORS[name]


def make_detector(name: str, **params) -> BaseDetector:
    """Instantiate the detector registered as ``name`` with hyper-parameters ``params``."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}")
    cls = DETECTORS[name]
    valid = cls._get_param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"detector {name!r} has no parameter(s) {unknown}; valid: {valid}")
    return cls(**params)


# Set by the caller, never by a config entry: the seed comes from the config's top-level
# random_state, the threads from the job.
_CALLER_PARAMS = {
    "random_state": "it comes from the config's top-level random_state",
    "n_jobs": "the workflow sets it from the job's threads",
    "excluded_patches": "the patch_sroc refinement strategy sets it for each refit",
}
# The evaluation resizes and smooths the detectors' grid maps once, to ground-truth size.
_EVALUATION_PARAMS = ("map_size", "map_sigma")


def validate_params(detector_type: str, params: Mapping[str, object], where: str) -> None:
    """Check a config entry's detector ``params`` before any job runs; ``where`` names the
    entry (e.g. "detectors[2] (padim)"). Raises a ValueError naming the entry and the key."""
    if detector_type not in DETECTORS:
        raise ValueError(
            f"{where}: unknown detector type {detector_type!r}; choose one of {sorted(DETECTORS)}"
        )
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}: params must be a mapping of parameter names to values")
    for key, reason in _CALLER_PARAMS.items():
        if key in params:
            raise ValueError(f"{where}: params must not set {key!r}: {reason}. Remove it")
    for key in _EVALUATION_PARAMS:
        if key in params:
            raise ValueError(
                f"{where}: params must not set {key!r}: the evaluation resizes and smooths the "
                "maps once, at ground-truth size. Remove it"
            )
    valid = [
        name
        for name in DETECTORS[detector_type]._get_param_names()
        if name not in _CALLER_PARAMS and name not in _EVALUATION_PARAMS
    ]
    for key in params:
        if key not in valid:
            raise ValueError(
                f"{where}: {detector_type} has no parameter {key!r}; valid parameters: {valid}"
            )


def estimate_memory_mb(
    name: str,
    params: Mapping[str, object],
    n_train: int,
    n_test: int,
    feature_shapes: Mapping[str, Sequence[int]],
) -> float:
    """Peak memory (MB) of fitting detector ``name`` on ``n_train`` images and scoring
    ``n_test``, with ``feature_shapes`` {stage: (C, H, W)}; includes the interpreter and the
    float32 features, so the workflow can declare it as mem_mb."""
    return make_detector(name, **dict(params)).estimate_memory_mb(n_train, n_test, feature_shapes)
