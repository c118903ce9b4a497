"""How tables and figures name detectors and strategies, and the paper's order of detectors and
categories. Labels come from the registries: each detector class's ``label`` and each strategy's
(:mod:`sroc.strategies`); the detectors' registration order is the paper's column order."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from sroc import strategies
from sroc.detectors import DETECTORS

# The rows of the paper's Table 1 (MVTec AD without hazelnut and transistor).
PAPER_CATEGORIES = (
    "carpet", "tile", "leather", "grid", "wood", "capsule", "cable", "pill", "metal_nut",
    "toothbrush", "screw", "zipper", "bottle",
)  # fmt: skip


def detector_label(detector_type: str, detector_name: str) -> str:
    """A detector as tables and figures name it: the paper's name of its type, with the
    configured name beside it when that differs (two variants of one type stay apart)."""
    label = DETECTORS[detector_type].label if detector_type in DETECTORS else detector_type
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
        types.index, [name for kind in DETECTORS for name in types.index[types == kind]]
    )
    return {name: detector_label(types[name], name) for name in names}


def strategy_label(strategy: str) -> str:
    """A strategy's label; ``<name> (<type>)``, a strategy ranked by the refiner as the recovery
    table names it, gets the refiner's label too."""
    name, _, refiner = strategy.partition(" (")
    if refiner.endswith(")") and name in strategies.STRATEGIES:
        refiner = refiner[:-1]
        return f"{strategies.label(name)} ({detector_label(refiner, refiner)})"
    return strategies.label(strategy)
