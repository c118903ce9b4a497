"""Shallow one-class detectors on frozen CNN features (section 3.1 of the SROC paper).

One module per detector (``knn``, ``mahalanobis``, ``padim``, ``patchcore``, ``softpatch``) on a
common base (``base``), with the numerical building blocks they share (``linalg``,
``neighbours``, ``coreset``). Every detector class registers itself in :data:`DETECTORS` under
its config type name (see :class:`BaseDetector`), so that a class defined elsewhere, e.g. in a
plugin file, is built by :func:`make_detector` as soon as it is defined. Anomaly maps are
returned on the detector's grid: the finest among the stages it uses (48x48 for
tf_efficientnet_lite2 at 380 px), or the coarser grid of its ``grid_stage`` (KNN, PatchCore),
unsmoothed; the evaluation brings them to ground-truth size and smooths them once with
:func:`sroc.geometry.resize_maps` (see docs/detectors.md). ``score(features, maps=False)``
returns image scores only. :func:`validate_params` checks a config entry's parameters before
any job runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sroc.detectors.base import (
    DETECTORS,
    INTERPRETER_OVERHEAD_MB,
    WORKSPACE_MB,
    BaseDetector,
    NotFittedError,
    align_stages,
    detector_class,
)
from sroc.detectors.coreset import greedy_coreset_indices
from sroc.detectors.knn import KNNDetector
from sroc.detectors.linalg import cholesky_factors, ledoit_wolf, whiten
from sroc.detectors.mahalanobis import MahalanobisDetector
from sroc.detectors.padim import PaDiMDetector
from sroc.detectors.patchcore import PatchCoreDetector

# Registered after PatchCore: the registration order is the reports' column order.
from sroc.detectors.softpatch import SoftPatchDetector

__all__ = [
    "DETECTORS",
    "INTERPRETER_OVERHEAD_MB",
    "WORKSPACE_MB",
    "BaseDetector",
    "KNNDetector",
    "MahalanobisDetector",
    "NotFittedError",
    "PaDiMDetector",
    "PatchCoreDetector",
    "SoftPatchDetector",
    "align_stages",
    "cholesky_factors",
    "detector_class",
    "estimate_memory_mb",
    "greedy_coreset_indices",
    "ledoit_wolf",
    "make_detector",
    "validate_params",
    "whiten",
]


def make_detector(name: str, **params) -> BaseDetector:
    """Instantiate the detector registered as ``name`` with hyper-parameters ``params``."""
    cls = detector_class(name)
    valid = cls._get_param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"detector {name!r} has no parameter(s) {unknown}; valid: {valid}")
    return cls(**params)


# Set by the caller, never by a config entry, whichever detector takes them: the seed comes from
# the config's top-level random_state, the threads from the job, the rest from refinement.
_CALLER_PARAMS = {
    "random_state": "it comes from the config's top-level random_state",
    "n_jobs": "the workflow sets it from the job's threads",
    "exclude_self": "refinement strategies set it to score the training images (leave-one-out)",
    "excluded_patches": "the patch_sroc refinement strategy sets it for each refit",
}
# The evaluation resizes and smooths the detectors' grid maps once, to ground-truth size.
_EVALUATION_PARAMS = ("map_size", "map_sigma")


def validate_params(detector_type: str, params: Mapping[str, object], where: str) -> None:
    """Check a config entry's detector ``params`` before any job runs; ``where`` names the
    entry (e.g. "detectors[2] (padim)"). Raises a ValueError naming the entry and the key."""
    try:
        cls = detector_class(detector_type)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
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
        for name in cls._get_param_names()
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
