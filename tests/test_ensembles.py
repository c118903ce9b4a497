"""Sparse memory ensembles (``ensemble_oob``, ``ensemble_auto``) and the consensus of several
rankings per member, against independent references: explicit fits scored image by image,
aggregates by plain Python loops, rank positions counted by hand."""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from ranking_references import reference_order

from sroc import config as sroc_config
from sroc import costs, ensembles, refinement, strategies
from sroc.config import DetectorSpec
from sroc.contamination import estimate_contamination
from sroc.detectors import make_detector
from sroc.report import auto_ratio
from sroc.splits import round_half_up

REPO = Path(__file__).resolve().parents[1]
STAGES = {"s1": (5, 4, 4), "s2": (8, 2, 2)}
N = 30
PARAMS = {"knn": {"n_neighbors": 2}, "mahalanobis": {}, "patchcore": {"index": "flat"}}


def random_features(seed: int, n: int = N, n_defective: int = 0):
    """Gaussian feature maps; the first ``n_defective`` images share one defect (a strong common
    channel direction), as a group of similar defects. Ids shuffled against positions."""
    rng = np.random.default_rng(seed)
    features = {
        stage: rng.normal(size=(n, c, h, w)).astype(np.float32)
        for stage, (c, h, w) in STAGES.items()
    }
    for stage, (c, _, _) in STAGES.items():
        features[stage][:n_defective] += 4.0 * rng.normal(size=(1, c, 1, 1)).astype(np.float32)
    ids = np.array([f"img{i:03d}" for i in rng.permutation(n)])
    return features, ids


def inputs_for(detector_type, features, ids, rng_seed=7, params=None, **fields):
    spec = DetectorSpec(detector_type, PARAMS[detector_type], name=detector_type)
    return strategies.RankingInputs(
        features=features,
        image_ids=ids,
        polluted=np.zeros(len(ids), dtype=bool),
        detector=spec,
        fitted=None,
        refiner=spec,
        consensus=fields.pop("consensus", ()),
        settings=fields.pop("settings", {}),
        params={**strategies.ENSEMBLE_PARAMS, **(params or {})},
        rng_seed=rng_seed,
    )


# ---------------------------------------------------------------------------------------------
# Independent references


def reference_out_of_bag(detector_type, features, bags):
    """Member b fitted explicitly on its bag, every image scored one at a time, the scores of
    the images in the bag dropped: {(b, i): score}."""
    scores = {}
    for member, bag in enumerate(bags):
        fitted = make_detector(detector_type, **PARAMS[detector_type])
        fitted.fit({stage: array[bag] for stage, array in features.items()})
        for image in range(bags.shape[1]):
            if not bag[image]:
                one = {stage: array[image : image + 1] for stage, array in features.items()}
                scores[member, image] = float(fitted.score(one, maps=False)[0][0])
    return scores


def reference_aggregate(scores, n_members, n, aggregate):
    """Per member, its out-of-bag images' rank positions (lowest 0, ties averaged) or z-scores;
    per image, their mean."""
    per_image = {image: [] for image in range(n)}
    for member in range(n_members):
        own = {image: s for (b, image), s in scores.items() if b == member}
        for image, value in own.items():
            others = [v for i, v in own.items() if i != image]
            if aggregate == "rank":
                below = sum(v < value for v in others) + 0.5 * sum(v == value for v in others)
                per_image[image].append(below)
            else:
                mean, spread = statistics.fmean(own.values()), statistics.pstdev(own.values())
                per_image[image].append((value - mean) / spread)
    return np.array([statistics.fmean(per_image[image]) for image in range(n)])


def mean_positions(rankings):
    """Each image's mean position over the rankings' removal orders, counted by hand."""
    n = len(rankings[0].order)
    return [
        statistics.fmean(list(ranking.order).index(image) for ranking in rankings)
        for image in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# The bags


@pytest.mark.parametrize("n, n_members, fraction", [(30, 10, 0.2), (31, 2, 0.3), (12, 12, 0.5)])
def test_bags_have_round_f_n_images_and_leave_every_image_out_at_least_once(n, n_members, fraction):
    bags = ensembles.ensemble_bags(n, n_members, fraction, rng_seed=5)
    assert bags.shape == (n_members, n) and bags.dtype == bool
    assert (bags.sum(axis=1) == round_half_up(fraction * n)).all()
    assert (~bags).any(axis=0).all()
    np.testing.assert_array_equal(bags, ensembles.ensemble_bags(n, n_members, fraction, 5))
    assert not np.array_equal(bags, ensembles.ensemble_bags(n, n_members, fraction, 6))


def test_bags_refuse_members_too_small_to_fit_or_too_large_to_leave_images_out():
    with pytest.raises(ValueError, match=r"members of 1 image.*raise fraction to at least 0.0667"):
        ensembles.ensemble_bags(30, 10, 0.04, 0)
    with pytest.raises(ValueError, match="lower fraction or raise n_members"):
        ensembles.ensemble_bags(30, 2, 0.6, 0)  # groups of 15: at most 15 in a bag
    with pytest.raises(ValueError, match="n_members must be an integer of at least 2"):
        ensembles.ensemble_bags(30, 1, 0.2, 0)
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\)"):
        ensembles.ensemble_bags(30, 10, 1.0, 0)


