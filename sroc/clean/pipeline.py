"""The cleaning itself: which images of an unlabelled set look defective?

:func:`clean` embeds the images with the frozen backbone (through the HDF5 embedding cache of
``sroc.embeddings``), fits a detector on all of them and scores every image against the others
(SROC self-scoring; KNN leave-one-out by default), then flags the highest-scored images as
suspects: as many as the contamination estimated from the scores (``ratio="auto"``,
:mod:`sroc.contamination`) or a fixed fraction. :func:`run_clean` also returns what the report
shows (:class:`CleanRun`). Nothing here writes into, moves or deletes an input file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm import tqdm

from sroc.contamination import DEFAULT_THRESHOLD, estimate_contamination, tail_cut
from sroc.datasets.layout import DatasetError, read_image

# torch, faiss and h5py are imported where they are used: ``import sroc`` imports this module
# (so that ``sroc.clean`` is the function), and must stay light for every other use of sroc.
if TYPE_CHECKING:
    from sroc.backbones import BackboneConfig
    from sroc.detectors import BaseDetector

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff")
MIN_IMAGES = 10
# More than half the set removed means the "bulk" is no longer healthy: no self-scoring can work.
MAX_RATIO = 0.5
DEFAULT_DETECTOR = "knn"
# KNN on pooled features, each image scored against the others (leave-one-out): the cheapest
# detector, and the one whose self-scores do not see the image itself at distance 0.
DEFAULT_DETECTOR_PARAMS: dict[str, dict] = {"knn": {"n_neighbors": 5}}
_CACHE_CATEGORY = "images"
_MAP_CHUNK = 8
_PROBLEMS_SHOWN = 20


class CleanError(ValueError):
    """The images cannot be cleaned as asked; the message names the file or value and the fix."""


@dataclasses.dataclass
class CleanRun:
    """Everything one cleaning computed: ``frame`` (what :func:`clean` returns), the settings and
    notes shown in the report, the skipped files, and the suspects' anomaly maps."""

    frame: pd.DataFrame
    settings: dict
    notes: list[str]
    skipped: list[tuple[str, str]]
    cut: float
    suspect_maps: dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# Listing and checking the images


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file (png, jpg, jpeg, bmp, tif, tiff; any case) under ``folder``, nested
    folders included, sorted; hidden files and folders (names starting with ".") are left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CleanError(f"{folder}: not a folder. Fix: give the folder that holds the images")
    images = sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    )
    if not images:
        raise CleanError(
            f"{folder}: no image ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}) in it or its "
            "subfolders. Fix: give the folder that holds the images"
        )
    return images


def _decode_problem(path: Path) -> str | None:
    try:
        read_image(path)
    except DatasetError as error:
        return str(error)
    return None


def _find_unreadable(paths: Sequence[Path], threads: int, progress: bool) -> list[tuple[str, str]]:
    """``(path, problem)`` of every file that does not decode to an RGB image."""
    with ThreadPoolExecutor(threads) as pool:
        problems = list(
            tqdm(
                pool.map(_decode_problem, paths),
                total=len(paths),
                desc="check",
                unit="img",
                file=sys.stderr,
                disable=not progress,
            )
        )
    return [(str(p), problem) for p, problem in zip(paths, problems, strict=True) if problem]


def _unreadable_error(bad: Sequence[tuple[str, str]]) -> CleanError:
    shown = "\n".join(f"  {problem}" for _, problem in bad[:_PROBLEMS_SHOWN])
    more = f"\n  ... and {len(bad) - _PROBLEMS_SHOWN} more" if len(bad) > _PROBLEMS_SHOWN else ""
    return CleanError(
        f"{len(bad)} image(s) cannot be read:\n{shown}{more}\nFix: repair or remove them, or "
        "leave them out with --skip-bad (skip_bad=True)"
    )


# --------------------------------------------------------------------------------------------
# Embedding through the cache


