"""The backbone at work: :class:`FeatureExtractor` turns images into ``{stage: (n, C, H, W)}``
feature maps, finest stage first, with torch or with the same network exported to ONNX Runtime
(about 2-3x faster on CPU; see ``docs/backbones.md``); :func:`select_runner` picks one of the two.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sroc.backbones.config import BackboneConfig
from sroc.backbones.geometry import InputGeometry, input_geometry, stage_stride
from sroc.backbones.weights import create_model
from sroc.io import atomic_path

logger = logging.getLogger(__name__)

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
