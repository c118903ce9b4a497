"""Readers and the validated index of a dataset in the MVTec AD folder layout.

Layout of one category (``<root>/<category>``)::

    train/good/<stem>.<ext>                    defect-free training images
    test/good/<stem>.<ext>                     defect-free test images
    test/<defect_type>/<stem>.<ext>            defective test images
    ground_truth/<defect_type>/<stem>_mask.<ext>   one mask per defective image

Everything that can be wrong with a dataset is reported as a :class:`DatasetError` whose message
names the file, the problem and the fix, before any feature is computed.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
INDEX_COLUMNS = ("image_id", "category", "origin", "defect_type", "label", "path", "mask_path")
GOOD = "good"
MASK_STEM_SUFFIX = "_mask"

# Modes Pillow converts to RGB without losing meaning. Alpha (RGBA, LA, PA) is dropped, not
# composited: inspection images are opaque, and compositing would invent a background colour.
_RGB_CONVERTIBLE_MODES = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "La", "CMYK", "YCbCr"}
)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_MAX_PROBLEMS_SHOWN = 20
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    zlib.error,
    Image.DecompressionBombError,
)


class DatasetError(ValueError):
    """A dataset file or folder is unusable; the message says which file, why, and the fix."""


def _problem(path: str | os.PathLike, problem: str, fix: str) -> str:
    return f"{path}: {problem}. Fix: {fix}."


def _decode(path: str | os.PathLike, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Open ``path`` with Pillow, decode every pixel and return ``convert(image)``.

    Decoding fully (``load``) is what exposes truncated files; ``Image.open`` alone reads only the
    header.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            _problem(path, "no such file", "check the dataset root and that the file was copied")
        )
    try:
        with Image.open(path) as image:
            image.load()
            if image.format == "PNG":
                _require_png_end(path)
            return convert(image)
    except DatasetError:
        raise
    except _DECODE_ERRORS as error:
        raise DatasetError(
            _problem(
                path,
                f"cannot decode the image ({type(error).__name__}: {error}); the file is "
                "truncated, corrupt or not an image",
                "re-copy or re-export the file, or delete it from the dataset",
            )
        ) from error


def _require_png_end(path: Path) -> None:
    """Reject a PNG whose IEND chunk is missing: Pillow decodes such a file without complaint
    when only the end is cut off, yet it is the signature of an interrupted copy."""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - 1024))
        tail = handle.read()
    if b"IEND" not in tail:
        raise DatasetError(
            _problem(
                path,
                "truncated PNG: the end-of-image (IEND) chunk is missing",
                "re-copy or re-export the file",
            )
        )


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        # Full 16-bit range onto 0..255, rounded; Pillow's own convert would clip at 255 instead.
        wide = np.asarray(image).astype(np.uint32)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode not in _RGB_CONVERTIBLE_MODES:
        raise DatasetError(
            _problem(
                image.filename,
                f"unsupported pixel mode {image.mode!r}",
                "convert the image to 8-bit grayscale or RGB (e.g. PNG)",
            )
        )
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    # np.array copies: np.asarray would give a read-only view that torch.from_numpy warns about.
    return np.array(rgb, dtype=np.uint8)


def _mask_values(image: Image.Image) -> np.ndarray:
    """One integer channel per mask: palette indices for "P", the brightest colour channel for
    RGB(A), the stored value otherwise; alpha is ignored."""
    mode = image.mode
    if mode in {"1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"}:
        values = np.asarray(image)
    elif mode in {"LA", "PA", "La"}:
        values = np.asarray(image)[:, :, 0]
    elif mode in {"RGB", "RGBA", "RGBX", "RGBa"}:
        values = np.asarray(image)[:, :, :3].max(axis=2)
    else:
        values = np.asarray(image.convert("L"))
    if values.dtype == bool:
        values = values.astype(np.uint8)
    return values


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a png/jpg/bmp image as ``uint8`` RGB of shape (H, W, 3).

    Grayscale is replicated to three channels, 16-bit grayscale is scaled to 8 bits, and the alpha
    channel of RGBA/LA images is dropped. Unreadable or truncated files raise
    :class:`DatasetError`.
    """
    return _decode(path, _to_rgb)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """The (height, width) of an image, read from its header (the index validated its pixels)."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError) as error:
        raise DatasetError(
            _problem(path, f"cannot read the image header ({error})", "re-run the index rule")
        ) from error


def read_mask(path: str | os.PathLike, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as a boolean (H, W) array: any nonzero pixel is defective.

    Masks stored as 0/255 or 0/1 both work. With ``expected_hw`` (the image's height and width),
    a mask of another size raises :class:`DatasetError`.
    """
    mask = _decode(path, _mask_values) != 0
    if expected_hw is not None and tuple(mask.shape) != tuple(expected_hw):
        raise DatasetError(_mask_size_problem(path, mask.shape, expected_hw))
    return mask