def _cache_path(cache_dir: Path, config: BackboneConfig, paths: Sequence[Path]) -> Path:
    """One cache per (backbone configuration, exact set of files): a file added, removed or
    rewritten (size or modification time) gives another cache."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return cache_dir / f"{config.tag()}-{digest.hexdigest()[:16]}.h5"


def _index(paths: Sequence[Path]) -> pd.DataFrame:
    """The index that ``build_cache`` expects, for unlabelled images (ids = absolute paths)."""
    return pd.DataFrame(
        {
            "image_id": [str(path.resolve()) for path in paths],
            "category": _CACHE_CATEGORY,
            "origin": "unlabelled",
            "defect_type": "unknown",
            "label": -1,
            "path": [str(path) for path in paths],
            "mask_path": "",
        }
    )


def _embedded(
    paths: Sequence[Path],
    config: BackboneConfig,
    cache_dir: Path,
    threads: int,
    skip_bad: bool,
    progress: bool,
) -> tuple[list[Path], dict[str, np.ndarray], pd.DataFrame, list[tuple[str, str]], bool]:
    """Features of the readable images, their metadata, the unreadable files and whether the
    cache was reused."""
    from sroc.embeddings import build_cache
    from sroc.feature_cache import load_features, read_cache_index

    cache = _cache_path(cache_dir, config, paths)
    reused = cache.is_file()
    if reused:
        # The files left out of the cache are those found unreadable when it was built.
        cached = set(read_cache_index(cache)["image_id"])
        bad = _find_unreadable([p for p in paths if str(p.resolve()) not in cached], threads, False)
    else:
        bad = _find_unreadable(paths, threads, progress)
    if bad and not skip_bad:
        raise _unreadable_error(bad)
    bad_paths = {path for path, _ in bad}
    good = [path for path in paths if str(path) not in bad_paths]
    _check_count(len(good), len(bad))
    if not reused:
        build_cache(_index(good), cache, config, threads=threads, progress=progress)
    else:
        logger.info("reusing the embedding cache %s", cache)
    features, metadata = load_features(cache, [str(path.resolve()) for path in good])
    return good, features, metadata, bad, reused


def _image_region(anomaly_map: np.ndarray, config, height: int, width: int) -> np.ndarray:
    """The part of a map that covers the image: without the margins of a padded input
    (``aspect="pad"``), at the image's size on the input; the map itself otherwise."""
    from sroc.backbones import input_geometry
    from sroc.geometry import crop_resize_maps

    if config.aspect != "pad":
        return anomaly_map
    geometry = input_geometry(config.aspect, config.input_size, height, width)
    box = geometry.grid_box(anomaly_map.shape)
    return crop_resize_maps(anomaly_map[None], box, geometry.box[2:])[0]


def _check_count(n_good: int, n_bad: int) -> None:
    if n_good < MIN_IMAGES:
        skipped = f" ({n_bad} unreadable skipped)" if n_bad else ""
        raise CleanError(
            f"only {n_good} readable image(s){skipped}; cleaning needs at least {MIN_IMAGES}: "
            "the healthy bulk is learned from the images themselves. Fix: give a folder with "
            "more images"
        )


# --------------------------------------------------------------------------------------------
# Scoring


def detector_factory(
    detector: str,
    params: Mapping | None,
    threads: int,
    random_state: int,
    exclude_self: bool,
) -> Callable[[], BaseDetector]:
    """A zero-argument callable returning a fresh unfitted detector (the refinement contract).

    ``params`` default to :data:`DEFAULT_DETECTOR_PARAMS`. ``exclude_self`` is passed to the
    detector (leave-one-out self-scoring) unless ``params`` set it.
    """
    from sroc.detectors import DETECTORS, make_detector

    if detector not in DETECTORS:
        raise CleanError(f"unknown detector {detector!r}. Fix: choose one of {sorted(DETECTORS)}")
    params = dict(DEFAULT_DETECTOR_PARAMS.get(detector, {}) if params is None else params)
    params.setdefault("exclude_self", exclude_self)
    return lambda: make_detector(detector, n_jobs=threads, random_state=random_state, **params)


