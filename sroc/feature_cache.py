"""The embedding cache on disk: its layout, and everything that reads it.

One HDF5 file per (dataset, category, backbone configuration)::

    /features/<stage>   (n, C, H, W) float16 (or float32), one chunk per image, finest stage first
    /images/image_id, origin, defect_type, mask_path, path   utf-8 strings
    /images/label       int8;   /images/height, /images/width   int32, original image size
    /images/input_box   int32 (n, 4), only for aspect "pad" and "tile": each image's (top, left,
                        height, width) on the input canvas, in backbone-input pixels
    attrs: backbone_config (JSON), config_hash, category, stages (JSON), runtime, versions,
           input_canvas (JSON [H, W], only with input_box), complete = 1 (written last)

:mod:`sroc.embeddings` builds the file under a temporary name and renames it when complete, and
the readers here refuse a file without ``complete``: a killed job leaves nothing that a later
step accepts. This module imports neither torch nor the backbone runtime: the grid jobs only read
caches, and each of them would otherwise pay for loading torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

_STRING_COLUMNS = ("image_id", "origin", "defect_type", "mask_path", "path")
METADATA_COLUMNS = (
    "image_id",
    "category",
    "origin",
    "defect_type",
    "label",
    "mask_path",
    "path",
    "height",
    "width",
)


class IncompleteCacheError(ValueError):
    """An embedding cache was not finished (interrupted build) or is not a cache at all."""


def write_image_metadata(h5: h5py.File, index: pd.DataFrame) -> None:
    """The ``/images`` strings and labels of ``index``'s rows, in its order (the builder adds
    the image sizes and boxes once the images are decoded)."""
    images = h5.create_group("images")
    text = h5py.string_dtype("utf-8")
    for column in _STRING_COLUMNS:
        images.create_dataset(column, data=index[column].astype(str).to_numpy(object), dtype=text)
    images["label"] = index["label"].to_numpy().astype(np.int8)


def _open_complete(cache_path: str | os.PathLike) -> h5py.File:
    path = Path(cache_path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding cache {path} does not exist: build it first")
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise IncompleteCacheError(
            f"{path} is not a readable HDF5 file ({error}); an interrupted write leaves such "
            "files: delete it and rebuild the cache"
        ) from error
    if h5.attrs.get("complete") != 1:
        h5.close()
        raise IncompleteCacheError(
            f"{path} is an unfinished embedding cache (no 'complete' mark): its build was "
            "interrupted. Delete it and rebuild the cache"
        )
    return h5


def _read_metadata(h5: h5py.File) -> pd.DataFrame:
    images = h5["images"]
    columns = {column: images[column].asstr()[:] for column in _STRING_COLUMNS}
    columns["label"] = images["label"][:].astype(np.int64)
    columns["height"] = images["height"][:].astype(np.int64)
    columns["width"] = images["width"][:].astype(np.int64)
    frame = pd.DataFrame(columns)
    frame["category"] = str(h5.attrs["category"])
    return frame[list(METADATA_COLUMNS)]


def read_cache_index(cache_path: str | os.PathLike) -> pd.DataFrame:
    """The metadata of every image in a complete cache (no features), in stored order.

    Columns: image_id, category, origin, defect_type, label, mask_path, path, height, width.
    """
    with _open_complete(cache_path) as h5:
        return _read_metadata(h5)


def cache_shapes(cache_path: str | os.PathLike) -> tuple[int, dict[str, tuple[int, int, int]]]:
    """``(n_images, {stage: (C, H, W)})`` of a complete cache, finest stage first."""
    with _open_complete(cache_path) as h5:
        stages = json.loads(h5.attrs["stages"])
        shapes = {stage: tuple(int(d) for d in h5["features"][stage].shape) for stage in stages}
    n_images = next(iter(shapes.values()))[0]
    return n_images, {stage: shape[1:] for stage, shape in shapes.items()}


def input_boxes(
    cache_path: str | os.PathLike, image_ids: Sequence[str] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Where each image lies on the backbone input: ``(boxes, canvas_hw)``, ``boxes`` int64
    (n, 4) of (top, left, height, width) in backbone-input pixels on the canvas of
    ``canvas_hw``, which the feature maps span (default: all images, in stored order).

    Squashed images (``aspect="squash"``, and caches from before the choice existed) fill the
    S x S canvas; padded ones fill their box; tiled ones fill their S x L (or L x S) canvas.
    """
    with _open_complete(cache_path) as h5:
        image_column = h5["images/image_id"].asstr()[:]
        if "input_box" in h5["images"]:
            boxes = h5["images/input_box"][:].astype(np.int64)
            canvas = tuple(int(v) for v in json.loads(h5.attrs["input_canvas"]))
        else:
            size = int(json.loads(h5.attrs["backbone_config"])["input_size"])
            canvas = (size, size)
            boxes = np.tile(np.array([0, 0, size, size], np.int64), (len(image_column), 1))
    if image_ids is None:
        return boxes, canvas
    row_of = pd.Series(np.arange(len(image_column)), index=image_column)
    unknown = [str(i) for i in image_ids if str(i) not in row_of.index]
    if unknown:
        raise KeyError(f"{len(unknown)} image id(s) not in {cache_path}, e.g. {unknown[:5]}")
    return boxes[row_of.loc[[str(i) for i in image_ids]].to_numpy()], canvas


