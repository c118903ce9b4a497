"""Building the embedding cache: every image of one category through the frozen backbone, once.

:func:`build_cache` decodes the images, runs the backbone (ONNX Runtime or torch, see
:func:`sroc.backbones.select_runner`) and writes one HDF5 file per (dataset, category, backbone
configuration) in the layout of :mod:`sroc.feature_cache`, which also holds its readers. The file
is written under a temporary name and renamed when complete, so that a killed job leaves nothing
that a later step accepts.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import h5py
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from sroc.backbones import BackboneConfig, FeatureExtractor, InputGeometry, select_runner
from sroc.datasets.layout import INDEX_COLUMNS, image_size
from sroc.feature_cache import write_image_metadata
from sroc.io import atomic_path

logger = logging.getLogger(__name__)


def _validated_index(index: pd.DataFrame) -> pd.DataFrame:
    missing = [column for column in INDEX_COLUMNS if column not in index.columns]
    if missing:
        raise ValueError(
            f"index lacks column(s) {missing}: build it with sroc.datasets.layout.index_category"
        )
    if index.empty:
        raise ValueError("index holds no image: nothing to embed")
    categories = index["category"].unique()
    if len(categories) != 1:
        raise ValueError(
            f"index mixes categories {sorted(categories)}: one cache holds one category"
        )
    duplicated = index["image_id"][index["image_id"].duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"index repeats image ids {list(duplicated[:5])}: ids must be unique")
    return index.sort_values("image_id", ignore_index=True)


class _BatchReader:
    """Decodes and preprocesses batches in background threads while the caller runs inference.

    Iterating yields ``(start, batch, heights, widths, boxes)`` in index order (``boxes``: each
    image's (top, left, height, width) on the input canvas). An error while reading (e.g. a
    corrupt file, raised by ``sroc.datasets.layout.read_image`` with the file named, or an image
    whose tiles do not give ``canvas``) is re-raised in the consumer.
    """

    def __init__(
        self,
        paths: Sequence[str],
        extractor: FeatureExtractor,
        batch_size: int,
        threads: int,
        canvas: InputGeometry,
    ):
        self._paths = list(paths)
        self._extractor = extractor
        self._canvas = canvas
        self._batch_size = batch_size
        self._threads = threads
        # Enough decoded batches to keep every inference worker busy.
        self._queue: queue.Queue = queue.Queue(maxsize=threads + 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="sroc-image-reader", daemon=True)

    def __enter__(self) -> _BatchReader:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass

    def _load(self, path: str) -> tuple[np.ndarray, int, int, tuple]:
        from sroc.datasets.layout import read_image

        image = read_image(path)
        geometry = self._extractor.geometry(image.shape[0], image.shape[1])
        _check_same_canvas(geometry, self._canvas, path, image.shape[:2])
        pixels = self._extractor.preprocess(image, geometry)
        return pixels, image.shape[0], image.shape[1], geometry.box

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            with ThreadPoolExecutor(self._threads, thread_name_prefix="sroc-decode") as pool:
                for start in range(0, len(self._paths), self._batch_size):
                    chunk = self._paths[start : start + self._batch_size]
                    loaded = list(pool.map(self._load, chunk))
                    batch = np.stack([pixels for pixels, _, _, _ in loaded])
                    heights = np.array([h for _, h, _, _ in loaded], np.int32)
                    widths = np.array([w for _, _, w, _ in loaded], np.int32)
                    boxes = np.array([box for _, _, _, box in loaded], np.int32)
                    if not self._put((start, batch, heights, widths, boxes)):
                        return
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._put(error)
            return
        self._put(None)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def _check_same_canvas(
    geometry: InputGeometry, canvas: InputGeometry, path: str, size: Sequence[int]
) -> None:
    """One cache holds one grid per stage: with ``aspect="tile"`` every image must be cut into
    the tiles of the cache's first image."""
    if (geometry.canvas_hw, geometry.tile_offsets) == (canvas.canvas_hw, canvas.tile_offsets):
        return
    raise ValueError(
        f"{path} ({size[0]}x{size[1]}, HxW) is resized to {geometry.canvas_hw[0]}x"
        f"{geometry.canvas_hw[1]} for aspect='tile', but the category's first image gave "
        f"{canvas.canvas_hw[0]}x{canvas.canvas_hw[1]}: one cache needs one feature grid, so "
        "aspect='tile' needs images of about one aspect ratio. Fix: use aspect='pad' (any aspect "
        "ratios) or 'squash', or crop/resize the images to one shape"
    )


def _library_versions() -> dict:
    import onnxruntime
    import timm

    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnxruntime": onnxruntime.__version__,
        "h5py": h5py.__version__,
    }