def _suspect_maps(
    features: Mapping[str, np.ndarray],
    suspects: np.ndarray,
    kept: np.ndarray,
    factory: Callable[[], BaseDetector],
    progress: bool,
) -> np.ndarray:
    """Anomaly maps of the suspects by a detector fitted on the kept images only, so that a
    suspect is compared with the healthy set and not with itself or the other suspects."""
    detector = factory().fit({stage: values[kept] for stage, values in features.items()})
    maps = []
    with tqdm(
        total=len(suspects), desc="maps", unit="img", file=sys.stderr, disable=not progress
    ) as bar:
        for start in range(0, len(suspects), _MAP_CHUNK):
            chunk = suspects[start : start + _MAP_CHUNK]
            maps.append(detector.score({s: v[chunk] for s, v in features.items()})[1])
            bar.update(len(chunk))
    return np.concatenate(maps) if maps else np.empty((0, 0, 0), np.float32)


def _checked_ratio(ratio: str | float) -> str | float:
    if isinstance(ratio, str) and ratio.strip().lower() == "auto":
        return "auto"
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise CleanError(
            f"ratio {ratio!r} is neither 'auto' nor a number. Fix: use auto or a fraction such "
            "as 0.05"
        ) from None
    if not 0 <= value <= MAX_RATIO:
        raise CleanError(
            f"ratio {value} is outside [0, {MAX_RATIO}]. Fix: give the fraction of images to "
            f"drop (0.05 = 5 %); beyond {MAX_RATIO} the healthy images are no longer the bulk"
        )
    return value


# --------------------------------------------------------------------------------------------
# The whole cleaning


def run_clean(
    paths: Sequence[str | os.PathLike],
    ratio: str | float = "auto",
    detector: str = DEFAULT_DETECTOR,
    detector_params: Mapping | None = None,
    backbone: BackboneConfig | Mapping | None = None,
    cache_dir: str | os.PathLike | None = None,
    threads: int = 1,
    device: str | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    random_state: int = 0,
    maps: bool = True,
) -> CleanRun:
    """:func:`clean`, returning everything the report needs (see :class:`CleanRun`); ``maps``
    computes the suspects' anomaly maps."""
    paths = [Path(path) for path in paths]
    if not paths:
        raise CleanError("no image given. Fix: pass the paths of the images to clean")
    resolved = pd.Series([str(path.resolve()) for path in paths])
    if resolved.duplicated().any():
        repeated = resolved[resolved.duplicated()].tolist()[:5]
        raise CleanError(f"images given twice: {repeated}. Fix: list each image once")
    missing = [str(path) for path in paths if not path.is_file()][:5]
    if missing:
        raise CleanError(f"no such file(s): {missing}. Fix: check the paths")
    if not isinstance(threads, int) or threads < 1:
        raise CleanError(f"threads must be a positive integer, got {threads!r}")
    ratio = _checked_ratio(ratio)
    from sroc.backbones import BackboneConfig

    if backbone is None:
        backbone = BackboneConfig()
    elif isinstance(backbone, Mapping):
        backbone = BackboneConfig.from_dict(backbone)
    if device is not None:
        backbone = dataclasses.replace(backbone, device=device)
    factory = detector_factory(detector, detector_params, threads, random_state, True)

    with tempfile.TemporaryDirectory(prefix="sroc-clean-") as scratch:
        cache_root = Path(cache_dir) if cache_dir is not None else Path(scratch)
        good, features, metadata, skipped, reused = _embedded(
            paths, backbone, cache_root, threads, skip_bad, progress
        )
    from sroc.refinement import n_removed, sroc_ranking

    # SROC self-scoring: the detector fitted on every image scores every image (leave-one-out).
    with tqdm(total=1, desc="score", unit="fit", file=sys.stderr, disable=not progress) as bar:
        ranking = sroc_ranking(features, metadata["image_id"].to_numpy(str), factory)
        bar.update()
    scores, order = ranking.scores, ranking.order
    contamination = estimate_contamination(scores)
    n_suspects = n_removed(len(scores), contamination if ratio == "auto" else ratio)
    suspects, kept = order[:n_suspects], order[n_suspects:]
    if ratio == "auto":
        cut = tail_cut(scores)
    elif n_suspects:
        cut = float((scores[suspects[-1]] + scores[kept[0]]) / 2)
    else:
        cut = float(scores.max())

    rank = np.empty(len(scores), np.int64)
    rank[order] = np.arange(1, len(scores) + 1)
    is_suspect = np.zeros(len(scores), bool)
    is_suspect[suspects] = True
    frame = pd.DataFrame(
        {
            "path": [str(path) for path in good],
            "score": scores,
            "rank": rank,
            "suspect": is_suspect,
            "height": metadata["height"].to_numpy(),
            "width": metadata["width"].to_numpy(),
        }
    ).sort_values("rank", ignore_index=True)

    notes = []
    sizes = frame[["height", "width"]].drop_duplicates()
    if len(sizes) > 1 and backbone.aspect == "squash":
        notes.append(
            f"The images come in {len(sizes)} sizes (e.g. "
            + ", ".join(f"{h}x{w}" for h, w in sizes.head(3).itertuples(index=False))
            + f", HxW); every image is resized to {backbone.input_size}x{backbone.input_size} "
            "before embedding, so parts of other aspect ratios are squashed differently "
            "(backbone aspect='pad' keeps the aspect ratio)."
        )
    if skipped:
        notes.append(f"{len(skipped)} unreadable file(s) skipped (--skip-bad); listed below.")
    for note in notes:
        logger.warning("%s", note)
    settings = {
        "images": len(frame),
        "suspects": int(n_suspects),
        "ratio": ratio if ratio == "auto" else float(ratio),
        "estimated contamination": contamination,
        "z-score threshold (auto)": DEFAULT_THRESHOLD,
        "score cut": cut,
        "detector": detector,
        "detector parameters": json.dumps(factory().get_params(), sort_keys=True, default=str),
        "strategy": "SROC self-scoring, leave-one-out",
        "backbone": json.dumps(backbone.to_dict(), sort_keys=True),
        "embedding cache": "reused" if reused else ("built" if cache_dir else "not kept"),
        "threads": threads,
        "random state": random_state,
    }
    suspect_maps = {}
    if maps and n_suspects:
        against_kept = detector_factory(detector, detector_params, threads, random_state, False)
        suspect_maps = {
            str(good[position]): _image_region(
                anomaly_map,
                backbone,
                int(metadata["height"].iloc[position]),
                int(metadata["width"].iloc[position]),
            )
            for position, anomaly_map in zip(
                suspects,
                _suspect_maps(features, suspects, kept, against_kept, progress),
                strict=True,
            )
        }
    frame.attrs["settings"] = settings
    frame.attrs["notes"] = notes
    return CleanRun(frame, settings, notes, skipped, cut, suspect_maps)