# ---------------------------------------------------------------------------------------------
# ensemble_oob: the acceptance test


@pytest.mark.parametrize("detector_type", ["knn", "mahalanobis"])
@pytest.mark.parametrize("aggregate", ["rank", "zscore"])
def test_out_of_bag_ranking_equals_explicit_fits_scoring_the_images_they_did_not_see(
    detector_type, aggregate
):
    features, ids = random_features(seed=1, n_defective=4)
    params = {"n_members": 6, "fraction": 0.3, "aggregate": aggregate}
    inputs = inputs_for(detector_type, features, ids, params=params)
    ranking = strategies.get("ensemble_oob").function(inputs)

    bags = ensembles.ensemble_bags(N, 6, 0.3, inputs.rng_seed)
    scores = reference_out_of_bag(detector_type, features, bags)
    expected = reference_aggregate(scores, 6, N, aggregate)
    np.testing.assert_allclose(ranking.scores, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(
        ranking.order, reference_order(ranking.scores, ids, inputs.rng_seed)
    )
    np.testing.assert_array_equal(ranking.order, reference_order(expected, ids, inputs.rng_seed))
    assert ranking.n_fits == 6 and ranking.fit_seconds > 0 and ranking.score_seconds > 0

    # The raw out-of-bag scores themselves, member by member, in bag left out.
    out_of_bag = ensembles.out_of_bag_scores(features, ids, inputs.detector.factory(), bags).scores
    assert np.isnan(out_of_bag[bags]).all()
    for (member, image), value in scores.items():
        assert out_of_bag[member, image] == pytest.approx(value, rel=1e-6)


def test_members_are_fitted_on_their_bag_and_score_only_the_rest():
    features, ids = random_features(seed=2)
    position = {features["s1"][i].tobytes(): i for i in range(N)}
    log = []

    class Recording:
        def __init__(self):
            self.detector = make_detector("knn", **PARAMS["knn"])

        def fit(self, train):
            self.fitted = {position[image.tobytes()] for image in train["s1"]}
            self.detector.fit(train)
            return self

        def score(self, scored, maps=True):
            log.append((self.fitted, {position[image.tobytes()] for image in scored["s1"]}))
            return self.detector.score(scored, maps=maps)

    bags = ensembles.ensemble_bags(N, 5, 0.2, rng_seed=3)
    ensembles.out_of_bag_scores(features, ids, Recording, bags)
    assert log == [(set(np.flatnonzero(bag)), set(np.flatnonzero(~bag))) for bag in bags]


def test_sparse_members_find_a_group_of_similar_defects_that_hides_itself_from_sroc():
    # Six images share one defect: fitted on all 30, KNN (k = 2) finds each among the others at
    # a small distance; a member fitted on 10 % (3 images) rarely holds two of them.
    for seed in range(5):
        features, ids = random_features(seed=seed, n_defective=6)
        inputs = inputs_for("knn", features, ids, params={"fraction": 0.1})
        sroc = refinement.sroc_ranking(features, ids, inputs.detector.factory())
        ensemble = strategies.get("ensemble_oob").function(inputs)
        found = [len(set(r.order[:6]) & set(range(6))) for r in (sroc, ensemble)]
        assert found[1] >= 4 and found[1] > found[0], (seed, found)


def test_a_member_too_small_for_the_detector_names_the_fraction():
    features, ids = random_features(seed=2)
    spec = DetectorSpec("knn", {"n_neighbors": 5}, name="knn")
    with pytest.raises(ValueError, match=r"member 0 .* 3 of 30 .*n_neighbors=5.*raise the ensem"):
        ensembles.ensemble_oob_ranking(features, ids, spec.factory(), 10, 0.1, "rank", 0)


def test_aggregates_are_checked():
    with pytest.raises(ValueError, match=r"aggregate must be one of \('rank', 'zscore'\)"):
        ensembles.aggregate_out_of_bag(np.ones((2, 3)), "mean")
    with pytest.raises(ValueError, match=r"positions \[1\] are in every member's bag"):
        ensembles.aggregate_out_of_bag(np.array([[1.0, np.nan, 2], [3, np.nan, 1]]), "rank")


# ---------------------------------------------------------------------------------------------
# ensemble_auto


def test_ensemble_auto_removes_the_estimated_share_of_the_ensemble_ranking():
    features, ids = random_features(seed=5, n_defective=3)
    inputs = inputs_for("mahalanobis", features, ids)
    selection = strategies.get("ensemble_auto").function(inputs)

    bags = ensembles.ensemble_bags(N, 10, 0.2, inputs.rng_seed)
    scores = reference_out_of_bag("mahalanobis", features, bags)
    raw_means = [
        statistics.fmean(s for (_, i), s in scores.items() if i == image) for image in range(N)
    ]
    ratio = estimate_contamination(np.array(raw_means))
    assert selection.ratio == pytest.approx(ratio)
    assert ratio > 0  # the planted group stands out of the healthy bulk
    ranking = strategies.get("ensemble_oob").function(inputs_for("mahalanobis", features, ids))
    np.testing.assert_array_equal(selection.removed, ranking.order[: round_half_up(ratio * N)])


# ---------------------------------------------------------------------------------------------
# The consensus of several rankings per member


def consensus_inputs(features, ids, members, rankings, strategy_params=None):
    specs = tuple(DetectorSpec(m, PARAMS[m], name=m) for m in members)
    settings = {"consensus_rankings": rankings, "strategy_params": strategy_params or {}}
    return inputs_for(members[0], features, ids, consensus=specs, settings=settings)


def test_default_consensus_averages_the_members_leave_one_out_rankings_as_before():
    features, ids = random_features(seed=6, n_defective=3)
    inputs = consensus_inputs(features, ids, ["knn", "mahalanobis"], ["sroc_loo"])
    consensus = strategies.get("consensus").function(inputs)
    # Today's computation, written out: each member's leave-one-out SROC, rank positions averaged.
    seed = inputs.rng_seed
    loo = [
        refinement.sroc_ranking(features, ids, make_loo(member), tie_seed=seed)
        for member in inputs.consensus
    ]
    expected = refinement.consensus_ranking(loo, ids, tie_seed=seed)
    np.testing.assert_array_equal(consensus.scores, expected.scores)
    np.testing.assert_array_equal(consensus.order, expected.order)


def make_loo(spec):
    return spec.factory(exclude_self=True)


def test_consensus_includes_patchcore_leave_one_out_and_the_ensembles():
    features, ids = random_features(seed=7, n_defective=3)
    strategy_params = {"ensemble_oob": {"n_members": 4, "fraction": 0.3}}
    inputs = consensus_inputs(
        features, ids, ["knn", "patchcore"], ["sroc_loo", "ensemble_oob"], strategy_params
    )
    consensus = strategies.get("consensus").function(inputs)

    members = [DetectorSpec(m, PARAMS[m], name=m) for m in ("knn", "patchcore")]
    seed = inputs.rng_seed
    rankings = [refinement.sroc_ranking(features, ids, make_loo(m), tie_seed=seed) for m in members]
    rankings += [
        ensembles.ensemble_oob_ranking(features, ids, m.factory(), 4, 0.3, "rank", seed)
        for m in members
    ]
    positions = mean_positions(rankings)
    np.testing.assert_allclose(consensus.scores, [N - 1 - p for p in positions])
    np.testing.assert_array_equal(consensus.order, reference_order(consensus.scores, ids, seed))
    assert consensus.n_fits == 2 + 2 * 4
    assert strategies.get("consensus").ranked_by(inputs) == "knn+patchcore"


def test_a_job_computes_each_costly_ranking_once_and_reuses_it_unchanged(monkeypatch):
    from sroc.detectors.base import BaseDetector

    features, ids = random_features(seed=8, n_defective=3)
    members = tuple(DetectorSpec(m, PARAMS[m], name=f"member {m}") for m in ("knn", "mahalanobis"))
    settings = {"consensus_rankings": ["sroc_loo", "ensemble_oob"], "strategy_params": {}}
    names = ["sroc_loo", "consensus", "sroc_auto", "ensemble_oob", "ensemble_auto"]

    def job_inputs():
        return inputs_for("mahalanobis", features, ids, consensus=members, settings=settings)

    fits = []
    original_fit = BaseDetector.fit
    monkeypatch.setattr(
        BaseDetector,
        "fit",
        lambda self, f: fits.append(type(self).__name__) or original_fit(self, f),
    )
    shared = job_inputs()  # one job: every strategy's inputs derived from the same ones
    in_one_job = {name: strategies.get(name).function(replace(shared)) for name in names}
    # Leave-one-out: one fit per detector type; the ensembles: 10 members per type.
    assert sorted(fits) == sorted(["KNNDetector"] * 11 + ["MahalanobisDetector"] * 11)

    for name in names:  # each strategy alone, in a job of its own
        alone = strategies.get(name).function(job_inputs())
        if isinstance(alone, strategies.Selection):
            np.testing.assert_array_equal(in_one_job[name].removed, alone.removed)
            assert in_one_job[name].ratio == alone.ratio
        else:
            np.testing.assert_array_equal(in_one_job[name].scores, alone.scores)
            np.testing.assert_array_equal(in_one_job[name].order, alone.order)


def test_patch_bank_detectors_score_leave_one_out_once_for_sroc_loo_and_patch_sroc(monkeypatch):
    from sroc.detectors.base import BaseDetector

    features, ids = random_features(seed=9, n_defective=3)
    shared = inputs_for("patchcore", features, ids)
    fits = []
    original_fit = BaseDetector.fit
    monkeypatch.setattr(
        BaseDetector, "fit", lambda self, f: fits.append(1) or original_fit(self, f)
    )
    patch = strategies.get("patch_sroc").function(replace(shared))
    loo = strategies.get("sroc_loo").function(replace(shared))
    assert len(fits) == 1 and loo.patch_scores is None and patch.patch_scores is not None
    # The reference: sroc.refinement's own leave-one-out SROC, without the strategies.
    factory = shared.detector.factory(exclude_self=True)
    expected = refinement.sroc_ranking(features, ids, factory, tie_seed=shared.rng_seed)
    np.testing.assert_array_equal(loo.scores, expected.scores)
    np.testing.assert_array_equal(loo.order, expected.order)


# ---------------------------------------------------------------------------------------------
# Costs


def test_costs_count_the_members_fits_and_out_of_bag_scorings():
    spec = DetectorSpec("knn", name="knn")
    settings = {
        **sroc_config.refinement_defaults(),
        "strategy_params": {"ensemble_oob": {"n_members": 4, "fraction": 0.25}},
    }
    model = costs.PerImageCost("mahalanobis", 40, settings, spec, [spec])
    half = make_detector("mahalanobis").runtime_seconds_per_image / 2
    # 4 members fitted on 10 images, each scoring the other 30.
    assert strategies.get("ensemble_oob").cost(model) == pytest.approx(4 * half * (10 + 30))
    # ensemble_auto has its own parameters (the defaults: 10 members of 8), then a refit.
    auto = 10 * half * 40 + model.test_run(40 - 8)
    assert strategies.get("ensemble_auto").cost(model) == pytest.approx(auto)
    # The default consensus costs what it did: each member's fit and self-scoring.
    assert strategies.get("consensus").cost(model) == pytest.approx(model.ranking_by(spec))
    both = {**settings, "consensus_rankings": ["sroc_loo", "ensemble_oob"]}
    knn_half = make_detector("knn").runtime_seconds_per_image / 2
    model = replace(model, settings=both)
    assert strategies.get("consensus").cost(model) == pytest.approx(
        model.ranking_by(spec) + 4 * knn_half * 40
    )


def test_a_rank_job_prices_a_ranking_that_an_auto_strategy_reuses_once():
    spec = DetectorSpec("mahalanobis", name="mahalanobis")
    model = costs.PerImageCost("mahalanobis", 40, sroc_config.refinement_defaults(), spec, [spec])
    refit = model.test_run(40 - 8)
    for auto, ranking in (("sroc_auto", "sroc_loo"), ("ensemble_auto", "ensemble_oob")):
        alone = strategies.get(auto).cost(model)
        assert strategies.rank_job_cost([auto], model) == pytest.approx(alone)
        both = strategies.rank_job_cost([ranking, auto], model)
        assert both == pytest.approx(strategies.get(ranking).cost(model) + refit)


# ---------------------------------------------------------------------------------------------
# Configuration


def synthetic_config(**refinement_overrides):
    config = yaml.safe_load((REPO / "config" / "synthetic.yaml").read_text())
    config["refinement"].update(refinement_overrides)
    return config


def test_the_synthetic_and_shared_configs_run_the_ensembles():
    sroc_config.validate_config(synthetic_config())
    for name in ("synthetic", "shared"):
        config = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
        assert {"ensemble_oob", "ensemble_auto"} <= set(config["refinement"]["strategies"])
    assert sroc_config.refinement_defaults()["consensus_rankings"] == ["sroc_loo"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"consensus_rankings": ["nope"]}, r"consensus_rankings: unknown refinement strategy"),
        ({"consensus_rankings": ["sroc_auto"]}, r"names 'sroc_auto', a strategy of kind"),
        ({"consensus_rankings": ["consensus"]}, r"names 'consensus', a strategy of kind"),
        (
            {"strategy_params": {"ensemble_oob": {"aggregate": "mean"}}},
            r"strategy_params.ensemble_oob: aggregate must be one of \['rank', 'zscore'\]",
        ),
        (
            {"strategy_params": {"ensemble_oob": {"fraction": 1.5}}},
            r"strategy_params.ensemble_oob: fraction must be a number in \(0, 1\), got 1.5",
        ),
        (
            {"strategy_params": {"ensemble_oob": {"n_members": 4}}},
            r"ensemble_auto ranks with .* but ensemble_oob, which the auto_ratio table",
        ),
    ],
)
def test_config_errors_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        sroc_config.validate_config(synthetic_config(**overrides))


