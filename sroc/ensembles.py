"""Sparse memory ensembles (MeDS, step 1) as a ranking of the polluted training set: B detectors,
each fitted on a random fraction of the images, every image scored only by the members that did
not see it (out of bag), the members' scores aggregated (docs/refinement.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sroc import refinement
from sroc.refinement import DetectorFactory, Features
from sroc.splits import round_half_up

ENSEMBLE_AGGREGATES = ("rank", "zscore")


@dataclass(frozen=True)
class OutOfBagScores:
    """Member b's score of training image i in ``scores[b, i]`` (B, N) float64, NaN where i is in
    member b's bag (the member was fitted on it); ``fit_seconds`` and ``score_seconds`` summed
    over the B members."""

    scores: np.ndarray
    fit_seconds: float
    score_seconds: float

    @property
    def n_members(self) -> int:
        return len(self.scores)

    def mean(self) -> np.ndarray:
        """Each image's mean score over the members it is out of bag for (N,): the sparse
        memories' averaged score, in the detector's own units."""
        return np.nanmean(self.scores, axis=0)


def ensemble_bags(n_train: int, n_members: int, fraction: float, rng_seed: int) -> np.ndarray:
    """Which images each of ``n_members`` members is fitted on: (B, N) bool, round(fraction N)
    images a member (halves up, as the splits).

    Every image is left out of at least one member's bag, by construction: the images are first
    dealt into ``n_members`` groups of sizes differing by at most one (a seeded random partition,
    :func:`fold_assignment`), and member b draws its bag, uniformly without replacement, from the
    images outside group b. An image is then in no bag of its own group's member and in each other
    member's with probability m / (N - |group b|), so it is out of bag for about B (1 - fraction)
    members. Needs 2 <= round(fraction N) (a detector fits on at least 2 images) and at least
    2 images out of every bag (N - m >= max group size, at least 2).
    """
    if not isinstance(n_members, int | np.integer) or n_members < 2:
        raise ValueError(f"n_members must be an integer of at least 2, got {n_members!r}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}")
    bag_size = round_half_up(fraction * n_train)
    if bag_size < 2:
        raise ValueError(
            f"fraction {fraction} of {n_train} training images gives members of {bag_size} "
            f"image(s); a detector fits on at least 2: raise fraction to at least "
            f"{2 / n_train:.3g}"
        )
    groups = refinement.fold_assignment(n_train, n_members, rng_seed)
    largest_group = int(np.bincount(groups).max())
    if bag_size > n_train - max(largest_group, 2):
        raise ValueError(
            f"fraction {fraction} of {n_train} training images gives members of {bag_size} "
            f"images, too many to leave every image out of at least one bag of {n_members} "
            f"(at most {n_train - max(largest_group, 2)}): lower fraction or raise n_members"
        )
    rng = np.random.default_rng([rng_seed, 1])  # independent of the groups' stream
    bags = np.zeros((n_members, n_train), dtype=bool)
    for member in range(n_members):
        bags[member, rng.choice(np.flatnonzero(groups != member), bag_size, replace=False)] = True
    return bags


def out_of_bag_scores(
    features: Features, image_ids: Sequence[str], factory: DetectorFactory, bags: np.ndarray
) -> OutOfBagScores:
    """Fit one detector per row of ``bags`` (B, N) bool on the images it marks, and score with
    it the images it does not mark (image scores, no maps). ``factory`` must not set
    ``exclude_self``: the members score images they were not fitted on."""
    n = len(refinement.check_inputs(features, image_ids))
    bags = np.asarray(bags, dtype=bool)
    if bags.ndim != 2 or bags.shape[1] != n:
        raise ValueError(f"bags must have shape (B, {n}), got {bags.shape}")
    scores = np.full(bags.shape, np.nan, dtype=np.float64)
    fit_seconds = score_seconds = 0.0
    for member, bag in enumerate(bags):
        try:
            detector, seconds = refinement.fit_timed(
                factory, refinement.subset_features(features, np.flatnonzero(bag))
            )
        except ValueError as error:
            raise ValueError(
                f"ensemble member {member} could not be fitted on its {int(bag.sum())} of "
                f"{n} training images ({error}): raise the ensemble's fraction"
            ) from error
        fit_seconds += seconds
        scores[member, ~bag], seconds = refinement.score_timed(
            detector, refinement.subset_features(features, np.flatnonzero(~bag))
        )
        score_seconds += seconds
    return OutOfBagScores(scores, fit_seconds, score_seconds)


def aggregate_out_of_bag(scores: np.ndarray, aggregate: str) -> np.ndarray:
    """Each image's ensemble score (N,), higher = more anomalous, from the (B, N) out-of-bag
    scores (NaN in bag). Each member's scores are first made comparable across members:

    - ``rank``: the image's rank position among the images the member scored, 0 for its lowest
      score, ties sharing their mean position (every member must score equally many images, as
      :func:`ensemble_bags` gives: the positions then span the same range);
    - ``zscore``: the score standardised by the mean and standard deviation of the member's
      out-of-bag scores (all zero when they are all equal);

    then averaged over the members the image is out of bag for. Rank positions are multiples of
    one half: their sums are exact, so images with equal mean positions tie exactly and are
    ordered by id.
    """
    if aggregate not in ENSEMBLE_AGGREGATES:
        raise ValueError(f"aggregate must be one of {ENSEMBLE_AGGREGATES}, got {aggregate!r}")
    scores = np.asarray(scores, dtype=np.float64)
    out_of_bag = ~np.isnan(scores)
    if not out_of_bag.any(axis=0).all():
        missing = np.flatnonzero(~out_of_bag.any(axis=0))[:10].tolist()
        raise ValueError(f"images at positions {missing} are in every member's bag")
    if aggregate == "rank" and len(set(out_of_bag.sum(axis=1))) != 1:
        raise ValueError(
            f"the rank aggregate needs every member to score equally many images, got "
            f"{out_of_bag.sum(axis=1).tolist()}: use aggregate 'zscore'"
        )
    comparable = np.full(scores.shape, np.nan)
    for member, scored in enumerate(out_of_bag):
        values = scores[member, scored]
        if aggregate == "rank":
            ordered = np.sort(values)
            below = np.searchsorted(ordered, values, side="left")
            not_above = np.searchsorted(ordered, values, side="right")
            comparable[member, scored] = (below + not_above - 1) / 2
        else:
            spread = values.std()
            comparable[member, scored] = (values - values.mean()) / spread if spread else 0.0
    return np.nanmean(comparable, axis=0)


def out_of_bag_ranking(
    out_of_bag: OutOfBagScores, image_ids: Sequence[str], aggregate: str, tie_seed: int = 0
) -> refinement.Ranking:
    """The ranking of the aggregated out-of-bag scores (:func:`aggregate_out_of_bag`); mean rank
    positions tie often, broken with ``tie_seed`` (:func:`tie_keys`)."""
    scores = aggregate_out_of_bag(out_of_bag.scores, aggregate)
    return refinement.Ranking(
        "ensemble_oob",
        scores,
        refinement.removal_order(scores, image_ids, tie_seed),
        out_of_bag.n_members,
        out_of_bag.fit_seconds,
        out_of_bag.score_seconds,
    )


def ensemble_oob_ranking(
    features: Features,
    image_ids: Sequence[str],
    factory: DetectorFactory,
    n_members: int,
    fraction: float,
    aggregate: str,
    rng_seed: int = 0,
) -> refinement.Ranking:
    """Sparse memory ensembles, out of bag (MeDS step 1): ``n_members`` detectors, each fitted on
    a random ``fraction`` of the N training images (:func:`ensemble_bags`), each image scored
    only by the members that did not see it, the members' scores aggregated by ``aggregate``
    (:func:`aggregate_out_of_bag`). A sparse member rarely holds all of a group of similar
    defects, so they stop hiding each other as they do in one model fitted on all N. The
    strategy's defaults are in :data:`sroc.strategies.ENSEMBLE_PARAMS`."""
    n = len(refinement.check_inputs(features, image_ids))
    if aggregate not in ENSEMBLE_AGGREGATES:  # before the B fits, not after
        raise ValueError(f"aggregate must be one of {ENSEMBLE_AGGREGATES}, got {aggregate!r}")
    bags = ensemble_bags(n, n_members, fraction, rng_seed)
    out_of_bag = out_of_bag_scores(features, image_ids, factory, bags)
    return out_of_bag_ranking(out_of_bag, image_ids, aggregate, rng_seed)
