"""The detectors' common base: registration, input checking, stage alignment, thread limits,
memory and cost estimates.

A detector describes itself in one place, its class: ``class KNNDetector(BaseDetector,
name="knn", label="KNN")`` registers it in :data:`DETECTORS` under its config type name, and
its class attributes state its runtime cost and capabilities (see :class:`BaseDetector`).

Every detector follows scikit-learn conventions: hyper-parameters in ``__init__``, fitted state
in attributes ending with ``_``; ``get_params``/``set_params`` come from :class:`BaseDetector`
itself, so that importing the detectors loads neither scikit-learn nor torch (a grid job that
only ranks or scores would pay over a second and 500 MB for them). ``fit(features)`` takes the
cached feature maps of the training images, ``score(features, maps=True)`` returns
``(image_scores (n,) float64, maps (n, h, w) float32)``, or ``(image_scores, None)`` with
``maps=False``, computing no map. ``features`` is a dict ``{stage_name: array (n_images, C, H,
W)}`` ordered from the finest to the coarsest stage. Nothing here runs the backbone.

Thread-count independence: KNN, Mahalanobis and PaDiM split their work into chunks whose size
never depends on ``n_jobs`` and run every numerical kernel (BLAS) single-threaded inside
a chunk; ``n_jobs`` only sets how many chunks run at once (:meth:`BaseDetector._run_chunks`).
Each number is then computed by the same operations in the same order whatever the thread
count, whereas a multi-threaded BLAS may split a reduction differently with 1 and 2 threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np
from threadpoolctl import threadpool_limits

from sroc.geometry import bilinear_resize

# Resident memory of a Python process that imported numpy, torch, faiss, scikit-learn and h5py
# (measured: about 640 MB); added to every estimate so the workflow can declare mem_mb directly.
# The detectors no longer import torch or scikit-learn (sroc.detectors and sroc.evaluation: 140
# MB), so it is a margin until a detector job's own peak is measured.
INTERPRETER_OVERHEAD_MB = 700.0
# Scratch memory that chunked computations aim to stay under.
WORKSPACE_MB = 256.0
# Images processed at once where whole images are aligned or turned into patch features.
IMAGE_CHUNK = 16
# Query patches searched at once by PatchCore.
QUERY_CHUNK = 8192
MB = 1024.0**2
UPSAMPLE_MODES = ("nearest", "bilinear")


def _nearest_grid_indices(out_size: int, in_size: int) -> np.ndarray:
    """Source rows of nearest-neighbour upsampling: each coarse cell is replicated into a block,
    as PaDiM's embedding_concat does for the integer strides of a CNN pyramid."""
    return (np.arange(out_size) * in_size) // out_size