def build_cache(
    index: pd.DataFrame,
    cache_path: str | os.PathLike,
    config: BackboneConfig | Mapping,
    threads: int = 1,
    progress: bool = True,
    onnx_dir: str | os.PathLike | None = None,
) -> None:
    """Embed every image of ``index`` (one category, see
    ``sroc.datasets.layout.index_category``) into the HDF5 cache ``cache_path``.

    ``threads`` is the number of inference threads (ONNX Runtime: batches embedded at once;
    torch: intra-op threads) and of image-decoding threads, which decode and resize the next
    batches while the current ones are embedded. ``onnx_dir`` keeps exported
    ONNX models (default :func:`sroc.backbones.default_onnx_dir`). The file appears at
    ``cache_path`` only once complete; an unreadable image fails the job with the file named.
    """
    if isinstance(config, Mapping):
        config = BackboneConfig.from_dict(config)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    index = _validated_index(index)
    category = str(index["category"].iloc[0])
    n_images = len(index)
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        extractor = FeatureExtractor(config)
        # With aspect="tile" the first image fixes the canvas, hence the grid, of the cache;
        # squashed and padded images all have the square one.
        size = config.input_size
        first_hw = image_size(index["path"].iloc[0]) if config.aspect == "tile" else (size, size)
        canvas = extractor.geometry(*first_hw)
        shapes = extractor.output_shapes(canvas)
        with (
            atomic_path(cache_path, suffix=".h5.tmp") as temporary,
            h5py.File(temporary, "w") as h5,
            _BatchReader(index["path"], extractor, config.batch_size, threads, canvas) as batches,
            tqdm(
                total=n_images,
                unit="img",
                desc=f"embed {category}",
                file=sys.stderr,
                disable=not progress,
                mininterval=1.0 if sys.stderr.isatty() else 15.0,
            ) as bar,
        ):
            write_image_metadata(h5, index)
            writer = _FeatureWriter(h5, extractor, n_images, category, shapes)
            batch_iterator = iter(batches)
            start, batch, heights, widths, boxes = next(batch_iterator)
            tiles = extractor.split_tiles(batch, canvas)
            runner, runtime, outputs = select_runner(extractor, tiles, onnx_dir)
            runner = extractor.tiled(runner, canvas)  # canvases in, stitched maps out
            # ONNX Runtime runs `threads` batches at once, one thread each; torch uses its own
            # intra-op threads on one batch at a time.
            workers = threads if runtime == "onnxruntime" else 1
            first = Future()
            first.set_result(extractor.stitch(outputs, canvas, len(batch)))
            pending = deque([(start, heights, widths, boxes, first)])
            with ThreadPoolExecutor(workers, thread_name_prefix="sroc-infer") as pool:
                for start, batch, heights, widths, boxes in batch_iterator:
                    pending.append((start, heights, widths, boxes, pool.submit(runner, batch)))
                    while len(pending) > workers:
                        bar.update(writer.write(*pending.popleft()))
                while pending:
                    bar.update(writer.write(*pending.popleft()))
            writer.finish()
            h5.attrs["backbone_config"] = json.dumps(config.to_dict(), sort_keys=True)
            h5.attrs["feature_fields"] = json.dumps(config.feature_fields(), sort_keys=True)
            h5.attrs["config_hash"] = config.config_hash()
            h5.attrs["category"] = category
            h5.attrs["stages"] = json.dumps(list(extractor.stages))
            h5.attrs["runtime"] = runtime
            h5.attrs["versions"] = json.dumps(_library_versions(), sort_keys=True)
            if config.aspect != "squash":
                h5.attrs["input_canvas"] = json.dumps(list(canvas.canvas_hw))
            h5.attrs["complete"] = 1  # last: marks the file as finished
    finally:
        torch.set_num_threads(previous_threads)
    elapsed = time.perf_counter() - started
    logger.info(
        "embedded %d images of %s with %s (%s) in %.1f s, %.1f images/s -> %s",
        n_images,
        category,
        config.tag(),
        runtime,
        elapsed,
        n_images / elapsed,
        cache_path,
    )


class _FeatureWriter:
    """Writes batches of stage outputs (in index order), the original image sizes and, unless
    the images are squashed, where each lies on the input canvas."""

    def __init__(
        self,
        h5: h5py.File,
        extractor: FeatureExtractor,
        n_images: int,
        category: str,
        shapes: Mapping[str, tuple[int, int, int]],
    ):
        self._extractor = extractor
        self._shapes = dict(shapes)
        self._dtype = np.dtype(extractor.config.feature_dtype)
        self._category = category
        self._h5 = h5
        group = h5.create_group("features", track_order=True)
        self._datasets = {
            stage: group.create_dataset(
                stage, shape=(n_images, *shape), dtype=self._dtype, chunks=(1, *shape)
            )
            for stage, shape in self._shapes.items()
        }
        self._heights = np.zeros(n_images, np.int32)
        self._widths = np.zeros(n_images, np.int32)
        self._boxes = np.zeros((n_images, 4), np.int32)

    def write(
        self,
        start: int,
        heights: np.ndarray,
        widths: np.ndarray,
        boxes: np.ndarray,
        outputs: Future,
    ) -> int:
        """Store one batch; returns its number of images."""
        outputs = outputs.result()
        count = len(heights)
        self._extractor.check_outputs(outputs, count, self._shapes)
        stop = start + count
        for stage, dataset in self._datasets.items():
            values = outputs[stage].astype(self._dtype, copy=False)
            if not np.isfinite(values).all():
                raise FloatingPointError(
                    f"stage {stage!r} has values that are not finite in {self._dtype} (images "
                    f"{start}..{stop - 1} of {self._category}): use feature_dtype float32"
                )
            dataset[start:stop] = values
        self._heights[start:stop] = heights
        self._widths[start:stop] = widths
        self._boxes[start:stop] = boxes
        return count

    def finish(self) -> None:
        self._h5["images/height"] = self._heights
        self._h5["images/width"] = self._widths
        if self._extractor.config.aspect != "squash":  # squash caches keep their old layout
            self._h5["images/input_box"] = self._boxes
