"""Stratified pollution splits (section 4.1 of the paper, protocol "sroc-replace").

For one category and one seed:

1. A *pollution set* of ``round(set_fraction * N)`` defective test images is drawn, where N is the
   number of original training images (all good). Its defect-type proportions follow those of the
   defective test images (largest-remainder allocation). The pollution set leaves the test set for
   every ratio of that seed. With ``set_seed="fixed"`` (the default, as in the paper) the set is
   drawn once per category, whatever the seed; ``"per_seed"`` redraws it for every seed.
   ``max_set_share`` (off by default, as in the paper) first subsamples the training goods until
   the pollution set takes at most that share of the defective test images; N is then the number
   of goods kept, and the others get the role ``unused``.
2. For a pollution ratio p, ``l = round(p * N)`` training goods are replaced by ``l`` pollution
   images, so the training set keeps N images.
3. Ratios are nested: the seed fixes one removal order of the goods and one injection order of the
   pollution set; ratio p takes the first ``l`` of each. The images injected at 10 % are therefore a
   subset of those injected at 20 %.

The manifest written per (category, seed) records, for every image of the category, its role
(``ROLES``) with the ranks that derive every ratio's training set, so no ratio needs a file of its
own.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sroc.datasets.layout import INDEX_COLUMNS

PROTOCOL = "sroc-replace"
# "fixed": the pollution set (hence the test set) is drawn once per category and the seed only
# picks which goods leave and the injection order (section 4.1, Table 1's 0 % column without a
# standard deviation). "per_seed": every seed redraws the pollution set too.
SET_SEEDS = ("fixed", "per_seed")
MANIFEST_COLUMNS = (*INDEX_COLUMNS, "role", "removal_rank", "injection_rank")
# train: the goods of the training set (N of them); pollution: the defective test images that
# replace goods; test: the evaluation images; unused: goods left out by max_set_share; excluded:
# every image of an excluded category.
ROLES = ("train", "pollution", "test", "unused", "excluded")


class CategoryExcluded(ValueError):
    """The category cannot supply the pollution set and still keep defective test images."""


def round_half_up(x: float) -> int:
    """round(x) as the paper means it: 2.5 -> 3 (Python's round() would give 2).

    The epsilon absorbs binary noise such as 0.15 * 30 = 4.499999999999999.
    """
    return int(math.floor(x + 0.5 + 1e-9))


def n_injected(n_train: int, ratio: float) -> int:
    """Number of training goods replaced by pollution images at ``ratio``."""
    return round_half_up(ratio * n_train)


def allocate_by_type(counts: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` across defect types in proportion to ``counts`` (largest remainder).

    Ties in the remainders go to the type that comes first by name, so the allocation does not
    depend on dictionary order.
    """
    available = sum(counts.values())
    if total > available:
        raise ValueError(f"cannot draw {total} images from {available}")
    if total == 0:
        return {t: 0 for t in counts}
    quotas = {t: total * c / available for t, c in counts.items()}
    alloc = {t: math.floor(q) for t, q in quotas.items()}
    leftover = total - sum(alloc.values())
    by_remainder = sorted(counts, key=lambda t: (-(quotas[t] - alloc[t]), t))
    for t in by_remainder[:leftover]:
        alloc[t] += 1
    return alloc


def category_rng(category: str, seed: int) -> np.random.Generator:
    """One generator per (category, seed): independent of job order and of ``--cores``."""
    return np.random.default_rng([int(seed), zlib.crc32(category.encode("utf-8"))])


def pollution_set_rng(category: str) -> np.random.Generator:
    """The generator of what ``set_seed="fixed"`` draws once per category, whatever the seed.

    The spawn key keeps this stream apart from every seed's ``category_rng``.
    """
    entropy = zlib.crc32(category.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(1,)))


def protocol_name(set_seed: str = "fixed", max_set_share: float | None = None) -> str:
    """The protocol string every output of a split copies, e.g. ``sroc-replace/set=fixed``.

    A ``max_set_share`` is appended (``sroc-replace/set=fixed/max_set_share=0.67``): its training
    sets are smaller than the paper's.
    """
    _check_set_seed(set_seed)
    _check_max_set_share(max_set_share)
    name = f"{PROTOCOL}/set={set_seed}"
    if max_set_share is not None:
        name += f"/max_set_share={max_set_share:g}"
    return name


