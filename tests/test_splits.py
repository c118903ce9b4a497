"""Invariants of the pollution splits (section 4.1, protocol notes)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from sroc import splits


def fake_index(n_train: int, defect_counts: dict[str, int], n_test_good: int = 10, category="cat"):
    rows = [("train", "good", 0, i) for i in range(n_train)]
    rows += [("test", "good", 0, i) for i in range(n_test_good)]
    for defect_type, count in defect_counts.items():
        rows += [("test", defect_type, 1, i) for i in range(count)]
    index = pd.DataFrame(
        {
            "image_id": [f"{o}/{t}/{i:03d}" for o, t, _, i in rows],
            "category": category,
            "origin": [o for o, _, _, _ in rows],
            "defect_type": [t for _, t, _, _ in rows],
            "label": [lab for _, _, lab, _ in rows],
            "path": [f"/data/{category}/{o}/{t}/{i:03d}.png" for o, t, _, i in rows],
            "mask_path": [
                "" if lab == 0 else f"/data/{category}/ground_truth/{t}/{i:03d}_mask.png"
                for _, t, lab, i in rows
            ],
        }
    )
    return index.sort_values("image_id").reset_index(drop=True)


RATIOS = [0.0, 0.05, 0.1, 0.15, 0.2]


@pytest.fixture
def index():
    return fake_index(97, {"crack": 31, "hole": 17, "scratch": 9, "tiny": 2})


@pytest.fixture(params=splits.SET_SEEDS)
def set_seed(request):
    return request.param


def test_train_size_is_constant_and_pollution_count_is_rounded(index, set_seed):
    manifest = splits.make_split(index, seed=3, set_seed=set_seed)
    for ratio in RATIOS:
        train = splits.training_set(manifest, ratio)
        assert len(train) == 97
        expected = int(np.floor(ratio * 97 + 0.5))  # round half up, e.g. 0.05*97=4.85 -> 5
        assert train["polluted"].sum() == expected
        assert (train.loc[train["polluted"], "label"] == 1).all()
        assert (train.loc[~train["polluted"], "origin"] == "train").all()


def test_pollution_set_is_stratified_by_defect_type(index, set_seed):
    manifest = splits.make_split(index, seed=0, set_seed=set_seed)
    pollution = manifest[manifest["role"] == "pollution"]
    set_size = int(np.floor(0.2 * 97 + 0.5))
    assert len(pollution) == set_size == 19
    counts = {"crack": 31, "hole": 17, "scratch": 9, "tiny": 2}
    total = sum(counts.values())
    got = pollution.groupby("defect_type").size().reindex(list(counts), fill_value=0)
    for defect_type, count in counts.items():
        # Largest remainder keeps every type within one image of its exact proportional share.
        assert abs(got[defect_type] - set_size * count / total) < 1
    # 19 * (31, 17, 9, 2) / 59 = 9.98, 5.47, 2.90, 0.64 -> floors 9, 5, 2, 0 and 3 remainders
    # go to the largest fractions: crack .98, scratch .90, tiny .64.
    assert got.to_dict() == {"crack": 10, "hole": 5, "scratch": 3, "tiny": 1}


def test_allocation_matches_brute_force_definition():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = {f"t{i}": int(c) for i, c in enumerate(rng.integers(1, 40, rng.integers(1, 6)))}
        total = int(rng.integers(0, sum(counts.values()) + 1))
        alloc = splits.allocate_by_type(counts, total)
        assert sum(alloc.values()) == total
        quotas = {t: total * c / sum(counts.values()) for t, c in counts.items()}
        for t in counts:
            assert np.floor(quotas[t]) <= alloc[t] <= np.ceil(quotas[t])
        # No type that got its floor has a strictly larger remainder than one that got rounded up.
        up = [quotas[t] % 1 for t in counts if alloc[t] > np.floor(quotas[t])]
        down = [quotas[t] % 1 for t in counts if alloc[t] == np.floor(quotas[t])]
        if up and down:
            assert min(up) >= max(down) - 1e-12


def test_ratios_are_nested(index, set_seed):
    manifest = splits.make_split(index, seed=1, set_seed=set_seed)
    sets = [set(splits.training_set(manifest, r)["image_id"]) for r in RATIOS]
    polluted = [set(splits.training_set(manifest, r).query("polluted")["image_id"]) for r in RATIOS]
    for low, high in itertools.pairwise(range(len(RATIOS))):
        assert polluted[low] <= polluted[high]
        removed_low = set(index.query("origin == 'train'")["image_id"]) - sets[low]
        removed_high = set(index.query("origin == 'train'")["image_id"]) - sets[high]
        assert removed_low <= removed_high


def test_pollution_is_disjoint_from_the_test_set(index, set_seed):
    manifest = splits.make_split(index, seed=2, set_seed=set_seed)
    test_ids = set(splits.test_set(manifest)["image_id"])
    pollution_ids = set(manifest.query("role == 'pollution'")["image_id"])
    assert not test_ids & pollution_ids
    for ratio in RATIOS:
        assert not set(splits.training_set(manifest, ratio)["image_id"]) & test_ids
    # Every image of the category has exactly one role.
    assert len(manifest) == len(index)
    assert set(manifest["image_id"]) == set(index["image_id"])
    assert (splits.test_set(manifest)["label"] == 1).sum() == 59 - 19


def test_splits_are_deterministic_and_independent_of_row_order(index):
    a = splits.make_split(index, seed=4)
    b = splits.make_split(index.sample(frac=1, random_state=7), seed=4)
    pd.testing.assert_frame_equal(a, b)
    c = splits.make_split(index, seed=5)
    assert not a["removal_rank"].equals(c["removal_rank"])
    assert set(a.query("role == 'pollution'")["image_id"]) != set(
        c.query("role == 'pollution'")["image_id"]
    ) or not a["injection_rank"].equals(c["injection_rank"])


def test_fixed_set_gives_the_same_test_set_for_every_seed(index):
    manifests = [splits.make_split(index, seed=seed, set_seed="fixed") for seed in range(5)]
    test_sets = {tuple(splits.test_set(m)["image_id"]) for m in manifests}
    pollution_sets = {tuple(m.query("role == 'pollution'")["image_id"]) for m in manifests}
    assert len(test_sets) == 1 and len(pollution_sets) == 1
    # At 0 % every seed fits the same training set too: Table 1's 0 % column has no +-.
    assert len({tuple(splits.training_set(m, 0.0)["image_id"]) for m in manifests}) == 1
    # The seed still picks which goods leave and which pollution images enter first.
    removed = {frozenset(m.query("removal_rank <= 10")["image_id"]) for m in manifests}
    injected = {frozenset(m.query("injection_rank <= 10")["image_id"]) for m in manifests}
    assert len(removed) == 5 and len(injected) == 5


def test_per_seed_set_redraws_the_test_set(index):
    manifests = [splits.make_split(index, seed=seed, set_seed="per_seed") for seed in range(5)]
    test_sets = {tuple(splits.test_set(m)["image_id"]) for m in manifests}
    assert len(test_sets) == 5
    # Each seed's removal order is the same under both choices: only the set's draw differs.
    for seed, manifest in enumerate(manifests):
        fixed = splits.make_split(index, seed=seed, set_seed="fixed")
        assert manifest["removal_rank"].equals(fixed["removal_rank"])


def test_fixed_sets_differ_between_categories():
    a = splits.make_split(fake_index(50, {"x": 30}, category="a"), seed=0)
    b = splits.make_split(fake_index(50, {"x": 30}, category="b"), seed=0)
    assert not a.query("role == 'pollution'")["image_id"].equals(
        b.query("role == 'pollution'")["image_id"]
    )


def test_protocol_names_the_set_choice():
    assert splits.protocol_name("fixed") == "sroc-replace/set=fixed"
    assert splits.protocol_name("per_seed") == "sroc-replace/set=per_seed"
    with pytest.raises(ValueError, match="set_seed must be one of fixed, per_seed; got 'once'"):
        splits.make_split(fake_index(50, {"x": 30}), seed=0, set_seed="once")


def test_categories_draw_independently():
    a = splits.make_split(fake_index(50, {"x": 30}, category="a"), seed=0)
    b = splits.make_split(fake_index(50, {"x": 30}, category="b"), seed=0)
    assert not np.array_equal(a["removal_rank"].dropna(), b["removal_rank"].dropna())


def test_category_without_enough_defects_is_excluded():
    # MVTec hazelnut: 391 train goods, 70 defective test images; 78 are needed.
    with pytest.raises(splits.CategoryExcluded, match="needs 78 defective test images"):
        splits.make_split(fake_index(391, {"crack": 18, "cut": 17, "hole": 18, "print": 17}), 0)
    # Exactly enough, keeping one for the test set, is accepted.
    manifest = splits.make_split(fake_index(50, {"crack": 11}), seed=0)
    assert (splits.test_set(manifest)["label"] == 1).sum() == 1


def test_ratio_above_the_pollution_set_is_refused(index):
    manifest = splits.make_split(index, seed=0)
    with pytest.raises(ValueError, match="ratio 0.3 needs 29 pollution images"):
        splits.training_set(manifest, 0.3)


def test_manifest_round_trips_through_csv(index, tmp_path):
    manifest = splits.make_split(index, seed=0)
    manifest.to_csv(tmp_path / "m.csv", index=False)
    back = splits.read_manifest(tmp_path / "m.csv")
    pd.testing.assert_frame_equal(manifest, back, check_dtype=False)
    for ratio in RATIOS:
        pd.testing.assert_frame_equal(
            splits.training_set(manifest, ratio),
            splits.training_set(back, ratio),
            check_dtype=False,
        )


def test_summary_reports_composition(index):
    manifest = splits.make_split(index, seed=0)
    summary = splits.summarize(manifest, [0.0, 0.2])
    last = summary.iloc[-1]
    assert last["n_train"] == 97 and last["n_train_polluted"] == 19
    assert last["pollution_by_type"] == "crack=10; hole=5; scratch=3; tiny=1"
    assert summary.iloc[0]["pollution_by_type"] == ""
    assert last["n_test_defective"] == 40


def write_splits(index, seeds, folder, **options):
    """The manifests and json sidecars of ``seeds``, as the split rule writes them."""
    manifests, infos = [], []
    for seed in seeds:
        manifest, info = splits.split_category(index, seed, **options)
        manifests.append(folder / f"seed{seed}.csv")
        infos.append(folder / f"seed{seed}.json")
        manifest.to_csv(manifests[-1], index=False)
        infos[-1].write_text(json.dumps(info))
    return manifests, infos


# A new user's dataset (issue 14 item 8): one category, 250 goods, 50 defective test images.
def small_defect_index():
    return fake_index(250, {"crack": 30, "dent": 20}, category="widget")


def test_dataset_with_every_category_excluded_gets_a_summary_that_says_why(tmp_path):
    manifests, infos = write_splits(small_defect_index(), [0, 1], tmp_path)
    summary = splits.summarize_splits(manifests, infos, RATIOS)
    assert list(summary.columns) == list(splits.SUMMARY_COLUMNS)
    assert summary["seed"].tolist() == [0, 1]
    assert (
        summary["excluded"]
        .str.contains("needs 50 defective test images .* the test set has only 50")
        .all()
    )
    assert summary["n_train"].isna().all()
    note = splits.exclusion_note(summary)
    assert note.startswith("every category was excluded") and "widget" in note
    assert "pollution.max_set_share" in note  # the way out is named


def test_summary_of_a_kept_category_has_no_exclusion_note(index, tmp_path):
    manifests, infos = write_splits(index, [0], tmp_path)
    summary = splits.summarize_splits(manifests, infos, RATIOS)
    assert len(summary) == len(RATIOS) and (summary["excluded"] == "").all()
    assert splits.exclusion_note(summary) is None


@pytest.mark.parametrize(
    ("n_train", "n_defective", "set_fraction", "share"),
    [(250, 50, 0.2, 0.67), (209, 63, 0.2, 0.67), (391, 70, 0.2, 0.5), (12, 3, 0.2, 0.34)],
)
def test_n_train_within_share_is_the_largest_that_fits(n_train, n_defective, set_fraction, share):
    def fits(n):
        return splits.round_half_up(set_fraction * n) <= share * n_defective

    expected = max(n for n in range(n_train + 1) if fits(n))
    assert splits.n_train_within_share(n_train, n_defective, set_fraction, share) == expected


def test_max_set_share_subsamples_the_training_goods(tmp_path):
    index = small_defect_index()
    options = {"max_set_share": 0.67}
    manifests, infos = write_splits(index, [0, 1, 2], tmp_path, **options)
    # 0.67 x 50 = 33.5: 33 pollution images, so round(0.2 N) <= 33 gives N = 167 of 250 goods.
    read = [splits.read_manifest(path) for path in manifests]
    for manifest in read:
        roles = manifest["role"].value_counts().to_dict()
        assert roles == {"train": 167, "unused": 83, "pollution": 33, "test": 10 + 17}
        unused = manifest.query("role == 'unused'")
        assert (unused["origin"] == "train").all()
        assert unused["removal_rank"].isna().all() and unused["injection_rank"].isna().all()
        assert sorted(manifest.query("role == 'train'")["removal_rank"]) == list(range(1, 168))
        assert splits.max_ratio(manifest) == pytest.approx(33 / 167)
        train = splits.training_set(manifest, 0.2)
        assert len(train) == 167 and train["polluted"].sum() == 33
        assert not set(train["image_id"]) & set(unused["image_id"])
        assert not set(splits.test_set(manifest)["image_id"]) & set(unused["image_id"])
    # Under set_seed "fixed" the subsample, like the pollution set, is the same for every seed.
    assert len({tuple(m.query("role == 'unused'")["image_id"]) for m in read}) == 1
    info = json.loads(infos[0].read_text())
    assert info["protocol"] == "sroc-replace/set=fixed/max_set_share=0.67"
    assert (info["excluded"], info["n_train"], info["n_unused"]) == (None, 167, 83)
    summary = splits.summarize_splits(manifests, infos, [0.0, 0.2])
    assert (summary["n_train"] == 167).all() and (summary["n_unused"] == 83).all()
    assert summary["n_train_polluted"].tolist() == [0, 33] * 3
    assert (summary["n_test_defective"] == 17).all()
    assert splits.exclusion_note(summary) is None


def test_max_set_share_per_seed_redraws_the_subsample():
    index = small_defect_index()
    manifests = [
        splits.make_split(index, seed, set_seed="per_seed", max_set_share=0.67) for seed in (0, 1)
    ]
    unused = [set(m.query("role == 'unused'")["image_id"]) for m in manifests]
    assert len(unused[0]) == len(unused[1]) == 83 and unused[0] != unused[1]


def test_max_set_share_leaves_a_category_that_fits_untouched():
    # MVTec bottle: 209 goods, 63 defective test images, a pollution set of 42 (share 0.667).
    index = fake_index(209, {"broken_large": 20, "broken_small": 22, "contamination": 21})
    for set_seed in splits.SET_SEEDS:
        plain = splits.make_split(index, 0, set_seed=set_seed)
        capped = splits.make_split(index, 0, set_seed=set_seed, max_set_share=0.67)
        pd.testing.assert_frame_equal(plain, capped)


def test_max_set_share_too_small_for_one_pollution_image_excludes():
    with pytest.raises(splits.CategoryExcluded, match="leaves no room for a single pollution"):
        splits.make_split(fake_index(50, {"x": 3}), 0, max_set_share=0.3)
    with pytest.raises(ValueError, match=r"max_set_share must lie in \(0, 1\]"):
        splits.make_split(fake_index(50, {"x": 30}), 0, max_set_share=1.5)


def test_unknown_role_in_a_manifest_is_refused(index, tmp_path):
    manifest = splits.make_split(index, seed=0)
    manifest.loc[0, "role"] = "spare"
    manifest.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match=r"unknown roles \['spare'\]"):
        splits.read_manifest(tmp_path / "m.csv")