def upsample_maps(maps: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Upsample (..., h, w) float32 maps to ``size`` by nearest replication or bilinear
    interpolation (half-pixel centres, :func:`sroc.geometry.bilinear_resize`)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if mode == "nearest":
        rows = _nearest_grid_indices(size[0], maps.shape[-2])
        cols = _nearest_grid_indices(size[1], maps.shape[-1])
        return maps[..., rows[:, None], cols[None, :]]
    return bilinear_resize(maps, size)


def adaptive_average_pool(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Adaptive average pooling of ``values`` along ``axis`` to ``size`` bins, as torch's
    ``adaptive_avg_pool``: bin j averages the entries [floor(j n / size), ceil((j+1) n / size))
    of the n along the axis (bins overlap, or repeat entries when size > n). Float32 sums."""
    values = np.asarray(values, dtype=np.float32)
    axis = axis % values.ndim
    n = values.shape[axis]
    if n == size:
        return values
    if n % size == 0:
        # Equal, disjoint bins (a CNN stage onto a coarser one): the bins' entries summed slice
        # by slice, 5x faster than reduceat's padded copy (24x24 to 12x12, measured).
        factor = n // size
        binned = values.reshape(values.shape[:axis] + (size, factor) + values.shape[axis + 1 :])
        total = binned.take(0, axis=axis + 1)
        for offset in range(1, factor):
            total = total + binned.take(offset, axis=axis + 1)
        return total / np.float32(factor)
    bins = np.arange(size)
    starts = (bins * n) // size
    stops = -((-(bins + 1) * n) // size)
    # reduceat sums from each index to the next: interleaving every bin's stop keeps the bins
    # apart, and a zero entry past the end lets a bin other than the last stop at n.
    padding = [(0, 0)] * values.ndim
    padding[axis] = (0, 1)
    sums = np.add.reduceat(
        np.pad(values, padding), np.stack([starts, stops], axis=1).ravel(), axis=axis
    )
    sums = np.take(sums, np.arange(0, 2 * size, 2), axis=axis)
    counts = (stops - starts).astype(np.float32).reshape([-1] + [1] * (values.ndim - axis - 1))
    return sums / counts


def onto_grid(maps: np.ndarray, grid: tuple[int, int], mode: str) -> np.ndarray:
    """(n, C, h, w) maps on ``grid``: area-averaged when finer, upsampled (``mode``) otherwise."""
    if maps.shape[-2] > grid[0]:
        maps = adaptive_average_pool(adaptive_average_pool(maps, grid[0], -2), grid[1], -1)
    return upsample_maps(maps, grid, mode)


def align_stages(
    features: Mapping[str, np.ndarray],
    stages: Sequence[str],
    mode: str = "nearest",
    grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """Bring the given stages onto one grid and concatenate their channels.

    The grid is the finest among the stages, or ``grid`` when given: stages finer than it are
    area-averaged onto it (adaptive average pooling), coarser ones upsampled. Returns float32
    (n, sum of C, H, W), channels in the order of ``stages``. ``mode`` is the upsampling,
    "nearest" (PaDiM) or "bilinear" with half-pixel centres (PatchCore).
    """
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    if grid is None:
        grid = max((features[s].shape[-2:] for s in stages), key=lambda hw: hw[0] * hw[1])
    grid = (int(grid[0]), int(grid[1]))
    parts = [onto_grid(np.asarray(features[s], dtype=np.float32), grid, mode) for s in stages]
    return np.concatenate(parts, axis=1)


@contextlib.contextmanager
def thread_limit(n_jobs: int | None) -> Iterator[None]:
    """Limit BLAS, OpenMP and faiss threads to ``n_jobs`` (None leaves the libraries'
    defaults). faiss is limited only once imported: PatchCore's IVF index imports it."""
    if n_jobs is None:
        yield
        return
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be a positive int or None, got {n_jobs}")
    faiss = sys.modules.get("faiss")
    faiss_threads = faiss.omp_get_max_threads() if faiss is not None else None
    if faiss is not None:
        faiss.omp_set_num_threads(n_jobs)
    try:
        with threadpool_limits(limits=n_jobs):
            yield
    finally:
        if faiss is not None:
            faiss.omp_set_num_threads(faiss_threads)


def n_workers(n_jobs: int | None) -> int:
    """Chunks run at once: ``n_jobs``, or every CPU this process may use when None."""
    if n_jobs is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be a positive int or None, got {n_jobs}")
    return int(n_jobs)


def gap_pooling_flops(shapes: Mapping[str, Sequence[int]]) -> int:
    """FLOPs of the global average pooling of one image: one add per feature value."""
    return sum(math.prod(chw) for chw in shapes.values())


def grid_and_dim(shapes: Mapping[str, Sequence[int]]) -> tuple[int, int]:
    """Number of locations on the finest grid of ``shapes`` {stage: (C, H, W)} and the
    concatenated channel count."""
    grid = max(shapes.values(), key=lambda chw: chw[1] * chw[2])
    return grid[1] * grid[2], sum(chw[0] for chw in shapes.values())


def _chunks(n_items: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, n_items)) for start in range(0, n_items, chunk)]


# Config type name -> detector class; filled by BaseDetector.__init_subclass__.
DETECTORS: dict[str, type[BaseDetector]] = {}


def detector_class(name: str) -> type[BaseDetector]:
    """The detector class registered as ``name`` (a config entry's ``type``)."""
    try:
        return DETECTORS[name]
    except KeyError:
        raise ValueError(
            f"unknown detector type {name!r}; registered detectors: {sorted(DETECTORS)}"
        ) from None


# Values per image and stage that features_fingerprint hashes: a strided sample, so that the
# fingerprint of a training set costs microseconds next to the fit.
FINGERPRINT_VALUES_PER_IMAGE = 4096