def n_train_within_share(
    n_train: int, n_defective: int, set_fraction: float, max_set_share: float
) -> int:
    """The most goods, up to ``n_train``, whose pollution set takes at most ``max_set_share`` of
    the ``n_defective`` defective test images (0 when not even one pollution image fits)."""
    _check_max_set_share(max_set_share)
    allowed = math.floor(max_set_share * n_defective + 1e-9)
    if allowed == 0 and set_fraction > 0:
        return 0
    n_kept = n_train
    while round_half_up(set_fraction * n_kept) > allowed:
        n_kept -= 1
    return n_kept


def _check_max_set_share(max_set_share: float | None) -> None:
    if max_set_share is not None and not 0 < max_set_share <= 1:
        raise ValueError(
            f"pollution.max_set_share must lie in (0, 1], or be null to keep every training "
            f"image; got {max_set_share}"
        )


def _check_set_seed(set_seed: str) -> None:
    if set_seed not in SET_SEEDS:
        raise ValueError(
            f"pollution.set_seed must be one of {', '.join(SET_SEEDS)}; got {set_seed!r}"
        )


def make_split(
    index: pd.DataFrame,
    seed: int,
    set_fraction: float = 0.2,
    min_test_defective: int = 1,
    set_seed: str = "fixed",
    max_set_share: float | None = None,
) -> pd.DataFrame:
    """Build the manifest of one category for one seed.

    ``index`` is a category index (``sroc.datasets.layout.index_category``). Raises
    ``CategoryExcluded`` when the defective test images cannot supply the pollution set while
    keeping at least ``min_test_defective`` of them for evaluation. ``set_seed`` (``SET_SEEDS``)
    says whether the pollution set is drawn once per category (``"fixed"``) or per seed
    (``"per_seed"``).
    ``max_set_share`` subsamples the training goods, drawn like the pollution set, until the
    pollution set takes at most that share of the defective test images.
    """
    _check_set_seed(set_seed)
    _check_max_set_share(max_set_share)
    if not 0 <= set_fraction < 1:
        raise ValueError(f"set_fraction must lie in [0, 1), got {set_fraction}")
    categories = index["category"].unique()
    if len(categories) != 1:
        raise ValueError(f"an index must hold one category, got {list(categories)}")
    category = str(categories[0])
    index = index.sort_values("image_id", kind="stable").reset_index(drop=True)

    train = index[index["origin"] == "train"]
    if (train["label"] != 0).any():
        bad = train.loc[train["label"] != 0, "image_id"].tolist()[:5]
        raise ValueError(f"{category}: training images must all be good, found defective {bad}")
    test_defective = index[(index["origin"] == "test") & (index["label"] == 1)]
    n_defective = len(test_defective)
    n_train = len(train)
    if max_set_share is not None:
        n_train = n_train_within_share(n_train, n_defective, set_fraction, max_set_share)
        if n_train == 0:
            raise CategoryExcluded(
                f"{category}: max_set_share {max_set_share:g} of {n_defective} defective test "
                f"images leaves no room for a single pollution image; raise "
                f"pollution.max_set_share"
            )
    set_size = round_half_up(set_fraction * n_train)
    if set_size > n_defective - min_test_defective:
        subsampled = f" of {len(train)}" if n_train < len(train) else ""
        hint = (
            "; pollution.max_set_share can subsample the training images to fit"
            if max_set_share is None
            else ""
        )
        raise CategoryExcluded(
            f"{category}: the pollution set needs {set_size} defective test images "
            f"({set_fraction:g} x {n_train}{subsampled} train images) and {min_test_defective} "
            f"must stay in the test set, but the test set has only {n_defective}{hint}"
        )

    # Under "per_seed" one generator makes every draw, in the order of the original protocol, so
    # its manifests are unchanged; under "fixed" the training subsample and the pollution set come
    # from a stream of their own, the same for every seed.
    rng = category_rng(category, seed)
    set_rng = pollution_set_rng(category) if set_seed == "fixed" else rng
    kept = np.arange(len(train))
    if n_train < len(train):
        kept = np.sort(set_rng.choice(len(train), size=n_train, replace=False))
    removal_rank = np.empty(n_train, dtype=np.int64)
    removal_rank[rng.permutation(n_train)] = np.arange(1, n_train + 1)

    counts = test_defective.groupby("defect_type").size().to_dict()
    allocation = allocate_by_type(counts, set_size)
    pollution_ids: list[str] = []
    for defect_type in sorted(allocation):
        candidates = test_defective.loc[
            test_defective["defect_type"] == defect_type, "image_id"
        ].to_numpy()
        chosen = set_rng.choice(len(candidates), size=allocation[defect_type], replace=False)
        pollution_ids.extend(candidates[np.sort(chosen)])
    injection_order = rng.permutation(len(pollution_ids))

    manifest = index.copy()
    manifest["role"] = "test"
    manifest.loc[manifest["origin"] == "train", "role"] = "unused"
    train_rows = train.index.to_numpy()[kept]  # index rows are positions after reset_index
    manifest.loc[train_rows, "role"] = "train"
    manifest["removal_rank"] = pd.array([pd.NA] * len(manifest), dtype="Int64")
    manifest.loc[train_rows, "removal_rank"] = removal_rank
    manifest["injection_rank"] = pd.array([pd.NA] * len(manifest), dtype="Int64")
    position = pd.Series(np.arange(len(manifest)), index=manifest["image_id"])
    rows = position.loc[pollution_ids].to_numpy()
    manifest.loc[rows, "role"] = "pollution"
    manifest.loc[rows[injection_order], "injection_rank"] = np.arange(1, len(rows) + 1)
    return manifest[list(MANIFEST_COLUMNS)]


