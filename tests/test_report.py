"""The report: every table value against a direct pandas computation on a fake results table,
the statistics against scipy, the embedding geometry against brute force, the published numbers
against each other, and every file written and non-empty."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from sroc import report, splits, strategies
from sroc.metrics import refinement_scores
from sroc.report import auto_ratio, figures, labels, paper, recovery, stats, tables
from sroc.report import embedding_geometry as geometry

DETECTORS = {"knn": "knn", "maha": "mahalanobis", "padim": "padim", "patchcore": "patchcore"}
CATEGORIES = ["carpet", "bottle", "metal_nut"]
SEEDS = [0, 1, 2]
POLLUTION_RATIOS = [0.0, 0.05, 0.1, 0.15, 0.2]
REFINEMENT_RATIOS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8]
STRATEGIES = ["sroc", "random", "cross_validation", "stoc", "by_refiner"]
METRICS = ["image_auroc", "au_pro", "au_iou"]
CAPTIONS = Path(__file__).resolve().parents[1] / "workflow" / "report"


def fake_runs(
    masks: bool = True, seeds=SEEDS, refiner: str = "mahalanobis", categories=CATEGORIES
) -> pd.DataFrame:
    """A results table with the workflow's schema: the robustness curve, every refinement
    strategy (the r = 0 row repeating the unrefined model, no by_refiner rows for the refiner
    itself) and the oracle; random metrics, refinement scores from random removal counts as
    the pipeline computes them (precision NaN, recall and F1 0 when nothing is removed). As under
    ``set_seed: fixed``, every seed trains the unpolluted model on the same images and tests it on
    the same test set, so its metrics are the same for every seed."""
    rng = np.random.default_rng(0)
    rows = []

    def add(detector, category, seed, strategy, refiner_, p, r, metrics=None):
        n_train = 40
        n_polluted = splits.round_half_up(p * n_train)
        n_removed = splits.round_half_up(r * n_train)
        hit = min(n_polluted, int(rng.integers(0, n_removed + 1)))
        polluted = [f"defect{i}" for i in range(n_polluted)]
        removed = polluted[:hit] + [f"good{i}" for i in range(n_removed - hit)]
        scores = refinement_scores(removed, polluted)
        if metrics is None:
            metrics = {
                "image_auroc": rng.uniform(0.6, 1.0),
                "au_pro": rng.uniform(0.5, 1.0) if masks else np.nan,
                "au_iou": rng.uniform(0.0, 0.3) if masks else np.nan,
            }
        rows.append(
            dict(
                dataset="mvtec" if masks else "elpv",
                category=category,
                seed=seed,
                detector=detector,
                detector_type=DETECTORS[detector],
                strategy=strategy,
                refiner=refiner_,
                pollution_ratio=p,
                refinement_ratio=r,
                protocol="sroc-replace",
                run=f"{detector}/{category}/{seed}/{strategy}/{p}/{r}",
                **metrics,
                precision=scores["precision"],
                recall=scores["recall"],
                f1=scores["f1"],
                n_train=n_train,
                n_polluted=n_polluted,
                n_removed=n_removed,
                n_kept=n_train - n_removed,
                n_removed_polluted=hit,
                n_kept_polluted=n_polluted - hit,
                fit_seconds=rng.uniform(0, 1),
                score_seconds=rng.uniform(0, 1),
            )
        )
        return metrics

    for detector, kind in DETECTORS.items():
        for category in categories:
            clean = None
            for seed in seeds:
                for p in POLLUTION_RATIOS:
                    unrefined = add(
                        detector, category, seed, "none", "none", p, 0.0, clean if p == 0 else None
                    )
                    clean = unrefined if p == 0 else clean
                for strategy in STRATEGIES:
                    if strategy == "by_refiner" and kind == refiner:
                        continue
                    ranked_by = {"random": "none", "by_refiner": refiner}.get(strategy, kind)
                    for r in REFINEMENT_RATIOS:
                        add(
                            detector,
                            category,
                            seed,
                            strategy,
                            ranked_by,
                            0.2,
                            r,
                            unrefined if r == 0 else None,
                        )
                add(detector, category, seed, "oracle", "none", 0.2, 0.2)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def runs():
    return fake_runs()


def direct(runs, metric, category, **conditions):
    """Mean and std over seeds of ``metric``: one category, or ``mean`` = per-seed category
    average first."""
    chosen = runs
    for column, value in conditions.items():
        chosen = (
            chosen[np.isclose(chosen[column], value)]
            if isinstance(value, float)
            else (chosen[chosen[column] == value])
        )
    if category != "mean":
        chosen = chosen[chosen["category"] == category]
    per_seed = chosen.groupby("seed")[metric].mean()
    return per_seed.mean(), per_seed.std()


def direct_mean_row(runs, metric, **conditions):
    """A paper table's mean row: the mean over seeds of the per-seed category average, and the
    mean over categories of each category's std over seeds (the paper's Mean-row std)."""
    mean, _ = direct(runs, metric, "mean", **conditions)
    categories = runs["category"].unique()
    stds = [direct(runs, metric, category, **conditions)[1] for category in categories]
    return mean, np.nanmean(stds) if not np.isnan(stds).all() else np.nan


def check_cell(table, row, detector, ratio, expected):
    mean, std = expected
    assert table.values("mean").loc[row, (detector, ratio)] == pytest.approx(mean, nan_ok=True)
    assert table.values("std").loc[row, (detector, ratio)] == pytest.approx(std, nan_ok=True)


def test_table1_equals_direct_computation(runs, tmp_path):
    table = tables.table1(runs, ratios=(0.0, 0.2))
    for detector in DETECTORS:
        for ratio in (0.0, 0.2):
            condition = dict(detector=detector, strategy="none", pollution_ratio=ratio)
            for category in CATEGORIES:
                check_cell(
                    table,
                    category,
                    detector,
                    ratio,
                    direct(runs, "image_auroc", category, **condition),
                )
            for metric, row in [
                ("image_auroc", "Mean AUC"),
                ("au_iou", "Mean AU-IoU"),
                ("au_pro", "Mean AU-PRO"),
            ]:
                check_cell(table, row, detector, ratio, direct_mean_row(runs, metric, **condition))
    # The paper's row order (carpet, ..., metal nut, ..., bottle) and row labels.
    assert table.rows() == [
        "carpet",
        "metal_nut",
        "bottle",
        "Mean AUC",
        "Mean AU-IoU",
        "Mean AU-PRO",
    ]
    # The files hold the same numbers, and print them as the paper does.
    paths = [tmp_path / f"t1.{e}" for e in ("csv", "md", "tex")]
    tables.write_paper_table(table, *paths)
    csv = pd.read_csv(paths[0]).set_index("row")
    mean, std = direct(
        runs, "image_auroc", "bottle", detector="padim", strategy="none", pollution_ratio=0.2
    )
    assert csv.loc["bottle", "padim 20% mean"] == pytest.approx(mean)
    assert csv.loc["bottle", "padim 20% std"] == pytest.approx(std)
    assert f"{100 * mean:.1f} ± {100 * std:.1f}" in paths[1].read_text()
    assert f"{100 * mean:.1f} $\\pm$ {100 * std:.1f}" in paths[2].read_text()
    assert r"metal\_nut" in paths[2].read_text()


def test_table2_equals_direct_computation(runs):
    table = tables.table2(runs)
    for detector in DETECTORS:
        for ratio in (0.0, 0.2, 0.4):
            condition = dict(detector=detector, strategy="sroc", refinement_ratio=ratio)
            for category in CATEGORIES:
                check_cell(
                    table,
                    category,
                    detector,
                    ratio,
                    direct(runs, "image_auroc", category, **condition),
                )
            for metric in ["au_pro", "precision", "recall", "f1"]:
                row = tables.METRIC_NAMES[metric]
                row = row if metric in tables.REFINEMENT_SCORES else f"Mean {row}"
                expected = direct_mean_row(runs, metric, **condition)
                if metric in tables.REFINEMENT_SCORES and ratio == 0.0:
                    expected = (np.nan, np.nan)  # nothing removed: undefined
                check_cell(table, row, detector, ratio, expected)


def test_table4_compares_refiner_with_reference(runs):
    table = tables.table4(runs, refiner="mahalanobis")
    for detector in ["knn", "padim", "patchcore"]:
        for ratio in (0.0, 0.2, 0.4):
            check_cell(
                table,
                "Mean AUC (Mahalanobis)",
                detector,
                ratio,
                direct_mean_row(
                    runs,
                    "image_auroc",
                    detector=detector,
                    strategy="by_refiner",
                    refinement_ratio=ratio,
                ),
            )
            check_cell(
                table,
                "Mean AU-IoU (reference)",
                detector,
                ratio,
                direct_mean_row(
                    runs,
                    "au_iou",
                    detector=detector,
                    strategy="sroc",
                    refinement_ratio=ratio,
                ),
            )
    # The refiner itself has no by_refiner run: its own SROC rows stand in, and the note says so.
    values = table.values()
    pd.testing.assert_series_equal(
        values.loc["Mean AUC (Mahalanobis)", "maha"],
        values.loc["Mean AUC (reference)", "maha"],
        check_names=False,
    )
    assert "Mahalanobis (maha)" in table.note


def test_dataset_without_masks_drops_pixel_rows_with_a_note():
    runs = fake_runs(masks=False, seeds=[0])
    for table in (tables.table1(runs), tables.table2(runs), tables.table4(runs)):
        assert not any("AU-" in row for row in table.rows())
        assert "no defect masks" in table.note
        assert "no defect masks" in table.to_markdown() and "no defect masks" in table.to_latex()
    # One seed: no spread, the cell is the mean alone.
    table = tables.table1(runs)
    assert table.values("std").isna().all().all()
    assert "±" not in table.to_markdown()


def test_missing_ratio_and_missing_column_are_named(runs, tmp_path):
    with pytest.raises(ValueError, match="pollution_ratio"):
        tables.table1(runs, ratios=(0.5,))
    path = tmp_path / "runs.parquet"
    runs.drop(columns="au_iou").to_parquet(path)
    with pytest.raises(ValueError, match="au_iou"):
        tables.read_results_table(path)


def test_paired_difference_matches_scipy_paired_t_test():
    rng = np.random.default_rng(1)
    a = pd.Series(rng.normal(size=6), index=range(6))
    b = pd.Series(rng.normal(size=6), index=range(6))[::-1]  # aligned on seed, not position
    result = stats.paired_difference(a, b)
    reference = scipy_stats.ttest_rel(a.sort_index(), b.sort_index()).confidence_interval(0.95)
    assert result["mean_difference"] == pytest.approx((a - b).mean())
    assert result["ci_low"] == pytest.approx(reference.low)
    assert result["ci_high"] == pytest.approx(reference.high)
    single = stats.paired_difference(a.iloc[:1], b.loc[[0]])
    assert single["n_seeds"] == 1 and np.isnan(single["ci_low"])


def test_claims_equal_direct_paired_differences(runs):
    table = stats.paired_statistics(runs, refiner="mahalanobis")

    def seed_means(**conditions):
        chosen = runs
        for column, value in conditions.items():
            chosen = (
                chosen[np.isclose(chosen[column], value)]
                if isinstance(value, float)
                else (chosen[chosen[column] == value])
            )
        return chosen.groupby(["seed", "category"])["image_auroc"].mean().groupby("seed").mean()

    gain = seed_means(detector="padim", strategy="sroc", refinement_ratio=0.2) - seed_means(
        detector="padim", strategy="sroc", refinement_ratio=0.0
    )
    row = table[(table["comparison"].str.startswith("sroc ")) & (table["detector"] == "padim")]
    assert row["mean_difference"].item() == pytest.approx(gain.mean())
    half = scipy_stats.t.ppf(0.975, len(gain) - 1) * gain.std() / np.sqrt(len(gain))
    assert row["ci_high"].item() == pytest.approx(gain.mean() + half)

    def drop(detector):
        return seed_means(detector=detector, strategy="none", pollution_ratio=0.0) - seed_means(
            detector=detector, strategy="none", pollution_ratio=0.2
        )

    row = table[table["detector"] == "knn vs patchcore"]
    assert row["mean_difference"].item() == pytest.approx((drop("knn") - drop("patchcore")).mean())
    refined = seed_means(detector="knn", strategy="by_refiner", refinement_ratio=0.2)
    own = seed_means(detector="knn", strategy="sroc", refinement_ratio=0.2)
    row = table[table["claim"].str.startswith("refining") & (table["detector"] == "knn")]
    assert row["mean_difference"].item() == pytest.approx((refined - own).mean())
    # The refiner's own ranking is not compared with itself.
    assert not (table["claim"].str.startswith("refining") & (table["detector"] == "maha")).any()


def test_mean_distances_equal_brute_force():
    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(9, 4))
    defective = np.array([0, 1, 0, 0, 1, 0, 1, 0, 0], dtype=bool)
    got = geometry.mean_distances(embeddings, defective)
    pairs = {"healthy_healthy": [], "healthy_defective": [], "defective_defective": []}
    for i in range(9):
        for j in range(i + 1, 9):
            kind = ["healthy_healthy", "healthy_defective", "defective_defective"][
                int(defective[i]) + int(defective[j])
            ]
            pairs[kind].append(np.sqrt(((embeddings[i] - embeddings[j]) ** 2).sum()))
    for kind, distances in pairs.items():
        assert got[kind] == pytest.approx(np.mean(distances))
    assert np.isnan(
        geometry.mean_distances(embeddings[:3], np.array([1, 0, 0]))["defective_defective"]
    )


def test_variance_change_axes_finds_the_changed_dimensions():
    rng = np.random.default_rng(3)
    healthy = rng.normal(size=(200, 5))
    polluted = healthy.copy()
    polluted[:40, 3] *= 6  # pollution widens dimension 3 most, dimension 1 next
    polluted[:40, 1] *= 3
    assert list(geometry.variance_change_axes(healthy, polluted)) == [3, 1]


def write_fake_cache(path, index: pd.DataFrame, features: dict[str, np.ndarray]) -> None:
    """An embedding cache in the layout sroc.embeddings writes, with given features."""
    with h5py.File(path, "w") as h5:
        images = h5.create_group("images")
        text = h5py.string_dtype("utf-8")
        for column in ("image_id", "origin", "defect_type", "mask_path", "path"):
            images.create_dataset(
                column, data=index[column].astype(str).to_numpy(object), dtype=text
            )
        images["label"] = index["label"].to_numpy().astype(np.int8)
        images["height"] = np.full(len(index), 32, np.int32)
        images["width"] = np.full(len(index), 32, np.int32)
        group = h5.create_group("features", track_order=True)
        for stage, values in features.items():
            group.create_dataset(stage, data=values)
        h5.attrs["category"] = str(index["category"].iloc[0])
        h5.attrs["stages"] = json.dumps(list(features))
        h5.attrs["complete"] = 1


def fake_category(category: str, n_train: int = 30, n_defects: int = 20):
    rows = [("train", "good", 0, i) for i in range(n_train)]
    rows += [("test", "good", 0, i) for i in range(8)]
    rows += [("test", "crack", 1, i) for i in range(n_defects)]
    index = (
        pd.DataFrame(
            {
                "image_id": [f"{o}/{t}/{i:03d}" for o, t, _, i in rows],
                "category": category,
                "origin": [o for o, _, _, _ in rows],
                "defect_type": [t for _, t, _, _ in rows],
                "label": [lab for _, _, lab, _ in rows],
                "path": [f"/x/{o}/{t}/{i}.png" for o, t, _, i in rows],
                "mask_path": ["" if lab == 0 else f"/x/m/{i}.png" for _, _, lab, i in rows],
            }
        )
        .sort_values("image_id")
        .reset_index(drop=True)
    )
    rng = np.random.default_rng(len(category))
    shift = index["label"].to_numpy()[:, None, None, None] * 2.0
    features = {
        "s1": (rng.normal(size=(len(index), 3, 4, 4)) + shift).astype(np.float32),
        "s2": (rng.normal(size=(len(index), 5, 2, 2)) + shift).astype(np.float32),
    }
    return index, features


def test_training_embeddings_read_the_polluted_training_set(tmp_path):
    index, features = fake_category("carpet")
    cache = tmp_path / "carpet.h5"
    write_fake_cache(cache, index, features)
    manifests = {seed: splits.make_split(index, seed) for seed in (0, 1)}
    got = geometry.training_embeddings(cache, manifests, 0.2)
    pooled_all = np.concatenate(
        [features[s].mean(axis=(2, 3), dtype=np.float64) for s in ("s1", "s2")], axis=1
    )
    for seed, manifest in manifests.items():
        training = splits.training_set(manifest, 0.2)
        rows = index.reset_index().set_index("image_id").loc[training["image_id"], "index"]
        pooled, defective = got[seed]
        np.testing.assert_allclose(pooled, pooled_all[rows.to_numpy()], rtol=1e-12)
        np.testing.assert_array_equal(defective, training["label"].to_numpy() == 1)
        assert defective.sum() == 6  # 20 % of 30
    # Defective images, shifted by 2 in every channel, lie farther from the healthy ones.
    distances = geometry.mean_distances(*got[0])
    assert distances["healthy_defective"] > distances["healthy_healthy"]


def test_distance_table_averages_seeds_and_categories():
    records = pd.DataFrame(
        {
            "category": ["a", "a", "b", "b"],
            "seed": [0, 1, 0, 1],
            "healthy_healthy": [1.0, 3.0, 5.0, 9.0],
            "healthy_defective": [2.0, 2.0, 4.0, 6.0],
            "defective_defective": [1.0, 1.0, 1.0, np.nan],
        }
    )
    table = geometry.distance_table(records).set_index("category")
    assert table.loc["a", "healthy_healthy mean"] == 2.0
    assert table.loc["mean", "healthy_healthy mean"] == pytest.approx(np.mean([3.0, 6.0]))
    assert table.loc["mean", "healthy_healthy std"] == pytest.approx(np.std([3.0, 6.0], ddof=1))


def test_published_numbers_agree_with_each_other():
    numbers = paper.load_paper_numbers()
    assert set(numbers["detector_type"]) == set(DETECTORS.values())
    assert numbers.loc[numbers["table"] == "1", "category"].nunique() == 14  # 13 + mean
    key = ["category", "metric", "detector_type"]

    def cells(table, **conditions):
        chosen = numbers[numbers["table"] == table]
        for column, value in conditions.items():
            chosen = chosen[np.isclose(chosen[column], value)]
        return chosen.set_index(key)["value"].sort_index()

    # Table 2's unrefined column is Table 1's 20 % column, typed from another table of the text.
    polluted = cells("1", pollution_ratio=0.2)
    unrefined = cells("2", refinement_ratio=0.0)
    pd.testing.assert_series_equal(polluted, unrefined.loc[polluted.index])
    # Table 4's reference rows are Table 2's mean rows.
    table4 = numbers[numbers["table"] == "4"]
    reference = table4[table4["paper_row"].str.endswith("(reference)")]
    table2 = numbers[numbers["table"] == "2"].set_index([*key, "refinement_ratio"])["value"]
    assert (
        reference.set_index([*key, "refinement_ratio"])["value"]
        == table2.loc[reference.set_index([*key, "refinement_ratio"]).index]
    ).all()
    # Precision = recall at 20 % refinement of a 20 % polluted set (as many removed as injected).
    f1 = cells("2", refinement_ratio=0.2)
    assert (f1.xs("precision", level="metric") == f1.xs("recall", level="metric")).all()
    # Spot checks read off the paper twice.
    assert cells("1", pollution_ratio=0.2).loc[("grid", "image_auroc", "mahalanobis")] == 82.9
    assert cells("2", refinement_ratio=0.4).loc[("screw", "image_auroc", "padim")] == 84.2
    assert cells("4", refinement_ratio=0.2).loc[("mean", "au_iou", "padim")].max() == 0.149


def test_comparison_equals_direct_values(runs):
    comparison = paper.compare_with_paper(runs)
    row = comparison[
        (comparison["table"] == "1")
        & (comparison["category"] == "carpet")
        & (comparison["detector"] == "knn")
        & (comparison["pollution_ratio"] == 0.2)
    ]
    mean, std = direct(
        runs, "image_auroc", "carpet", detector="knn", strategy="none", pollution_ratio=0.2
    )
    assert row["ours"].item() == pytest.approx(mean)
    assert row["ours_std"].item() == pytest.approx(std)
    assert row["paper"].item() == pytest.approx(0.933)
    assert row["difference"].item() == pytest.approx(mean - 0.933)
    # Our mean rows average other categories than the paper's 13.
    assert not comparison.loc[comparison["category"] == "mean", "same_categories"].any()
    assert set(comparison["category"]) == {*CATEGORIES, "mean"}
    refined = comparison[
        (comparison["table"] == "4")
        & (comparison["detector"] == "padim")
        & (comparison["metric"] == "image_auroc")
        & (comparison["refinement_ratio"] == 0.2)
    ]
    assert refined["paper"].item() == pytest.approx(0.953)
    assert refined["ours"].item() == pytest.approx(
        direct(
            runs,
            "image_auroc",
            "mean",
            detector="padim",
            strategy="by_refiner",
            refinement_ratio=0.2,
        )[0]
    )


def test_recovery_equals_direct_computation(runs):
    # A known loss: the clean model 0.3 better than its random value everywhere.
    clean_rows = (runs["strategy"] == "none") & np.isclose(runs["pollution_ratio"], 0.0)
    boosted = runs.assign(image_auroc=runs["image_auroc"] + 0.3 * clean_rows)
    table = recovery.recovery_table(boosted).set_index(["detector", "strategy"])
    for detector in DETECTORS:
        clean, _ = direct(boosted, "image_auroc", "mean", detector=detector, strategy="none",
                          pollution_ratio=0.0)  # fmt: skip
        polluted, _ = direct(boosted, "image_auroc", "mean", detector=detector, strategy="none",
                             pollution_ratio=0.2)  # fmt: skip
        for strategy in ("sroc", "random", "cross_validation", "stoc", "oracle"):
            refined, _ = direct(boosted, "image_auroc", "mean", detector=detector,
                                strategy=strategy, refinement_ratio=0.2)  # fmt: skip
            row = table.loc[(detector, strategy)]
            assert row["lost"] == pytest.approx(clean - polluted)
            assert row["recovery"] == pytest.approx((refined - polluted) / (clean - polluted))
            f1, _ = direct(boosted, "f1", "mean", detector=detector, strategy=strategy,
                           refinement_ratio=0.2)  # fmt: skip
            assert row["f1"] == pytest.approx(f1, nan_ok=True)
    # The refiner's rows are labelled with it; the refiner itself has none.
    assert ("knn", "by_refiner (mahalanobis)") in table.index
    assert ("maha", "by_refiner (mahalanobis)") not in table.index

    # The gain's interval is the paired t interval over seeds.
    def seed_means(frame):
        return frame.groupby(["seed", "category"])["image_auroc"].mean().groupby("seed").mean()

    knn = boosted[boosted["detector"] == "knn"]
    gain = seed_means(
        knn[(knn["strategy"] == "stoc") & np.isclose(knn["refinement_ratio"], 0.2)]
    ) - seed_means(knn[(knn["strategy"] == "none") & np.isclose(knn["pollution_ratio"], 0.2)])
    half = scipy_stats.t.ppf(0.975, len(gain) - 1) * gain.std() / np.sqrt(len(gain))
    assert table.loc[("knn", "stoc"), "gain_ci_low"] == pytest.approx(gain.mean() - half)
    # Where less than half a point is lost, recovery is left empty rather than a ratio of noise.
    plain = recovery.recovery_table(runs)
    assert plain.loc[plain["lost"] < 0.005, "recovery"].isna().all()
    assert plain.loc[plain["lost"] >= 0.005, "recovery"].notna().all()


def test_recovery_covers_single_run_and_patch_strategies_and_an_oracle_off_p(runs):
    """sroc_auto (its own ratio), patch_sroc (ratio curve) and an oracle that removed a share
    other than exactly p (its r is the share of polluted images) each get their recovery row."""
    extended = with_auto_ratio(runs)
    extended = pd.concat(
        [extended, runs[runs["strategy"] == "sroc"].assign(strategy="patch_sroc")],
        ignore_index=True,
    )
    oracle = extended["strategy"] == "oracle"
    extended.loc[oracle, "refinement_ratio"] = np.where(
        extended.loc[oracle, "seed"] % 2, 0.19, 0.21
    )
    clean_rows = (extended["strategy"] == "none") & np.isclose(extended["pollution_ratio"], 0.0)
    boosted = extended.assign(image_auroc=extended["image_auroc"] + 0.3 * clean_rows)
    table = recovery.recovery_table(boosted).set_index(["detector", "strategy"])
    for detector in DETECTORS:
        clean, _ = direct(boosted, "image_auroc", "mean", detector=detector, strategy="none",
                          pollution_ratio=0.0)  # fmt: skip
        polluted, _ = direct(boosted, "image_auroc", "mean", detector=detector, strategy="none",
                             pollution_ratio=0.2)  # fmt: skip
        for strategy, conditions in [
            ("sroc_auto", {}),
            ("oracle", {}),
            ("patch_sroc", {"refinement_ratio": 0.2}),
        ]:
            refined, _ = direct(boosted, "image_auroc", "mean", detector=detector,
                                strategy=strategy, **conditions)  # fmt: skip
            row = table.loc[(detector, strategy)]
            assert row["recovery"] == pytest.approx((refined - polluted) / (clean - polluted))
        own = boosted[(boosted["detector"] == detector) & (boosted["strategy"] == "sroc_auto")]
        assert table.loc[(detector, "sroc_auto"), "refinement_ratio"] == pytest.approx(
            own["refinement_ratio"].mean()
        )


def test_every_table_and_figure_is_written(runs, tmp_path):
    written = []

    def out(stem, extensions):
        paths = [tmp_path / f"{stem}.{e}" for e in extensions]
        written.extend(paths)
        return paths

    for stem, table in [
        ("t1", tables.table1(runs)),
        ("t2", tables.table2(runs)),
        ("t4", tables.table4(runs)),
    ]:
        tables.write_paper_table(table, *out(stem, ["csv", "md", "tex"]))
    table = pd.concat([recovery.recovery_table(runs, m) for m in ("image_auroc", "au_pro")])
    csv, markdown, latex = out("recovery", ["csv", "md", "tex"])
    report.write_csv_and_markdown(table, csv, markdown)
    latex.write_text(tables.plain_latex(table))
    figures.plot_recovery(table, out("recovery", ["png", "pdf"]))
    table = auto_ratio.auto_ratio_table(with_auto_ratio(runs))
    csv, markdown, latex = out("auto_ratio", ["csv", "md", "tex"])
    report.write_csv_and_markdown(table, csv, markdown)
    latex.write_text(tables.plain_latex(table))
    for number, metric in [(3, "image_auroc"), (7, "au_iou"), (8, "au_pro")]:
        figures.plot_pollution_curve(runs, metric, out(f"f{number}", ["png", "pdf"]))
    for number, metric in [(4, "image_auroc"), (9, "au_iou"), (10, "au_pro")]:
        figures.plot_refinement_curve(runs, metric, out(f"f{number}", ["png", "pdf"]))
    for number, metric in [(11, "image_auroc"), (12, "au_iou"), (13, "au_pro")]:
        figures.plot_refinement_curve(
            runs, metric, out(f"f{number}", ["png", "pdf"]), refiner="mahalanobis"
        )
    figures.plot_strategies(runs, "image_auroc", out("f5", ["png", "pdf"]))
    comparison = paper.compare_with_paper(runs)
    paper.plot_comparison(comparison, out("comparison", ["png", "pdf"]))
    csv, markdown, latex = out("comparison", ["csv", "md", "tex"])
    csv.write_text(comparison.to_csv(index=False))
    markdown.write_text(paper.comparison_markdown(comparison, paper.comparison_note("b", "d")))
    latex.write_text(paper.comparison_latex(comparison, "note"))
    shown = {}
    for category in ("carpet", "bottle"):
        index, features = fake_category(category)
        pooled = geometry.pool(features)
        shown[category] = (pooled[:36], index["label"].to_numpy()[:36] == 1)
    geometry.plot_mvg_contours(shown, out("f6", ["png", "pdf"]))
    for path in written:
        assert path.stat().st_size > 500, path
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def with_auto_ratio(runs):
    """``runs`` plus sroc_loo (SROC's rows, shifted per ratio) and one sroc_auto run per cell
    with its own estimated ratio and random metrics."""
    rng = np.random.default_rng(1)
    loo = runs[runs["strategy"] == "sroc"].assign(strategy="sroc_loo")
    loo["image_auroc"] += (
        0.05 * np.sin(10 * loo["refinement_ratio"]) * (loo["refinement_ratio"] > 0)
    )
    cells = runs[(runs["strategy"] == "oracle")].copy()
    auto = cells.assign(
        strategy="sroc_auto",
        refiner=cells["detector_type"],
        refinement_ratio=rng.uniform(0.0, 0.3, len(cells)),
        image_auroc=rng.uniform(0.6, 1.0, len(cells)),
    )
    return pd.concat([runs, loo, auto], ignore_index=True)


def test_auto_ratio_against_best_fixed_ratio_equals_direct_computation(runs):
    extended = with_auto_ratio(runs)
    table = auto_ratio.auto_ratio_table(extended).set_index("detector")
    assert set(table.index) == set(DETECTORS)
    for detector in DETECTORS:
        row = table.loc[detector]
        assert row["ranking"] == "sroc_loo"
        fixed = {
            r: direct(extended, "image_auroc", "mean", detector=detector, strategy="sroc_loo",
                      refinement_ratio=r)[0]
            for r in REFINEMENT_RATIOS
        }  # fmt: skip
        best_ratio = max(fixed, key=fixed.get)
        assert row["best_ratio"] == pytest.approx(best_ratio)
        assert row["best"] == pytest.approx(fixed[best_ratio])
        auto, _ = direct(extended, "image_auroc", "mean", detector=detector, strategy="sroc_auto")
        assert row["auto"] == pytest.approx(auto)
        assert row["difference"] == pytest.approx(auto - fixed[best_ratio])
        assert row["unrefined"] == pytest.approx(fixed[0.0])
        own = extended[(extended["detector"] == detector) & (extended["strategy"] == "sroc_auto")]
        assert row["auto_ratio"] == pytest.approx(own["refinement_ratio"].mean())
        assert row["difference_ci_low"] < row["difference"] < row["difference_ci_high"]
    # Without sroc_loo, sroc_auto is held against SROC; without sroc_auto, there is no row.
    no_loo = auto_ratio.auto_ratio_table(extended[extended["strategy"] != "sroc_loo"])
    assert set(no_loo["ranking"]) == {"sroc"}
    assert auto_ratio.auto_ratio_table(runs).empty


# Issue 21, items 5-10: the tables, figures and statistics as the paper prints them.


def test_table2_prints_dash_where_nothing_is_removed(runs):
    # The pipeline writes recall = F1 = 0 (and precision NaN) when nothing is removed.
    unrefined = runs[(runs["strategy"] == "sroc") & (runs["refinement_ratio"] == 0.0)]
    assert (unrefined[["recall", "f1"]] == 0.0).all().all()
    assert unrefined["precision"].isna().all()
    table = tables.table2(runs)
    printed = table.formatted()
    for row in [tables.METRIC_NAMES[score] for score in ("precision", "recall", "f1")]:
        assert (printed.loc[row].xs(0.0, level=1) == "-").all(), row
        assert (printed.loc[row].xs(0.2, level=1) != "-").all(), row
    csv = table.to_csv_frame().set_index("row")
    assert np.isnan(csv.loc[tables.METRIC_NAMES["recall"], "knn 0% mean"])
    # runs.parquet itself is left as written.
    assert (runs.loc[unrefined.index, "recall"] == 0.0).all()


def test_std_printed_only_where_the_paper_prints_one(runs, tmp_path):
    def with_std(printed: pd.DataFrame) -> pd.DataFrame:
        return printed.map(lambda cell: "±" in cell)

    table1 = tables.table1(runs, ratios=(0.0, 0.2))
    shown = with_std(table1.formatted())
    # set_seed fixed: the 0 % column does not vary with the seed and prints no spread.
    assert not shown.xs(0.0, axis=1, level=1).any().any()
    assert shown.loc[["carpet", "bottle", "Mean AUC"]].xs(0.2, axis=1, level=1).all().all()
    # The pixel rows have no std in the paper.
    assert not shown.loc[["Mean AU-IoU", "Mean AU-PRO"]].any().any()
    # Tables 2 and 4 print none; every std stays in the CSV.
    for table in (tables.table2(runs), tables.table4(runs)):
        assert "±" not in table.to_markdown() and "pm" not in table.to_latex()
        assert table.to_csv_frame().filter(like="std").notna().any().any()
    # Where the seeds do train on different images at 0 % (set_seed: per_seed), it is printed.
    rng = np.random.default_rng(5)
    varied = runs.assign(image_auroc=runs["image_auroc"] + rng.normal(0, 0.01, len(runs)))
    shown = with_std(tables.table1(varied, ratios=(0.0, 0.2)).formatted())
    assert shown.loc["carpet"].xs(0.0, level=1).all()


def test_mean_row_std_is_the_mean_of_the_category_stds(runs):
    table = tables.table1(runs, ratios=(0.0, 0.2))
    condition = dict(detector="knn", strategy="none", pollution_ratio=0.2)
    category_stds = [direct(runs, "image_auroc", c, **condition)[1] for c in CATEGORIES]
    mean_auroc_row = table.rows()[len(CATEGORIES)]
    assert table.values("std").loc[mean_auroc_row, ("knn", 0.2)] == pytest.approx(
        np.mean(category_stds)
    )
    assert np.mean(category_stds) != pytest.approx(
        direct(runs, "image_auroc", "mean", **condition)[1]
    )
    # The comparison shows the same std beside the paper's; the paired statistics pair on the
    # seeds' category means (test_claims_equal_direct_paired_differences).
    comparison = paper.compare_with_paper(runs)
    row = comparison[
        (comparison["table"] == "1")
        & (comparison["category"] == "mean")
        & (comparison["detector"] == "knn")
        & (comparison["metric"] == "image_auroc")
        & (comparison["pollution_ratio"] == 0.2)
    ]
    assert row["ours_std"].item() == pytest.approx(np.mean(category_stds))


def test_detector_label():
    assert labels.detector_label("padim", "padim") == "PaDiM"
    assert labels.detector_label("mahalanobis", "maha") == "Mahalanobis (maha)"
    assert labels.detector_label("newdetector", "newdetector") == "newdetector"
    # The paper's category order is the one of its published numbers.
    published = paper.load_paper_numbers()
    published = published[(published["table"] == "1") & (published["category"] != "mean")]
    assert tuple(dict.fromkeys(published["category"])) == labels.PAPER_CATEGORIES


def legend_texts(monkeypatch, module, plot) -> list[str]:
    """The legend entries (titles included) of the figure ``plot()`` saves through
    ``module.save_figure``."""
    shown = []
    monkeypatch.setattr(module, "save_figure", lambda figure, paths: shown.append(figure))
    plot()
    figure = shown[0]
    texts = [t.get_text() for a in figure.axes if a.get_legend() for t in a.get_legend().texts]
    titles = [a.get_legend().get_title().get_text() for a in figure.axes if a.get_legend()]
    return texts + titles + [a.get_title() for a in figure.axes]


def test_paper_order_and_labels(runs, monkeypatch):
    shuffled = runs.iloc[::-1]  # the order of the results table does not decide the layout
    table = tables.table1(shuffled)
    assert [d for d, _ in table.columns()][::2] == ["knn", "maha", "padim", "patchcore"]
    assert table.rows()[:4] == ["carpet", "metal_nut", "bottle", "Mean AUC"]
    markdown, latex = table.to_markdown(), table.to_latex()
    assert "KNN 20%" in markdown and "Mahalanobis (maha) 0%" in markdown
    assert "{PaDiM}" in latex and "{PatchCore}" in latex and "{knn}" not in latex
    assert "Mean AUC (Mahalanobis)" in tables.table4(shuffled).rows()
    # Printed as formatted: tabulate does not reprint "100.0" as "100" or "0.240" as "0.24".
    rounded = tables.table1(runs.assign(image_auroc=1.0, au_iou=0.24)).to_markdown()
    assert re.search(r"\| +100\.0 \|", rounded) and re.search(r"\| +0\.240 \|", rounded)
    claims = stats.with_detector_labels(stats.paired_statistics(runs), runs)
    assert {"PaDiM", "KNN vs PatchCore"} <= set(claims["detector"])
    comparison = paper.compare_with_paper(runs)
    assert "Mahalanobis (maha)" in paper.comparison_markdown(comparison, "note")
    for plot in (
        lambda: figures.plot_pollution_curve(shuffled, "image_auroc", []),
        lambda: figures.plot_refinement_curve(shuffled, "image_auroc", []),
        lambda: figures.plot_strategies(shuffled, "image_auroc", []),
    ):
        texts = legend_texts(monkeypatch, figures, plot)
        assert {"PaDiM", "PatchCore"} <= set(texts) and "padim" not in texts
    texts = legend_texts(
        monkeypatch, paper, lambda: paper.plot_comparison(paper.compare_with_paper(runs), [])
    )
    assert not {"detector_type", "row", "table"} & set(texts)
    assert {"detector", "KNN", "Mahalanobis (maha)", "mean over categories"} <= set(texts)
    # recovery.md reads like the paper's tables; the CSV keeps the raw columns.
    raw = recovery.recovery_table(runs)
    assert {"gain_ci_low", "gain_ci_high", "recovery", "lost"} <= set(raw.columns)
    readable = recovery.recovery_for_reading(raw)
    first = raw.iloc[0]
    assert readable["detector"].iloc[0] == "KNN"
    assert readable["strategy"].iloc[0] == strategies.label(first["strategy"])
    assert readable["clean (%)"].iloc[0] == f"{100 * first['clean']:.1f}"
    assert readable["gain, 95 % CI (points)"].iloc[0] == (
        f"[{100 * first['gain_ci_low']:.1f}, {100 * first['gain_ci_high']:.1f}]"
    )
    assert "SROC ranked by the refiner (Mahalanobis)" in set(readable["strategy"])


def test_comparison_follows_the_refiner_and_the_categories_per_detector():
    # Refined by KNN: the paper's Table 4 is refined by Mahalanobis, so it is left out.
    by_knn = paper.compare_with_paper(fake_runs(seeds=[0, 1], refiner="knn"), refiner="knn")
    assert "4" not in set(by_knn["table"])
    by_mahalanobis = paper.compare_with_paper(fake_runs(seeds=[0, 1]))
    table4 = by_mahalanobis[by_mahalanobis["table"] == "4"]
    assert table4["paper_row"].str.endswith("(Mahalanobis)").all() and len(table4)
    # The paper's 13 categories, except PaDiM's screw runs: only PaDiM's means differ.
    runs = fake_runs(seeds=[0, 1], categories=labels.PAPER_CATEGORIES)
    runs = runs[~((runs["detector"] == "padim") & (runs["category"] == "screw"))]
    comparison = paper.compare_with_paper(runs)
    means = comparison[comparison["category"] == "mean"].groupby("detector")["same_categories"]
    assert means.all().to_dict() == {"knn": True, "maha": True, "padim": False, "patchcore": True}
    assert not means.any()["padim"]


def test_comparison_says_what_is_compared():
    elpv = paper.comparison_title("elpv")
    assert "MVTec AD" in elpv and "not expected on the diagonal" in elpv
    assert "not expected" not in paper.comparison_title("mvtec")
    note = paper.comparison_note("b", "elpv", ["sroc-replace/set=fixed"])
    for words in ("AU-IoU is this project's definition", "fixed per category",
                  "mean of the categories'", "sroc-replace/set=fixed", "MVTec AD's"):  # fmt: skip
        assert words in note
    assert "MVTec AD's" not in paper.comparison_note("b", "mvtec")


def test_paired_claims_drop_seeds_whose_conditions_cover_other_categories(runs):
    # Seed 2 of PaDiM's 20 % SROC refinement lost its bottle run.
    lacking = (
        (runs["detector"] == "padim")
        & (runs["strategy"] == "sroc")
        & (runs["refinement_ratio"] == 0.2)
        & (runs["seed"] == 2)
        & (runs["category"] == "bottle")
    )
    table = stats.paired_statistics(runs[~lacking])
    row = table[(table["comparison"].str.startswith("sroc ")) & (table["detector"] == "padim")]
    assert row["n_seeds"].item() == 2
    assert "seed(s) 2 dropped" in row["note"].item()

    def seed_means(**conditions):
        chosen = runs[runs["seed"] != 2]
        for column, value in conditions.items():
            chosen = chosen[np.isclose(chosen[column], value) if isinstance(value, float)
                            else chosen[column] == value]  # fmt: skip
        return chosen.groupby(["seed", "category"])["image_auroc"].mean().groupby("seed").mean()

    gain = seed_means(detector="padim", strategy="sroc", refinement_ratio=0.2) - seed_means(
        detector="padim", strategy="sroc", refinement_ratio=0.0
    )
    assert row["mean_difference"].item() == pytest.approx(gain.mean())
    # So does the other claim on these runs; every other claim keeps all seeds.
    refiner = table[table["claim"].str.startswith("refining") & (table["detector"] == "padim")]
    assert refiner["n_seeds"].item() == 2 and "seed(s) 2 dropped" in refiner["note"].item()
    others = table.drop([*row.index, *refiner.index])
    assert (others["n_seeds"] == len(SEEDS)).all() and (others["note"] == "").all()


def test_captions_state_what_is_built():
    captions = {path.stem: " ".join(path.read_text().split()) for path in CAPTIONS.glob("*.rst")}
    assert "not adjusted for the number of" in captions["paired_statistics"]
    assert "dropped" in captions["paired_statistics"]
    for name in ("paper_comparison", "paper_comparison_plot"):
        assert "own definition" in captions[name] and "fixed per category" in captions[name]
        assert "not expected on the diagonal" in captions[name]
    assert "mean of the categories' standard deviations" in captions["table1_pollution"]
    for name in ("table2_refinement", "table4_refiner"):
        assert "±" not in captions[name] and "not printed" in captions[name]
