"""The reader and validated index of MVTec-layout datasets (sroc/datasets/layout.py)."""

from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sroc.datasets.layout import (
    INDEX_COLUMNS,
    DatasetError,
    index_category,
    list_categories,
    read_image,
    read_index,
    read_mask,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def random_rgb(seed: int, height: int = 20, width: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(pixels: np.ndarray, path: Path, format: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=format)
    return path


def square_mask(height: int = 20, width: int = 24, value: int = 255) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[5:10, 6:12] = value
    return mask


def build_category(root: Path, name: str = "widget") -> Path:
    """A valid category: 3 train goods, 2 test goods, crack x2 and hole x1 with masks."""
    category = root / name
    for i in range(3):
        save(random_rgb(i), category / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        save(random_rgb(10 + i), category / "test" / "good" / f"{i:03d}.png")
    for defect_type, count in (("crack", 2), ("hole", 1)):
        for i in range(count):
            save(random_rgb(20 + i), category / "test" / defect_type / f"{i:03d}.png")
            save(square_mask(), category / "ground_truth" / defect_type / f"{i:03d}_mask.png")
    return category


def expected_rows(category: Path) -> list[dict]:
    """The index written out by walking the folders with os.walk, independently of the reader."""
    rows = []
    for origin in ("train", "test"):
        for folder, _, files in os.walk(category / origin):
            defect_type = Path(folder).name
            for file in files:
                stem = Path(file).stem
                mask = category / "ground_truth" / defect_type / f"{stem}_mask.png"
                rows.append(
                    {
                        "image_id": f"{origin}/{defect_type}/{stem}",
                        "category": category.name,
                        "origin": origin,
                        "defect_type": defect_type,
                        "label": int(defect_type != "good"),
                        "path": str(Path(folder, file).absolute()),
                        "mask_path": str(mask.absolute()) if mask.exists() else "",
                    }
                )
    return sorted(rows, key=lambda r: r["image_id"])


# ------------------------------------------------------------------------------------------
# read_image / read_mask


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("BMP", ".bmp"), ("PNG", ".PNG")])
def test_lossless_rgb_images_read_back_exactly(tmp_path, fmt, suffix):
    pixels = random_rgb(0)
    image = read_image(save(pixels, tmp_path / f"a{suffix}", fmt))
    assert image.dtype == np.uint8 and image.shape == (20, 24, 3) and image.flags.writeable
    np.testing.assert_array_equal(image, pixels)


def test_jpeg_reads_as_rgb_close_to_the_original(tmp_path):
    smooth = np.repeat(np.linspace(0, 255, 24, dtype=np.uint8)[None, :, None], 20, 0)
    pixels = np.repeat(smooth, 3, 2)
    image = read_image(save(pixels, tmp_path / "a.JPG", "JPEG"))
    assert image.shape == (20, 24, 3)
    assert np.abs(image.astype(int) - pixels).mean() < 3


def test_gray_palette_rgba_and_16_bit_images_become_rgb(tmp_path):
    gray = random_rgb(1)[:, :, 0]
    np.testing.assert_array_equal(
        read_image(save(gray, tmp_path / "gray.png")), np.stack([gray] * 3, axis=2)
    )

    rgba = np.concatenate([random_rgb(2), np.full((20, 24, 1), 7, np.uint8)], axis=2)
    # The alpha channel is dropped, not composited: the stored colours come back unchanged.
    np.testing.assert_array_equal(read_image(save(rgba, tmp_path / "rgba.png")), rgba[:, :, :3])

    palette_image = Image.fromarray(random_rgb(3)).quantize(colors=16)
    palette_image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(
        read_image(tmp_path / "palette.png"), np.asarray(palette_image.convert("RGB"))
    )

    wide = np.array([[0, 257, 65535], [32896, 128, 65280]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    expected = np.round(wide / 257).astype(np.uint8)  # 65535 -> 255, 257 -> 1
    np.testing.assert_array_equal(
        read_image(tmp_path / "wide.png"), np.stack([expected] * 3, axis=2)
    )


def test_masks_0_255_and_0_1_read_as_the_same_boolean_mask(tmp_path):
    expected = square_mask(value=1).astype(bool)
    for value in (255, 1):
        mask = read_mask(save(square_mask(value=value), tmp_path / f"m{value}.png"))
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, expected)
    rgb_mask = np.zeros((20, 24, 3), np.uint8)
    rgb_mask[expected] = (0, 0, 200)  # any nonzero channel is a defect
    np.testing.assert_array_equal(read_mask(save(rgb_mask, tmp_path / "rgb.png")), expected)


def test_read_mask_refuses_another_size_than_expected(tmp_path):
    path = save(square_mask(), tmp_path / "m.png")
    assert read_mask(path, expected_hw=(20, 24)).shape == (20, 24)
    with pytest.raises(DatasetError, match=r"m\.png.*20x24.*21x24.*Fix:"):
        read_mask(path, expected_hw=(21, 24))


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


BROKEN_FILES = {
    "png_cut_in_pixel_data": ("x.png", lambda: png_bytes(random_rgb(0))[:400]),
    "png_without_end_chunk": ("x.png", lambda: png_bytes(random_rgb(0))[:-12]),
    "jpeg_cut": ("x.jpg", lambda: jpeg_bytes(random_rgb(0))[:-200]),
    "garbage": ("x.png", lambda: b"this is not an image at all" * 10),
    "empty": ("x.bmp", lambda: b""),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_broken_files_raise_an_error_naming_the_file(tmp_path, case):
    name, make_bytes = BROKEN_FILES[case]
    path = tmp_path / name
    path.write_bytes(make_bytes())
    with pytest.raises(DatasetError, match=rf"{path.name}.*Fix:") as error:
        read_image(path)
    assert str(path) in str(error.value)
    with pytest.raises(DatasetError):
        read_mask(path)


def test_missing_file_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_image(tmp_path / "absent.png")


# ------------------------------------------------------------------------------------------
# list_categories


def test_list_categories_keeps_only_category_folders(tmp_path):
    build_category(tmp_path, "b_cat")
    build_category(tmp_path, "a_cat")
    (tmp_path / "only_test" / "test").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / ".hidden" / "train").mkdir(parents=True)
    (tmp_path / "license.txt").write_text("licence")
    assert list_categories(tmp_path) == ["a_cat", "b_cat", "only_test"]


def test_list_categories_explains_a_wrong_root(tmp_path):
    category = build_category(tmp_path)
    with pytest.raises(DatasetError, match="category folder, not a dataset root"):
        list_categories(category)
    with pytest.raises(DatasetError, match="no category folder"):
        list_categories(category / "train")
    with pytest.raises(DatasetError, match="not a folder"):
        list_categories(tmp_path / "absent")


# ------------------------------------------------------------------------------------------
# index_category: a valid category


def test_index_of_a_valid_category_matches_an_independent_walk(tmp_path):
    category = build_category(tmp_path)
    index = index_category(tmp_path, "widget")
    assert list(index.columns) == list(INDEX_COLUMNS)
    assert index.to_dict("records") == expected_rows(category)
    assert index["label"].dtype == np.int64
    assert index["image_id"].is_monotonic_increasing


def test_index_accepts_jpeg_bmp_and_gray_images_with_any_case_extension(tmp_path):
    category = build_category(tmp_path)
    save(random_rgb(5)[:, :, 0], category / "train" / "good" / "gray.BMP", "BMP")
    save(random_rgb(6), category / "test" / "good" / "photo.JPEG", "JPEG")
    save(random_rgb(7), category / "test" / "crack" / "big.Jpg", "JPEG")
    save(square_mask(), category / "ground_truth" / "crack" / "big_mask.png")
    index = index_category(tmp_path, "widget").set_index("image_id")
    assert index.loc["train/good/gray", "path"].endswith("gray.BMP")
    assert index.loc["test/good/photo", "label"] == 0
    assert index.loc["test/crack/big", "mask_path"].endswith("big_mask.png")


def test_unknown_extensions_and_hidden_files_are_ignored_with_a_warning(tmp_path, caplog):
    category = build_category(tmp_path)
    (category / "train" / "good" / "notes.txt").write_text("x")
    (category / "test" / "good" / "scan.tif").write_bytes(b"II*\0")
    (category / "test" / "good" / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING, logger="sroc.datasets.layout"):
        index = index_category(tmp_path, "widget")
    assert len(index) == 8
    warning = caplog.text
    assert "notes.txt" in warning and "scan.tif" in warning and ".DS_Store" not in warning


def test_masks_are_optional_when_declared_so(tmp_path):
    category = build_category(tmp_path)
    shutil.rmtree(category / "ground_truth")
    with pytest.raises(DatasetError, match="has no mask"):
        index_category(tmp_path, "widget")
    index = index_category(tmp_path, "widget", require_masks=False)
    assert (index["mask_path"] == "").all() and index["label"].sum() == 3


def test_all_zero_masks_are_accepted_with_a_warning_naming_them(tmp_path, caplog):
    category = build_category(tmp_path)
    empty = save(np.zeros((20, 24), np.uint8), category / "ground_truth" / "hole" / "000_mask.png")
    soft = square_mask()
    soft[5, 6] = 128
    soft_path = save(soft, category / "ground_truth" / "crack" / "001_mask.png")
    with caplog.at_level(logging.WARNING, logger="sroc.datasets.layout"):
        index = index_category(tmp_path, "widget")
    assert index.set_index("image_id").loc["test/hole/000", "mask_path"] == str(empty)
    assert "All-zero masks" in caplog.text and str(empty) in caplog.text
    assert "several nonzero values" in caplog.text and str(soft_path) in caplog.text


def test_read_index_round_trips_strings_and_empty_mask_paths(tmp_path):
    build_category(tmp_path, "1911")  # a category name that looks like a number
    index = index_category(tmp_path, "1911")
    index.to_csv(tmp_path / "index.csv", index=False)
    back = read_index(tmp_path / "index.csv")
    pd.testing.assert_frame_equal(back, index)
    assert (back["mask_path"] == "").sum() == 5
    (tmp_path / "bad.csv").write_text("image_id,label\nx,0\n")
    with pytest.raises(DatasetError, match="columns .* missing"):
        read_index(tmp_path / "bad.csv")


# ------------------------------------------------------------------------------------------
# index_category: every error names the file, the problem and the fix


def break_truncated_png(category):
    path = category / "test" / "crack" / "000.png"
    path.write_bytes(path.read_bytes()[:300])
    return path, "cannot decode"


def break_truncated_jpeg(category):
    path = save(random_rgb(9), category / "test" / "good" / "cut.jpg", "JPEG")
    path.write_bytes(path.read_bytes()[:-150])
    return path, "cannot decode"


def break_garbage_mask(category):
    path = category / "ground_truth" / "crack" / "001_mask.png"
    path.write_bytes(b"\x89PNG garbage")
    return path, "cannot decode"


def break_missing_mask(category):
    (category / "ground_truth" / "hole" / "000_mask.png").unlink()
    return category / "test" / "hole" / "000.png", "has no mask"


def break_wrong_size_mask(category):
    path = save(np.zeros((20, 23), np.uint8), category / "ground_truth" / "crack" / "000_mask.png")
    return path, "mask is 20x23"


def break_empty_train_good(category):
    for path in (category / "train" / "good").iterdir():
        path.unlink()
    return category / "train" / "good", "no training image"


def break_missing_train(category):
    shutil.rmtree(category / "train")
    return category / "train", "folder missing"


def break_loose_test_image(category):
    path = save(random_rgb(3), category / "test" / "loose.png")
    return path, "directly in test/"


def break_defects_in_train(category):
    path = category / "train" / "crack"
    save(random_rgb(3), path / "000.png")
    return path, "train/ may only hold good/"


def break_duplicate_stem(category):
    path = save(random_rgb(3), category / "train" / "good" / "000.bmp", "BMP")
    return path, "share the stem"


BREAKS = [
    break_truncated_png,
    break_truncated_jpeg,
    break_garbage_mask,
    break_missing_mask,
    break_wrong_size_mask,
    break_empty_train_good,
    break_missing_train,
    break_loose_test_image,
    break_defects_in_train,
    break_duplicate_stem,
]


@pytest.mark.parametrize("break_dataset", BREAKS, ids=lambda f: f.__name__[len("break_") :])
def test_each_dataset_error_names_file_problem_and_fix(tmp_path, break_dataset):
    category = build_category(tmp_path)
    path, problem = break_dataset(category)
    with pytest.raises(DatasetError) as error:
        index_category(tmp_path, "widget")
    message = str(error.value)
    assert str(path) in message and problem in message and "Fix:" in message
    assert isinstance(error.value, ValueError)


def test_all_problems_are_reported_at_once(tmp_path):
    category = build_category(tmp_path)
    png, _ = break_truncated_png(category)  # test/crack/000
    mask = save(np.zeros((3, 3), np.uint8), category / "ground_truth" / "crack" / "001_mask.png")
    with pytest.raises(DatasetError, match="2 problem") as error:
        index_category(tmp_path, "widget")
    assert str(png) in str(error.value) and str(mask) in str(error.value)


def test_without_pixel_verification_only_the_layout_is_checked(tmp_path):
    category = build_category(tmp_path)
    break_truncated_png(category)
    assert len(index_category(tmp_path, "widget", verify_pixels=False)) == 8
    with pytest.raises(DatasetError, match="cannot decode"):
        index_category(tmp_path, "widget", verify_pixels=True, n_jobs=1)


def test_unknown_category_lists_the_available_ones(tmp_path):
    build_category(tmp_path, "widget")
    with pytest.raises(DatasetError, match="category folder not found.*widget"):
        index_category(tmp_path, "gadget")


# ------------------------------------------------------------------------------------------
# The real datasets of ../shared/data


def shared_categories():
    if not SHARED_DATA.is_dir():
        return []
    return [
        (dataset, category)
        for dataset in ("piped", "magnetic_tile")
        if (SHARED_DATA / dataset).is_dir()
        for category in list_categories(SHARED_DATA / dataset)
    ]


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("dataset, category", shared_categories())
def test_real_shared_datasets_index_without_error(dataset, category, caplog):
    with caplog.at_level(logging.WARNING, logger="sroc.datasets.layout"):
        index = index_category(SHARED_DATA / dataset, category)
    defective = index[index["label"] == 1]
    assert (defective["mask_path"] != "").all()
    assert (index.loc[index["label"] == 0, "mask_path"] == "").all()
    if category == "magnetic_tile":
        counts = index.groupby(["origin", "defect_type"]).size().to_dict()
        assert counts[("train", "good")] == 714 and counts[("test", "good")] == 238
        assert len(defective) == 392
        # The README: four 'uneven' masks are all zero in the source.
        assert caplog.text.count("uneven/exp") == 4 and "All-zero masks" in caplog.text
    else:
        assert (defective["defect_type"] == "impurity").all() and len(defective) == 48


def test_image_size_reads_the_header_as_height_width(tmp_path):
    from PIL import Image

    from sroc.datasets.layout import DatasetError, image_size, read_image

    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((7, 13), dtype=np.uint8)).save(path)
    assert image_size(path) == read_image(path).shape[:2] == (7, 13)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="junk.png"):
        image_size(tmp_path / "junk.png")