def features_fingerprint(features: Mapping[str, np.ndarray]) -> str:
    """A digest of feature maps {stage: (n, C, H, W)}: the stages, their shapes and a strided
    sample of every image's float32 values. Two different training sets (other images, other
    order, another pollution ratio) differ in it; the same features give the same digest
    whatever their dtype in memory."""
    digest = hashlib.blake2b(digest_size=16)
    for stage in sorted(features):
        array = np.asarray(features[stage])
        flat = array.reshape(len(array), -1)
        stride = max(1, flat.shape[1] // FINGERPRINT_VALUES_PER_IMAGE)
        digest.update(f"{stage}:{array.shape}".encode())
        digest.update(np.ascontiguousarray(flat[:, ::stride], dtype=np.float32).tobytes())
    return digest.hexdigest()


class NotFittedError(ValueError, AttributeError):
    """A detector was used before ``fit`` (as scikit-learn's exception of that name)."""


class BaseDetector:
    """Common registration, input checking and stage selection.

    A concrete subclass names itself in its class statement, ``class GaussianDetector(
    BaseDetector, name="gaussian", label="Gaussian")``, which registers it in
    :data:`DETECTORS` (``make_detector("gaussian")`` then builds it, wherever the class was
    defined); a subclass without ``name`` is an abstract base and is not registered. It sets:

    - ``runtime_seconds_per_image``: seconds of one fit plus one scoring of the test set, per
      training image, on 2 cores with default parameters, with a margin; the workflow sizes a
      job's runtime from it.
    - ``supports_exclude_self``: whether ``__init__`` takes ``exclude_self``. With
      ``exclude_self=True``, ``score(features)`` expects the very features given to ``fit`` and
      scores each training image against a model of the *other* training images
      (leave-one-out), raising a ValueError for other features. Refinement strategies that rank
      the training images by self-scores build their detectors with ``exclude_self=True``.
    - ``has_patch_bank``: whether the detector keeps a bank of training patches and
      ``__init__`` takes ``excluded_patches``, rows of that bank (image-major, then row-major
      locations) left out of it; patch-level refinement sets it.

    Subclasses implement ``_fit(features)``, ``_score(features, maps) -> (scores, maps or
    None)`` with maps on the detector's grid (the finest used stage's, or a coarser
    ``grid_stage``'s where the detector has one), ``_estimate_state_mb``, and the FLOP models
    :meth:`fit_flops` and :meth:`score_flops`. A subclass that sets ``_chunked = True`` runs
    its kernels single-threaded and parallelises over chunks with :meth:`_run_chunks`;
    otherwise the libraries get ``n_jobs`` threads.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    runtime_seconds_per_image: ClassVar[float]
    supports_exclude_self: ClassVar[bool] = False
    has_patch_bank: ClassVar[bool] = False

    stages: Sequence[str] | None
    n_jobs: int | None
    _chunked = False

    def __init_subclass__(cls, name: str | None = None, label: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if name is None:
            return  # an abstract base: nothing to register
        where = f"{cls.__module__}.{cls.__qualname__}"
        if name in DETECTORS:
            existing = DETECTORS[name]
            raise ValueError(
                f"{where}: detector name {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}; choose another name"
            )
        if not label:
            raise ValueError(f"{where}: give a label for reports, e.g. label={name.title()!r}")
        runtime = getattr(cls, "runtime_seconds_per_image", None)
        if not isinstance(runtime, int | float) or not runtime > 0:
            raise ValueError(
                f"{where}: set runtime_seconds_per_image, the seconds of one fit plus one test "
                f"scoring per training image on 2 cores (a positive number), got {runtime!r}"
            )
        params = cls._get_param_names()
        for capability, param in (
            ("supports_exclude_self", "exclude_self"),
            ("has_patch_bank", "excluded_patches"),
        ):
            if getattr(cls, capability) and param not in params:
                raise ValueError(f"{where}: {capability} is True but __init__ takes no {param}")
        cls.name, cls.label = name, label
        DETECTORS[name] = cls

    # -- hyper-parameters (scikit-learn's BaseEstimator interface) -------------------------------

    @classmethod
    def _get_param_names(cls) -> list[str]:
        """The hyper-parameters: the keyword arguments of ``__init__``, sorted."""
        if cls.__init__ is object.__init__:
            return []
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        for parameter in parameters:
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise TypeError(
                    f"{cls.__qualname__}.__init__ must name its hyper-parameters explicitly "
                    f"(scikit-learn convention), not take {parameter}"
                )
        return sorted(parameter.name for parameter in parameters)

    def get_params(self, deep: bool = True) -> dict[str, object]:
        """The hyper-parameters and their values. ``deep`` is accepted for scikit-learn's
        ``clone``; a detector holds no nested estimator."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params) -> BaseDetector:
        """Set hyper-parameters (unknown names raise); a fitted detector is not refitted."""
        valid = self._get_param_names()
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no parameter(s) {unknown}; valid: {valid}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        """The class and the hyper-parameters that differ from their defaults."""
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(type(self).__init__).parameters.items()
        }
        changed = []
        for name, value in self.get_params().items():
            default = defaults.get(name, inspect.Parameter.empty)
            same = value is default
            if not same:
                try:
                    same = bool(default == value)
                except (TypeError, ValueError):  # arrays compare elementwise
                    same = False
            if not same:
                changed.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"

    # -- fit and score ---------------------------------------------------------------------------

    def fit(self, features: Mapping[str, np.ndarray]) -> BaseDetector:
        self._is_fitted = False  # a failed fit leaves the detector unfitted
        features = self._validate(features, fitting=True)
        if self.n_train_ < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 training images, got 1")
        with self._threads():
            self._fit(features)
        self.training_fingerprint_ = features_fingerprint(features)
        self._is_fitted = True
        return self

    def was_fitted_on(self, features: Mapping[str, np.ndarray]) -> bool:
        """Whether ``features`` are the very features this detector was fitted on (its used
        stages, compared by :func:`features_fingerprint`), e.g. before reusing it to score its
        own training set."""
        if not getattr(self, "_is_fitted", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(features) first")
        if any(stage not in features for stage in self.stages_):
            return False
        used = {stage: features[stage] for stage in self.stages_}
        return features_fingerprint(used) == self.training_fingerprint_

    def score(
        self, features: Mapping[str, np.ndarray], maps: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Return image scores (n,) float64 and anomaly maps (n, h, w) float32 on the finest
        used feature grid, unsmoothed (the evaluation resizes and smooths them once, with
        :func:`sroc.geometry.resize_maps`). With ``maps=False`` no map is computed and the
        maps are None."""
        if not getattr(self, "_is_fitted", False):
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(features) first")
        features = self._validate(features, fitting=False)
        with self._threads():
            scores, anomaly_maps = self._score(features, bool(maps))
        scores = np.asarray(scores, dtype=np.float64)
        if not maps:
            return scores, None
        return scores, np.asarray(anomaly_maps, dtype=np.float32)

    def _threads(self) -> contextlib.AbstractContextManager:
        n_workers(self.n_jobs)  # checks n_jobs
        return thread_limit(1 if self._chunked else self.n_jobs)

    def _run_chunks(self, work: Callable[[slice], None], n_items: int, chunk: int) -> None:
        """Call ``work(block)`` for consecutive blocks of ``chunk`` items, ``n_jobs`` at a time.

        The blocks do not depend on ``n_jobs`` and the kernels run single-threaded, so every
        result is bit-identical whatever the thread count; ``work`` writes its block's results
        into preallocated arrays (numpy releases the GIL in its kernels)."""
        blocks = _chunks(n_items, max(1, int(chunk)))
        workers = min(n_workers(self.n_jobs), len(blocks))
        if workers <= 1:
            for block in blocks:
                work(block)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(work, block) for block in blocks]:
                future.result()

    def _validate(self, features: Mapping[str, np.ndarray], fitting: bool) -> dict[str, np.ndarray]:
        if not isinstance(features, Mapping) or not features:
            raise ValueError("features must be a non-empty dict {stage_name: (n, C, H, W) array}")
        if fitting:
            stages = list(features) if self.stages is None else list(self.stages)
            if not stages:
                raise ValueError("stages must name at least one stage (or be None for all)")
        else:
            stages = self.stages_
        missing = [s for s in stages if s not in features]
        if missing:
            raise ValueError(
                f"features lack stage(s) {missing}; available: {list(features)}. Pass features "
                "from the same backbone configuration, or choose stages among the available ones"
            )
        arrays = {s: np.asarray(features[s], dtype=np.float32) for s in stages}
        counts = {s: a.shape[0] if a.ndim == 4 else None for s, a in arrays.items()}
        for s, a in arrays.items():
            if a.ndim != 4 or a.shape[0] == 0:
                raise ValueError(f"features[{s!r}] must have shape (n>0, C, H, W), got {a.shape}")
            # NaN propagates through min and max and an infinity is the min or the max: two
            # vectorised passes, no boolean copy of the features.
            if a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):
                raise ValueError(f"features[{s!r}] contains NaN or infinite values")
        if len(set(counts.values())) != 1:
            raise ValueError(f"stages hold different numbers of images: {counts}")
        shapes = {s: a.shape[1:] for s, a in arrays.items()}
        if fitting:
            self.stages_ = stages
            # The backbone's order, shallow to deep, for detectors that need the deepest stage.
            self.input_stages_ = list(features)
            self.feature_shapes_ = shapes
            self.n_train_ = next(iter(counts.values()))
            grid = max(shapes.values(), key=lambda chw: chw[1] * chw[2])
            self.grid_hw_ = (grid[1], grid[2])
        elif shapes != self.feature_shapes_:
            raise ValueError(
                f"feature shapes {shapes} differ from those seen in fit {self.feature_shapes_}: "
                "score features of the same backbone configuration as the training features"
            )
        return arrays

    def estimate_memory_mb(
        self, n_train: int, n_test: int, feature_shapes: Mapping[str, Sequence[int]]
    ) -> float:
        """Peak resident memory (MB) of fit on ``n_train`` plus score of ``n_test`` images:
        interpreter, both feature sets as float32, the fitted state and the scratch space."""
        stages = list(feature_shapes) if self.stages is None else list(self.stages)
        shapes = {s: tuple(int(v) for v in feature_shapes[s]) for s in stages}
        input_mb = (n_train + n_test) * sum(math.prod(chw) for chw in shapes.values()) * 4 / MB
        detector_mb = self._estimate_state_mb(n_train, n_test, shapes)
        return INTERPRETER_OVERHEAD_MB + input_mb + detector_mb

    def used_shapes(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        """The shapes {stage: (C, H, W)} of the stages the detector uses (fitted, else
        configured, else all)."""
        stages = getattr(self, "stages_", None) or self.stages or list(shapes)
        return {s: tuple(int(v) for v in shapes[s]) for s in stages}

    def fit_flops(self, shapes: Mapping[str, Sequence[int]], n_fit: float) -> float:
        """FLOPs (2 per multiply-add) of the dominant linear algebra of fitting ``n_fit``
        images of feature shapes ``shapes`` {stage: (C, H, W)}, for runtime projections."""
        raise NotImplementedError(
            f"{type(self).__name__} has no FLOP model: implement fit_flops(shapes, n_fit)"
        )

    def score_flops(
        self, shapes: Mapping[str, Sequence[int]], n_fit: float, n_score: float, maps: bool
    ) -> float:
        """FLOPs of scoring ``n_score`` images, with maps or not, against a model fitted on
        ``n_fit`` images of feature shapes ``shapes``."""
        raise NotImplementedError(
            f"{type(self).__name__} has no FLOP model: implement score_flops(shapes, n_fit, "
            "n_score, maps)"
        )

    def _use_grid_stage(self, features: Mapping[str, np.ndarray], grid_stage: str | None) -> None:
        """Put the maps on ``grid_stage``'s grid (None keeps the finest stage's, set by fit)."""
        if grid_stage is None:
            return
        if grid_stage not in self.stages_:
            raise ValueError(
                f"grid_stage={grid_stage!r} is not among the used stages {self.stages_}"
            )
        self.grid_hw_ = tuple(int(v) for v in features[grid_stage].shape[-2:])

    def _check_self_scoring(self, embeddings: np.ndarray) -> None:
        """With exclude_self, score() must receive the training features themselves."""
        if embeddings.shape != self.train_embeddings_.shape or not np.array_equal(
            embeddings, self.train_embeddings_
        ):
            raise ValueError(
                f"exclude_self=True scores the training images against the others: pass the "
                f"same features given to fit ({self.n_train_} images), got {embeddings.shape[0]} "
                "other images. Use exclude_self=False to score new images"
            )


def gap_embedding(
    features: Mapping[str, np.ndarray],
    stages: Sequence[str],
    run_chunks: Callable[[Callable[[slice], None], int, int], None] | None = None,
) -> np.ndarray:
    """Concatenated global-average-pooled stages, float64 (n, sum of C), accumulated in float64
    (a float32 sum of 2304 cells loses about 4 digits). ``run_chunks`` (a detector's
    :meth:`BaseDetector._run_chunks`) pools blocks of images in parallel."""
    n_images = next(iter(features.values())).shape[0]
    widths = [features[s].shape[1] for s in stages]
    offsets = np.concatenate([[0], np.cumsum(widths)])
    pooled = np.empty((n_images, int(offsets[-1])))

    def pool(block: slice) -> None:
        for stage, start, stop in zip(stages, offsets[:-1], offsets[1:], strict=True):
            pooled[block, start:stop] = features[stage][block].mean(axis=(2, 3), dtype=np.float64)

    if run_chunks is None:
        pool(slice(0, n_images))
    else:
        run_chunks(pool, n_images, IMAGE_CHUNK)
    return pooled