def clean(
    paths: Sequence[str | os.PathLike],
    ratio: str | float = "auto",
    detector: str = DEFAULT_DETECTOR,
    detector_params: Mapping | None = None,
    backbone: BackboneConfig | Mapping | None = None,
    cache_dir: str | os.PathLike | None = None,
    threads: int = 1,
    device: str | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    random_state: int = 0,
) -> pd.DataFrame:
    """Score unlabelled images and flag the likely defective ones, without touching them.

    Returns one row per readable image, most anomalous first, with columns ``path`` (as given),
    ``score`` (the detector's self-score, higher = more anomalous), ``rank`` (1 = most
    anomalous), ``suspect`` (bool) and the original ``height`` and ``width``;
    ``frame.attrs["settings"]`` and ``frame.attrs["notes"]`` describe the run.

    - ``ratio``: ``"auto"`` (estimated from the scores, :mod:`sroc.contamination`) or the
      fraction of images to flag, in [0, 0.5].
    - ``detector``, ``detector_params``: a detector of ``sroc.detectors`` (default KNN, k=5,
      leave-one-out self-scores).
    - ``backbone``: a :class:`~sroc.backbones.BackboneConfig` or its dict (default: the project's
      tf_efficientnet_lite2 at 380 px); ``device`` overrides its device ("cpu", "cuda").
    - ``cache_dir``: where the embedding cache is kept so that a second call on the same files
      reuses it (default: a temporary folder, removed afterwards).
    - ``skip_bad``: leave unreadable files out (logged) instead of raising :class:`CleanError`.
    """
    return run_clean(
        paths,
        ratio=ratio,
        detector=detector,
        detector_params=detector_params,
        backbone=backbone,
        cache_dir=cache_dir,
        threads=threads,
        device=device,
        skip_bad=skip_bad,
        progress=progress,
        random_state=random_state,
        maps=False,
    ).frame