def _mask_size_problem(path, mask_hw, image_hw) -> str:
    return _problem(
        path,
        f"mask is {mask_hw[0]}x{mask_hw[1]} (HxW) but its image is {image_hw[0]}x{image_hw[1]}",
        "export the mask at the image's size (resize with nearest-neighbour interpolation)",
    )


def _is_image_file(entry: os.DirEntry) -> bool:
    return entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    """Entries of ``folder`` sorted by name, hidden files (".DS_Store", editor swap files) left
    out."""
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def list_categories(root: str | os.PathLike) -> list[str]:
    """Sorted names of the category folders of a dataset root.

    A category folder is a subfolder holding a ``train`` or ``test`` folder; anything else at the
    root (licence files, other folders) is ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            _problem(
                root,
                "dataset root is not a folder",
                "point the config at the folder that "
                "holds the category folders (<root>/<category>/train/good)",
            )
        )
    if (root / "train").is_dir() or (root / "test").is_dir():
        raise DatasetError(
            _problem(
                root,
                "this is a category folder, not a dataset root",
                f"use its parent {root.parent} as root and {root.name!r} as category",
            )
        )
    categories = [
        entry.name
        for entry in _visible_entries(root)
        if entry.is_dir()
        and (Path(entry.path, "train").is_dir() or Path(entry.path, "test").is_dir())
    ]
    if not categories:
        raise DatasetError(
            _problem(
                root,
                "no category folder found (none holds train/ or test/)",
                "use the MVTec AD layout <root>/<category>/train/good, test/<defect_type>",
            )
        )
    return categories


@dataclass
class _FolderListing:
    images: dict[str, Path]  # file stem -> path
    ignored: list[Path]


def _list_image_folder(folder: Path, problems: list[str]) -> _FolderListing:
    images: dict[str, Path] = {}
    ignored: list[Path] = []
    for entry in _visible_entries(folder):
        path = Path(entry.path)
        if not _is_image_file(entry):
            ignored.append(path)
            continue
        stem = path.stem
        if stem in images:
            problems.append(
                _problem(
                    path,
                    f"two images share the stem {stem!r} (the other is {images[stem]})",
                    "keep one of them: image ids are built from file stems",
                )
            )
            continue
        images[stem] = path
    return _FolderListing(images, ignored)


def _list_masks(folder: Path, problems: list[str]) -> dict[str, Path]:
    """Map image stem -> mask path for ``<stem>_mask.<ext>`` files of one defect type."""
    masks: dict[str, Path] = {}
    if not folder.is_dir():
        return masks
    for entry in _visible_entries(folder):
        path = Path(entry.path)
        if not _is_image_file(entry) or not path.stem.endswith(MASK_STEM_SUFFIX):
            continue
        stem = path.stem[: -len(MASK_STEM_SUFFIX)]
        if stem in masks:
            problems.append(
                _problem(
                    path,
                    f"two masks for image stem {stem!r} (the other is {masks[stem]})",
                    "keep one mask per image",
                )
            )
            continue
        masks[stem] = path
    return masks


def _raise_problems(category_dir: Path, problems: list[str]) -> None:
    if not problems:
        return
    shown = problems[:_MAX_PROBLEMS_SHOWN]
    more = len(problems) - len(shown)
    lines = "\n".join(f"  - {p}" for p in shown)
    tail = f"\n  ... and {more} more" if more else ""
    raise DatasetError(
        f"{len(problems)} problem(s) in dataset category {category_dir}:\n{lines}{tail}"
    )


def _warn_files(message: str, paths: Iterable[Path | str], limit: int = 10) -> None:
    paths = [str(p) for p in paths]
    if paths:
        shown = ", ".join(paths[:limit]) + (
            f" (+{len(paths) - limit} more)" if len(paths) > limit else ""
        )
        logger.warning("%s (%d): %s", message, len(paths), shown)


def index_category(
    root: str | os.PathLike,
    category: str,
    require_masks: bool = True,
    verify_pixels: bool = True,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Index one category of an MVTec-layout dataset, validating it on the way.

    Returns one row per image, sorted by ``image_id``, with the columns of ``INDEX_COLUMNS``.
    ``require_masks=False`` declares a dataset without ground truth (e.g. elpv): masks are still
    used where present, and ``mask_path`` is "" elsewhere. ``verify_pixels`` decodes every image
    and mask (in ``n_jobs`` threads, default min(8, CPUs)) and checks mask sizes; all-zero masks
    are accepted with a warning. Every problem found is reported at once in one
    :class:`DatasetError`.
    """
    root = Path(root)
    category_dir = root / category
    if not category_dir.is_dir():
        available = ", ".join(list_categories(root))
        raise DatasetError(
            _problem(
                category_dir,
                "category folder not found",
                f"use one of the categories under {root}: {available}",
            )
        )
    problems: list[str] = []
    ignored: list[Path] = []
    rows: list[dict] = []

    for origin in ("train", "test"):
        origin_dir = category_dir / origin
        if not origin_dir.is_dir():
            problems.append(
                _problem(
                    origin_dir,
                    "folder missing",
                    f"create {origin}/good (and test/<defect_type>) folders",
                )
            )
            continue
        for entry in _visible_entries(origin_dir):
            path = Path(entry.path)
            if _is_image_file(entry):
                problems.append(
                    _problem(
                        path,
                        f"image lies directly in {origin}/",
                        f"move it into {origin}/good/ or {origin}/<defect_type>/",
                    )
                )
            elif not entry.is_dir():
                ignored.append(path)
            elif origin == "train" and entry.name != GOOD:
                problems.append(
                    _problem(
                        path,
                        "train/ may only hold good/",
                        "move defective images to test/<defect_type>/; "
                        "polluted training sets are built by the benchmark",
                    )
                )
            else:
                listing = _list_image_folder(path, problems)
                ignored.extend(listing.ignored)
                for stem, image_path in listing.images.items():
                    rows.append(
                        {
                            "image_id": f"{origin}/{entry.name}/{stem}",
                            "category": category,
                            "origin": origin,
                            "defect_type": entry.name,
                            "label": int(entry.name != GOOD),
                            "path": os.path.abspath(image_path),
                            "mask_path": "",
                        }
                    )

    if not any(row["origin"] == "train" and row["defect_type"] == GOOD for row in rows):
        problems.append(
            _problem(
                category_dir / "train" / GOOD,
                "no training image found",
                f"put the defect-free images ({', '.join(sorted(IMAGE_SUFFIXES))}) in train/good/",
            )
        )
    if not any(row["origin"] == "test" for row in rows):
        problems.append(
            _problem(
                category_dir / "test",
                "no test image found",
                "put test images in test/good/ and test/<defect_type>/",
            )
        )

    _attach_masks(category_dir, rows, require_masks, problems)
    _raise_problems(category_dir, problems)
    _warn_files(f"Ignored files that are not {'/'.join(sorted(IMAGE_SUFFIXES))} images", ignored)

    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    index = index.sort_values("image_id", ignore_index=True)
    index["label"] = index["label"].astype(np.int64)
    if verify_pixels:
        _verify_pixels(category_dir, index, n_jobs)
    return index