def split_category(
    index: pd.DataFrame,
    seed: int,
    set_fraction: float = 0.2,
    min_test_defective: int = 1,
    set_seed: str = "fixed",
    max_set_share: float | None = None,
) -> tuple[pd.DataFrame, dict]:
    """``make_split``, or ``excluded_manifest`` with the reason, and the manifest's json sidecar.

    The sidecar records the protocol string that every downstream output copies, the settings,
    the exclusion reason (None when the category is kept) and the sizes.
    """
    info = {
        "protocol": protocol_name(set_seed, max_set_share),
        "seed": seed,
        "set_fraction": set_fraction,
        "set_seed": set_seed,
        "max_set_share": max_set_share,
        "excluded": None,
    }
    try:
        manifest = make_split(
            index,
            seed=seed,
            set_fraction=set_fraction,
            min_test_defective=min_test_defective,
            set_seed=set_seed,
            max_set_share=max_set_share,
        )
    except CategoryExcluded as reason:
        info["excluded"] = str(reason)
        manifest = excluded_manifest(index)
    info["n_pollution_set"] = int((manifest["role"] == "pollution").sum())
    info["n_train"] = int((manifest["role"] == "train").sum())
    info["n_unused"] = int((manifest["role"] == "unused").sum())
    return manifest, info


def excluded_manifest(index: pd.DataFrame) -> pd.DataFrame:
    """The manifest of an excluded category: every image listed, none with a role in the run."""
    manifest = index.sort_values("image_id", kind="stable").reset_index(drop=True)
    manifest = manifest.assign(
        role="excluded",
        removal_rank=pd.array([pd.NA] * len(manifest), dtype="Int64"),
        injection_rank=pd.array([pd.NA] * len(manifest), dtype="Int64"),
    )
    return manifest[list(MANIFEST_COLUMNS)]


def max_ratio(manifest: pd.DataFrame) -> float:
    """The largest pollution ratio the manifest's pollution set can serve."""
    n_train = int((manifest["role"] == "train").sum())
    return int((manifest["role"] == "pollution").sum()) / n_train if n_train else 0.0


def training_set(manifest: pd.DataFrame, ratio: float) -> pd.DataFrame:
    """The training images at pollution ``ratio``, with a boolean column ``polluted``."""
    train = manifest[manifest["role"] == "train"]
    pollution = manifest[manifest["role"] == "pollution"]
    n_train = len(train)
    n_poll = n_injected(n_train, ratio)
    if n_poll > len(pollution):
        raise ValueError(
            f"ratio {ratio:g} needs {n_poll} pollution images but the pollution set holds "
            f"{len(pollution)}: use ratios up to the pollution set fraction (about "
            f"{max_ratio(manifest):.3f})"
        )
    kept = train[train["removal_rank"] > n_poll]
    injected = pollution[pollution["injection_rank"] <= n_poll]
    out = pd.concat([kept, injected]).sort_values("image_id", kind="stable")
    out = out.assign(polluted=out["role"] == "pollution")
    return out.reset_index(drop=True)