def _read_rows(dataset: h5py.Dataset, positions: np.ndarray) -> np.ndarray:
    """Rows ``positions`` of ``dataset`` as float32, read as contiguous runs (h5py's fancy
    indexing is slow and needs sorted indices)."""
    out = np.empty((len(positions), *dataset.shape[1:]), np.float32)
    order = np.argsort(positions, kind="stable")
    sorted_positions = positions[order]
    breaks = np.flatnonzero(np.diff(sorted_positions) != 1) + 1
    for run in np.split(np.arange(len(positions)), breaks):
        first, last = sorted_positions[run[0]], sorted_positions[run[-1]]
        out[order[run]] = dataset[first : last + 1]
    return out


def load_features(
    cache_path: str | os.PathLike,
    image_ids: Sequence[str] | None = None,
    stages: Sequence[str] | None = None,
) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Features (float32, ``{stage: (n, C, H, W)}``, finest stage first) and metadata rows of
    ``image_ids`` in that order (default: all images, in stored order). ``stages`` selects a
    subset of the stored stages. Refuses an unfinished cache with :class:`IncompleteCacheError`.
    """
    with _open_complete(cache_path) as h5:
        metadata = _read_metadata(h5)
        stored = json.loads(h5.attrs["stages"])
        if stages is None:
            selected = stored
        else:
            unknown = [stage for stage in stages if stage not in stored]
            if unknown:
                raise KeyError(f"stage(s) {unknown} not in {cache_path}; it holds {stored}")
            selected = [stage for stage in stored if stage in set(stages)]
        if image_ids is None:
            features = {s: h5["features"][s][...].astype(np.float32) for s in selected}
            return features, metadata
        image_ids = [str(image_id) for image_id in image_ids]
        if len(set(image_ids)) != len(image_ids):
            raise ValueError("image_ids repeat an id: ask for each image once")
        row_of = pd.Series(np.arange(len(metadata)), index=metadata["image_id"])
        unknown = [image_id for image_id in image_ids if image_id not in row_of.index]
        if unknown:
            raise KeyError(
                f"{len(unknown)} image id(s) not in {cache_path}, e.g. {unknown[:5]}: the cache "
                "was built from another index"
            )
        positions = row_of.loc[image_ids].to_numpy()
        features = {s: _read_rows(h5["features"][s], positions) for s in selected}
    return features, metadata.iloc[positions].reset_index(drop=True)