def _attach_masks(
    category_dir: Path, rows: list[dict], require_masks: bool, problems: list[str]
) -> None:
    masks_by_type: dict[str, dict[str, Path]] = {}
    for row in rows:
        if row["label"] == 0:
            continue
        defect_type = row["defect_type"]
        if defect_type not in masks_by_type:
            masks_by_type[defect_type] = _list_masks(
                category_dir / "ground_truth" / defect_type, problems
            )
        stem = Path(row["path"]).stem
        mask = masks_by_type[defect_type].pop(stem, None)
        if mask is not None:
            row["mask_path"] = os.path.abspath(mask)
        elif require_masks:
            expected = category_dir / "ground_truth" / defect_type / f"{stem}{MASK_STEM_SUFFIX}.png"
            problems.append(
                _problem(
                    row["path"],
                    f"defective image has no mask (expected {expected})",
                    "add the mask, or declare the dataset without masks (require_masks=False)",
                )
            )
    if not require_masks:
        with_mask = sum(1 for row in rows if row["mask_path"])
        defective = sum(row["label"] for row in rows)
        if 0 < with_mask < defective:
            logger.warning(
                "%s: only %d of %d defective images have a mask; pixel metrics need all of them",
                category_dir,
                with_mask,
                defective,
            )
    _warn_files(
        f"Masks without a matching image in {category_dir}",
        [p for masks in masks_by_type.values() for p in masks.values()],
    )


