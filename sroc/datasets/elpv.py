"""elpv solar cells (PyPI package ``elpv-dataset``) written in MVTec AD layout."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from fractions import Fraction
from importlib import metadata, resources
from pathlib import Path

from sroc.datasets.folders import building_directory, publish_directory, refuse_existing
from sroc.datasets.layout import DatasetError

logger = logging.getLogger(__name__)


def _parse_probability(value, setting: str) -> Fraction:
    try:
        probability = Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError) as error:
        raise DatasetError(
            f"elpv {setting}: {value!r} is not a probability. Fix: write 0, 1/3, 2/3, 1 or "
            "their decimal values."
        ) from error
    return probability


def _match_levels(values, levels: Sequence[float], setting: str) -> set[float]:
    """Map configured probabilities (floats or "2/3") onto the dataset's exact levels."""
    matched = set()
    for value in values:
        probability = _parse_probability(value, setting)
        nearest = min(levels, key=lambda level: abs(level - probability))
        if abs(nearest - probability) > 0.02:
            shown = ", ".join(f"{level:.4g}" for level in levels)
            raise DatasetError(
                f"elpv {setting}: {value!r} matches none of the dataset's defect probabilities "
                f"({shown}). Fix: use these values (e.g. 0, 1/3, 2/3, 1)."
            )
        matched.add(nearest)
    return matched


def elpv_defect_type(probability: float) -> str:
    """Folder name of a defective elpv level: "defect_p100" for 1, "defect_p067" for 2/3."""
    return f"defect_p{round(probability * 100):03d}"


def _default_elpv_source() -> Path:
    try:
        return Path(str(resources.files("elpv_dataset") / "data"))
    except ModuleNotFoundError as error:
        raise DatasetError(
            "elpv: the PyPI package elpv-dataset is not installed. Fix: pip install elpv-dataset."
        ) from error


def _read_elpv_labels(source: Path) -> list[tuple[Path, float, str]]:
    labels = source / "labels.csv"
    if not labels.is_file():
        raise DatasetError(
            f"{labels}: elpv label file not found. Fix: name the elpv 'data' folder (holding "
            "labels.csv and images/) or reinstall elpv-dataset."
        )
    rows = []
    for number, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            relative, probability, module_type = fields
            rows.append((source / relative, float(probability), module_type))
        except ValueError as error:
            raise DatasetError(
                f"{labels}:{number}: expected '<image path> <probability> <mono|poly>', got "
                f"{line!r}. Fix: restore the file from the elpv-dataset package."
            ) from error
    return rows


def prepare_elpv(
    target: str | os.PathLike,
    good_probabilities: Sequence[float | str] = (0.0,),
    defective_probabilities: Sequence[float | str] = ("2/3", 1.0),
    test_good_every: int = 3,
    source: str | os.PathLike | None = None,
) -> Path:
    """Write the elpv solar cells in MVTec AD layout at ``target`` and return it.

    Categories are the module types (``mono``, ``poly``). Cells whose defect probability is in
    ``good_probabilities`` are good; those in ``defective_probabilities`` are defective, in
    ``test/defect_p<100*p>`` (e.g. ``defect_p067``) so that pollution can be stratified by
    annotator confidence; every other level is excluded. Probabilities may be written as floats
    or fractions ("2/3"). elpv has no split: of the good cells sorted by file name, every
    ``test_good_every``-th (the k-th, 2k-th, ...) goes to ``test/good``, the rest to
    ``train/good``. There are no masks (index with ``require_masks=False``). The PNG files are
    copied unchanged from ``source`` (default: the installed package's ``data`` folder); a
    ``dataset_info.json`` records the mapping and the counts.
    """
    target = Path(target)
    source = Path(source) if source is not None else _default_elpv_source()
    if (
        isinstance(test_good_every, bool)
        or not isinstance(test_good_every, int)
        or test_good_every < 2
    ):
        raise DatasetError(
            f"elpv test_good_every: {test_good_every!r}; it must be an integer >= 2 (every k-th "
            "good cell goes to test/good, k=1 would leave no training image). Fix: use e.g. 3."
        )
    rows = _read_elpv_labels(source)
    levels = sorted({probability for _, probability, _ in rows})
    good = _match_levels(good_probabilities, levels, "good_probabilities")
    defective = _match_levels(defective_probabilities, levels, "defective_probabilities")
    if not good or not defective:
        raise DatasetError(
            "elpv: good_probabilities and defective_probabilities must both name at least one "
            "level. Fix: e.g. good [0], defective [2/3, 1]."
        )
    if good & defective:
        raise DatasetError(
            f"elpv: probabilities {sorted(good & defective)} are both good and defective. Fix: "
            "list each level in one of the two settings only."
        )
    refuse_existing(target)
    counts: dict[str, dict[str, int]] = {}
    with building_directory(target) as building:
        for module_type in sorted({t for _, _, t in rows}):
            cells = sorted((r for r in rows if r[2] == module_type), key=lambda r: r[0].name)
            goods = [path for path, p, _ in cells if p in good]
            placed = [
                ("train/good" if (i + 1) % test_good_every else "test/good", path)
                for i, path in enumerate(goods)
            ]
            placed += [
                (f"test/{elpv_defect_type(p)}", path) for path, p, _ in cells if p in defective
            ]
            for folder, path in placed:
                destination = building / module_type / folder / path.name
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, destination)
            category_counts = {
                folder: sum(1 for f, _ in placed if f == folder)
                for folder in sorted({f for f, _ in placed})
            }
            category_counts["excluded"] = len(cells) - len(placed)
            counts[module_type] = category_counts
        info = {
            "source": str(source),
            "elpv_dataset_version": _package_version("elpv-dataset"),
            "good_probabilities": sorted(good),
            "defective_probabilities": sorted(defective),
            "excluded_probabilities": [p for p in levels if p not in good | defective],
            "test_good_every": test_good_every,
            "counts": counts,
        }
        (building / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
        publish_directory(building, target)
    logger.info("elpv written to %s: %s", target, counts)
    return target


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
