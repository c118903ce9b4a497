"""Shallow one-class detectors on frozen CNN features (section 3.1 of the SROC paper).

One module per detector (``knn``, ``mahalanobis``, ``padim``, ``patchcore``) on a common base
(``base``), with the numerical building blocks they share (``linalg``, ``neighbours``) and the
map post-processing (``maps``). Anomaly maps are returned on the finest grid among the stages a
detector uses (48x48 for tf_efficientnet_lite2 at 380 px), unsmoothed, unless ``map_size`` is
set; the evaluation brings them to ground-truth size with :func:`resize_maps` (see
docs/detectors.md for the smoothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sroc.detectors.base import INTERPRETER_OVERHEAD_MB, WORKSPACE_MB, BaseDetector, align_stages
from sroc.detectors.knn import KNNDetector
from sroc.detectors.linalg import cholesky_factors, ledoit_wolf, whiten
from sroc.detectors.mahalanobis import MahalanobisDetector
from sroc.detectors.maps import resize_maps, scale_sigma
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
    "resize_maps",
    "scale_sigma",
    "whiten",
]

DETECTORS: dict[str, type[BaseDetector]] = {
    "knn": KNNDetector,
    "mahalanobis": MahalanobisDetector,
    "padim": PaDiMDetector,
    "patchcore": PatchCoreDetector,
}


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


def validate_params(detector_type: str, params: Mapping[str, object], where: str) -> None:
    """Refuse, at config time, detector params that would fail inside a job."""
    reserved = sorted({"random_state", "n_jobs"} & set(params))
    if reserved:
        raise ValueError(f"{where}: params may not set {reserved}; the workflow sets them")
    try:
        make_detector(detector_type, **dict(params))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from error