def test_a_consensus_ranking_needs_every_member_to_run_it():
    from sroc.detectors.base import BaseDetector

    class NoLeaveOneOut(BaseDetector, name="ensembles_test_plain", label="plain"):
        runtime_seconds_per_image = 0.001

        def __init__(self, stages=None, n_jobs=None, random_state=None):
            self.stages, self.n_jobs, self.random_state = stages, n_jobs, random_state

    config = synthetic_config(consensus=["knn", "ensembles_test_plain"])
    with pytest.raises(ValueError, match=r"ensembles_test_plain\) with consensus_rankings 'sro"):
        sroc_config.validate_config(config)
    config["refinement"]["consensus_rankings"] = ["ensemble_oob"]  # no capability needed
    sroc_config.validate_config(config)


def test_consensus_params_of_a_non_member_are_an_error_unless_cleared():
    config = synthetic_config(consensus=["knn", "mahalanobis"])
    config["refinement"]["consensus_params"] = {"patchcore": {"coreset_ratio": 0.1}}
    with pytest.raises(ValueError, match=r"consensus_params names 'patchcore', which is not in"):
        sroc_config.validate_config(config)
    # A layered config file cannot remove the key: null clears it.
    config["refinement"]["consensus_params"] = {"patchcore": None}
    sroc_config.validate_config(config)
    assert [spec.params for spec in sroc_config.consensus_specs(config)] == [{}, {}]