@dataclass
class _PixelCheck:
    problems: list[str]
    all_zero_mask: str | None = None
    soft_mask: str | None = None


def _check_one(image_path: str, mask_path: str) -> _PixelCheck:
    try:
        image_hw = read_image(image_path).shape[:2]
    except DatasetError as error:
        return _PixelCheck([str(error)])
    if not mask_path:
        return _PixelCheck([])
    try:
        values = _decode(mask_path, _mask_values)
    except DatasetError as error:
        return _PixelCheck([str(error)])
    if values.shape != image_hw:
        return _PixelCheck([_mask_size_problem(mask_path, values.shape, image_hw)])
    check = _PixelCheck([])
    if values.dtype == np.uint8:
        distinct_nonzero = np.count_nonzero(np.bincount(values.ravel(), minlength=256)[1:])
    else:
        distinct_nonzero = np.unique(values[values != 0]).size
    if distinct_nonzero == 0:
        check.all_zero_mask = mask_path
    elif distinct_nonzero > 1:
        check.soft_mask = mask_path
    return check


def _verify_pixels(category_dir: Path, index: pd.DataFrame, n_jobs: int | None) -> None:
    workers = n_jobs or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checks = list(pool.map(_check_one, index["path"], index["mask_path"]))
    _raise_problems(category_dir, [p for check in checks for p in check.problems])
    _warn_files(
        "All-zero masks (accepted: these defective images have no defect pixel, they "
        "count only as defect-free pixels in pixel metrics)",
        [c.all_zero_mask for c in checks if c.all_zero_mask],
    )
    _warn_files(
        "Masks with several nonzero values (soft edges or JPEG artefacts): every nonzero "
        "pixel counts as defect; binarise them if that is not intended",
        [c.soft_mask for c in checks if c.soft_mask],
    )


def read_index(path: str | os.PathLike) -> pd.DataFrame:
    """Read a category index saved with ``index.to_csv(path, index=False)``.

    String columns stay strings (``mask_path`` "" is not turned into NaN, an image stem "007" is
    not turned into 7), ``label`` is int64.
    """
    string_columns = [c for c in INDEX_COLUMNS if c != "label"]
    try:
        index = pd.read_csv(path, dtype={c: str for c in string_columns}, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DatasetError(
            _problem(
                path,
                f"cannot read the index ({error})",
                "delete it so that the workflow indexes the category again",
            )
        ) from error
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise DatasetError(
            _problem(
                path,
                f"not a category index: columns {missing} are missing",
                "delete it so that the workflow indexes the category again",
            )
        )
    index["label"] = index["label"].astype(np.int64)
    return index