def test_set(manifest: pd.DataFrame) -> pd.DataFrame:
    """The evaluation images of this seed, identical for every ratio."""
    return manifest[manifest["role"] == "test"].reset_index(drop=True)


def read_manifest(path) -> pd.DataFrame:
    manifest = pd.read_csv(
        path,
        dtype={"image_id": str, "category": str, "defect_type": str, "mask_path": str},
        keep_default_na=False,
        na_values={"removal_rank": [""], "injection_rank": [""]},
    )
    missing = set(MANIFEST_COLUMNS) - set(manifest.columns)
    if missing:
        raise ValueError(f"{path}: not a split manifest, columns {sorted(missing)} are missing")
    unknown = set(manifest["role"]) - set(ROLES)
    if unknown:
        raise ValueError(
            f"{path}: unknown roles {sorted(unknown)}; a manifest's roles are {', '.join(ROLES)} "
            f"(rebuild it with the split rule)"
        )
    for column in ("removal_rank", "injection_rank"):
        manifest[column] = manifest[column].astype("Int64")
    return manifest


def summarize(manifest: pd.DataFrame, ratios: Iterable[float]) -> pd.DataFrame:
    """One row per ratio: split sizes and the pollution composition by defect type.

    ``n_unused`` counts the training goods that ``max_set_share`` left out.
    """
    test = test_set(manifest)
    n_unused = int((manifest["role"] == "unused").sum())
    rows = []
    for ratio in ratios:
        train = training_set(manifest, ratio)
        polluted = train[train["polluted"]]
        row = {
            "ratio": ratio,
            "n_train": len(train),
            "n_train_good": int((~train["polluted"]).sum()),
            "n_train_polluted": len(polluted),
            "pollution_by_type": "; ".join(
                f"{t}={n}" for t, n in polluted.groupby("defect_type").size().items()
            ),
            "n_unused": n_unused,
            "n_test": len(test),
            "n_test_good": int((test["label"] == 0).sum()),
            "n_test_defective": int((test["label"] == 1).sum()),
        }
        rows.append(row)
    return pd.DataFrame(rows)


SUMMARY_COLUMNS = (
    "category",
    "seed",
    "protocol",
    "ratio",
    "n_train",
    "n_train_good",
    "n_train_polluted",
    "pollution_by_type",
    "n_unused",
    "n_test",
    "n_test_good",
    "n_test_defective",
    "excluded",
)


def summarize_splits(
    manifest_paths: Sequence[str | Path],
    info_paths: Sequence[str | Path],
    ratios: Sequence[float],
) -> pd.DataFrame:
    """Split sizes and pollution composition per category, seed and ratio (``SUMMARY_COLUMNS``).

    ``info_paths`` are the json sidecars the split rule writes beside each manifest. An excluded
    category gets one row per seed whose ``excluded`` column gives the reason and whose sizes are
    missing; the table keeps every column even when every category is excluded.
    """
    tables = []
    for manifest_path, info_path in zip(manifest_paths, info_paths, strict=True):
        info = json.loads(Path(info_path).read_text())
        manifest = read_manifest(manifest_path)
        head = {
            "category": manifest["category"].iloc[0],
            "seed": info["seed"],
            "protocol": info["protocol"],
        }
        if info["excluded"]:
            tables.append(pd.DataFrame([{**head, "excluded": info["excluded"]}]))
            continue
        table = summarize(manifest, ratios).assign(excluded="")
        tables.append(table.assign(**head))
    summary = pd.concat(tables, ignore_index=True).reindex(columns=list(SUMMARY_COLUMNS))
    count_columns = [c for c in summary.columns if c.startswith("n_")]
    summary[count_columns] = summary[count_columns].astype("Int64")
    return summary.sort_values(["category", "seed", "ratio"], kind="stable", ignore_index=True)


def exclusion_note(summary: pd.DataFrame) -> str | None:
    """A message when ``summarize_splits`` found every category excluded, else None."""
    if (summary["excluded"] == "").any():
        return None
    reasons = "; ".join(dict.fromkeys(summary["excluded"]))  # once each, in category order
    return (
        f"every category was excluded, so no detector is fitted and nothing is evaluated: {reasons}"
    )
