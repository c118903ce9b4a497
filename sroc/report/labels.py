"""How tables and figures name detectors, and the paper's order of detectors and categories."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

# The paper's names, in the order of its tables' columns.
DETECTOR_LABELS = {
    "knn": "KNN",
    "mahalanobis": "Mahalanobis",
    "padim": "PaDiM",
    "patchcore": "PatchCore",
}
# The rows of the paper's Table 1 (MVTec AD without hazelnut and transistor).
PAPER_CATEGORIES = (
    "carpet", "tile", "leather", "grid", "wood", "capsule", "cable", "pill", "metal_nut",
    "toothbrush", "screw", "zipper", "bottle",
)  # fmt: skip


def detector_label(detector_type: str, detector_name: str) -> str:
    """A detector as tables and figures name it: the paper's name of its type, with the
    configured name beside it when that differs (two variants of one type stay apart)."""
    label = DETECTOR_LABELS.get(detector_type, detector_type)
    return label if detector_name == detector_type else f"{label} ({detector_name})"


def in_paper_order(values: Iterable[str], order: Iterable[str]) -> list[str]:
    """``values`` (deduplicated) in the order of ``order``; those it lacks after them, as given."""
    rank = {value: position for position, value in enumerate(order)}
    unique = list(dict.fromkeys(values))
    return sorted(unique, key=lambda value: (rank.get(value, len(rank)), unique.index(value)))


def ordered_categories(categories: Iterable[str]) -> list[str]:
    """MVTec AD categories in the paper's row order; other datasets' categories as given."""
    return in_paper_order(categories, PAPER_CATEGORIES)


def detector_labels(runs: pd.DataFrame) -> dict[str, str]:
    """Configured detector name -> label, in the paper's column order (by detector type)."""
    types = runs.drop_duplicates("detector").set_index("detector")["detector_type"]
    names = in_paper_order(
        types.index, [name for kind in DETECTOR_LABELS for name in types.index[types == kind]]
    )
    return {name: detector_label(types[name], name) for name in names}
