"""Aspect ratio: where an image of any size lies on the square backbone input.

:func:`input_geometry` places an image on the network input for each ``aspect`` of
:class:`~sroc.backbones.config.BackboneConfig` (squash, pad or tile; docs/backbones.md, "Aspect
ratio"), and :func:`stage_stride` recovers a stage's stride from its grid. Plain arithmetic,
no torch: placing maps back on images needs no network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# How an image reaches the square backbone input (docs/backbones.md, "Aspect ratio"): resized
# whole to S x S (the paper), longer side to S and padded to a square, or shorter side to S and
# covered by S x S tiles whose feature maps are stitched back into one wide (or tall) map.
ASPECTS = ("squash", "pad", "tile")
# A tiled long side may be shortened by up to this fraction when that saves a tile.
TILE_MAX_SHRINK = 0.05


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