# ---------------------------------------------------------------------------------------------
# Report


def test_auto_ratio_table_holds_each_auto_strategy_against_its_own_ranking():
    # Three seeds of one category; AUROC by strategy and refinement ratio, +0.01 per seed.
    fixed = {"sroc_loo": {0.0: 0.80, 0.1: 0.85, 0.2: 0.83},
             "ensemble_oob": {0.0: 0.80, 0.1: 0.90, 0.2: 0.95}}  # fmt: skip
    auto = {"sroc_auto": (0.05, 0.82), "ensemble_auto": (0.15, 0.94)}
    rows = [
        (strategy, ratio, value) for strategy, curve in fixed.items()
        for ratio, value in curve.items()
    ] + [(strategy, ratio, value) for strategy, (ratio, value) in auto.items()]  # fmt: skip
    runs = pd.DataFrame(
        [
            {"detector": "knn", "category": "c", "seed": seed, "strategy": strategy,
             "refinement_ratio": ratio, "pollution_ratio": 0.2, "image_auroc": value + seed / 100}
            for seed in range(3)
            for strategy, ratio, value in rows
        ]
    )  # fmt: skip
    table = auto_ratio.auto_ratio_table(runs).set_index("strategy")
    assert list(table.index) == ["sroc_auto", "ensemble_auto"]
    assert table.loc["sroc_auto", "ranking"] == "sroc_loo"
    assert table.loc["sroc_auto", "best_ratio"] == 0.1
    assert table.loc["ensemble_auto", "ranking"] == "ensemble_oob"
    assert table.loc["ensemble_auto", "best_ratio"] == 0.2
    assert table.loc["ensemble_auto", "auto"] == pytest.approx(0.95)
    assert table.loc["ensemble_auto", "best"] == pytest.approx(0.96)
    assert table.loc["ensemble_auto", "difference"] == pytest.approx(-0.01)
    assert table.loc["sroc_auto", "difference"] == pytest.approx(-0.03)
    assert table.loc["ensemble_auto", "auto_ratio"] == pytest.approx(0.15)
    assert table.loc["ensemble_auto", "unrefined"] == pytest.approx(0.81)
    assert strategies.auto_ratio_strategies() == ["sroc_auto", "ensemble_auto"]
