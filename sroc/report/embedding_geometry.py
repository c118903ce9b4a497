"""Table 3 and Figure 6: the geometry of healthy and defective training images in the embedding
space, on the image embedding the Mahalanobis detector models (each stage's feature map averaged
over its positions, the stages concatenated)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.spatial.distance import cdist, pdist

from sroc.report.figures import save_figure

DISTANCE_COLUMNS = ["healthy_healthy", "healthy_defective", "defective_defective"]


def pool(features: Mapping[str, np.ndarray]) -> np.ndarray:
    """(n, sum of channels) float64: every stage averaged over its positions, concatenated in
    the stages' order."""
    return np.concatenate(
        [maps.mean(axis=(2, 3), dtype=np.float64) for maps in features.values()], axis=1
    )


def training_embeddings(
    cache_path, manifests: Mapping[int, pd.DataFrame], ratio: float
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per seed, the pooled embeddings and defective flags of the training set at pollution
    ``ratio``, read from the category's embedding cache once for every seed. A manifest of an
    excluded category (no training image) gives no entry."""
    from sroc import splits
    from sroc.feature_cache import load_features

    training = {
        seed: splits.training_set(manifest, ratio)
        for seed, manifest in manifests.items()
        if (manifest["role"] == "train").any()
    }
    if not training:
        return {}
    image_ids = sorted(set().union(*(set(t["image_id"]) for t in training.values())))
    features, _ = load_features(cache_path, image_ids)
    pooled = pool(features)
    row_of = pd.Series(np.arange(len(image_ids)), index=image_ids)
    return {
        seed: (pooled[row_of[t["image_id"]].to_numpy()], t["polluted"].to_numpy(dtype=bool))
        for seed, t in training.items()
    }


def mean_distances(embeddings: np.ndarray, defective: np.ndarray) -> dict[str, float]:
    """Mean Euclidean distance over distinct pairs of images: healthy-healthy, healthy-defective,
    defective-defective (NaN for a pair type with no pair)."""
    defective = np.asarray(defective, dtype=bool)
    healthy, polluted = embeddings[~defective], embeddings[defective]

    def mean_or_nan(distances: np.ndarray) -> float:
        return float(distances.mean()) if distances.size else float("nan")

    return {
        "healthy_healthy": mean_or_nan(pdist(healthy)),
        "healthy_defective": mean_or_nan(cdist(healthy, polluted).ravel()),
        "defective_defective": mean_or_nan(pdist(polluted)),
    }


def distance_table(records: pd.DataFrame) -> pd.DataFrame:
    """Table 3 from one row per category and seed (columns ``category``, ``seed`` and
    :data:`DISTANCE_COLUMNS`): mean and std over seeds per category, and a ``mean`` row of the
    category means within each seed."""
    means = records.groupby("seed", as_index=False)[DISTANCE_COLUMNS].mean().assign(category="mean")
    both = pd.concat([records, means], ignore_index=True)
    grouped = both.groupby("category", sort=False)[DISTANCE_COLUMNS]
    table = grouped.agg(["mean", "std"])
    table.columns = [f"{name} {stat}" for name, stat in table.columns]
    table.insert(0, "n_seeds", grouped.size())
    return table.reset_index()


def distance_markdown(table: pd.DataFrame) -> str:
    shown = pd.DataFrame({"category": table["category"]})
    for name in DISTANCE_COLUMNS:
        shown[name.replace("_", "–")] = [
            f"{m:.2f}" if np.isnan(s) else f"{m:.2f} ± {s:.2f}"
            for m, s in zip(table[f"{name} mean"], table[f"{name} std"], strict=True)
        ]
    return shown.to_markdown(index=False, stralign="right") + "\n"


def distance_latex(table: pd.DataFrame) -> str:
    lines = [
        r"\begin{tabular}{lccc}",
        r"\toprule",
        r"Category & Healthy--healthy & Healthy--defective & Defective--defective \\",
        r"\midrule",
    ]
    for _, row in table.iterrows():
        cells = [f"{row[f'{n} mean']:.2f}" for n in DISTANCE_COLUMNS]
        lines.append(" & ".join([str(row["category"]).replace("_", r"\_"), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def variance_change_axes(healthy: np.ndarray, polluted: np.ndarray, n_axes: int = 2) -> np.ndarray:
    """The ``n_axes`` embedding dimensions whose variance changes most (in absolute value)
    between the healthy and the polluted training set, largest change first."""
    change = np.abs(polluted.var(axis=0, ddof=1) - healthy.var(axis=0, ddof=1))
    return np.argsort(-change, kind="stable")[:n_axes]


def _ellipse(axis, points: np.ndarray, colour, label: str, radii=(1, 2, 3)) -> None:
    """Contours of the Gaussian fitted to ``points`` (2-D) at Mahalanobis radii ``radii``."""
    from matplotlib.patches import Ellipse

    centre = points.mean(axis=0)
    variances, vectors = np.linalg.eigh(np.cov(points, rowvar=False))
    angle = np.degrees(np.arctan2(vectors[1, -1], vectors[0, -1]))
    for i, radius in enumerate(radii):
        width, height = 2 * radius * np.sqrt(np.maximum(variances[::-1], 0))
        axis.add_patch(
            Ellipse(
                centre,
                width,
                height,
                angle=angle,
                fill=False,
                edgecolor=colour,
                linewidth=1.3,
                label=label if i == 0 else None,
            )
        )


def plot_mvg_contours(
    categories: Mapping[str, tuple[np.ndarray, np.ndarray]], paths: Sequence[str]
) -> None:
    """Figure 6: per category, the contours (1, 2, 3 standard deviations) of the Gaussian fitted
    to the healthy part (green) and to the whole polluted training set (red), in the two
    embedding dimensions whose variance changes most; the images as points.

    ``categories`` maps a category to (pooled embeddings, defective flags) of its training set.
    """
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, len(categories), figsize=(5 * len(categories), 4.5), squeeze=False
    )
    for axis, (category, (embeddings, defective)) in zip(axes[0], categories.items(), strict=True):
        defective = np.asarray(defective, dtype=bool)
        dims = variance_change_axes(embeddings[~defective], embeddings)
        plane = embeddings[:, dims]
        axis.scatter(
            *plane[~defective].T, s=10, color="tab:green", alpha=0.6, label="healthy image"
        )
        axis.scatter(
            *plane[defective].T, s=14, color="tab:red", marker="x", label="defective image"
        )
        _ellipse(axis, plane[~defective], "tab:green", "Gaussian of the healthy part")
        _ellipse(axis, plane, "tab:red", "Gaussian of the polluted set")
        axis.autoscale_view()
        axis.set(
            title=category,
            xlabel=f"embedding dimension {dims[0]} (largest variance change)",
            ylabel=f"embedding dimension {dims[1]} (second largest)",
        )
        axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, paths)
