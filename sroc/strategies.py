"""The refinement strategies, each declared once: the grid, the workflow, the report and the cost
model derive everything they list about strategies from :data:`STRATEGIES`.

A :class:`Strategy` entry gives the strategy's name, its kind, the function that does its work, the
detector capabilities it needs, its label in tables and figures, the settings it reads and its cost
in fits and scorings. The kinds:

- ``ranked``: ``function(inputs) -> Ranking`` ranks the polluted training set once (in the grid's
  ``rank`` job); every refinement ratio r then refits on all but the round(r N) first images.
- ``ranked_per_ratio``: ``function(inputs, ratio) -> Ranking`` ranks again for every refinement
  ratio (in that ratio's ``refine`` job), for strategies whose ranking depends on how much is
  removed.
- ``patch``: like ``ranked``, but the ranking carries every training patch's score and each ratio
  removes the round(r P) highest of the P patches from the detector's memory bank.
- ``single_run``: ``function(inputs) -> Selection`` removes a set of images of its own choosing,
  at a ratio of its own; one run per cell (the oracle, a ratio estimated from the data).

A new strategy is one function and one :func:`register` call, in this module or in a plugin file
named by the config's ``plugins:`` list (:mod:`sroc.plugins`); docs/architecture.md walks through
it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from sroc import ensembles, refinement
from sroc.contamination import estimate_contamination
from sroc.costs import CellCost
from sroc.detectors import detector_class
from sroc.splits import round_half_up

if TYPE_CHECKING:
    from sroc.config import DetectorSpec

KINDS = ("ranked", "ranked_per_ratio", "patch", "single_run")
# Detector capabilities a strategy may require, and the class attribute that declares each.
CAPABILITIES = {"exclude_self": "supports_exclude_self", "patch_bank": "has_patch_bank"}


@dataclass(frozen=True)
class RankingInputs:
    """What a strategy's function receives for one (category, seed, detector) cell.

    ``features`` and ``image_ids`` are the polluted training set at the refined pollution ratio;
    ``fitted`` the detector fitted on exactly that set by the robustness curve (SROC reuses it).
    ``polluted`` is the truth: only the oracle may read it. ``settings`` holds the refinement keys
    the strategy declared, ``params`` its own parameters (``refinement.strategy_params``).
    """

    features: Mapping[str, np.ndarray]
    image_ids: np.ndarray
    polluted: np.ndarray
    detector: DetectorSpec
    fitted: object | None
    refiner: DetectorSpec
    consensus: Sequence[DetectorSpec]
    settings: Mapping
    params: Mapping
    rng_seed: int
    # The results of the cell's costly rankings, shared by every strategy of one job (the
    # inputs a job derives with dataclasses.replace hold the same dict): see _computed_once.
    computed: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Selection:
    """A single-run strategy's choice: the removed training positions and the refinement ratio it
    reports (the share it removed, or the ratio it estimated)."""

    removed: np.ndarray
    ratio: float


@dataclass(frozen=True)
class Strategy:
    """One refinement strategy: see the module docstring.

    ``ranked_by`` names what ranked (the runs' ``refiner`` column); ``cost`` the work of its
    ranking (or of its whole run, for ``single_run``) in a cell: the refits of the refinement
    ratios are added by kind. ``report_outputs`` names the report's outputs that exist only when
    this strategy runs (workflow/rules/report_targets.smk). ``in_paper``: one of the paper's six.
    ``check_params(params)`` raises a ValueError for a bad value of the strategy's own parameters
    (the config is checked with it before any job runs). ``auto_ratio_of``: for a single-run
    strategy that removes the first images of a ranking, as many as it estimates from the data,
    the ranked strategies that remove the same images at fixed ratios, in order of preference;
    the report's auto_ratio table holds it against the first of them that ran.
    """

    name: str
    label: str
    kind: str
    function: Callable
    cost: Callable[[CellCost], float]
    ranked_by: Callable[[RankingInputs], str] = lambda inputs: inputs.detector.type
    requires: frozenset[str] = frozenset()
    settings: tuple[str, ...] = ()
    params: Mapping = field(default_factory=dict)
    uses_refiner: bool = False
    report_outputs: tuple[str, ...] = ()
    in_paper: bool = False
    default: bool = False
    check_params: Callable[[Mapping], None] = lambda params: None
    auto_ratio_of: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"strategy {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        unknown = sorted(set(self.requires) - set(CAPABILITIES))
        if unknown:
            raise ValueError(
                f"strategy {self.name!r} requires unknown capabilities {unknown}; "
                f"known: {sorted(CAPABILITIES)}"
            )

    @property
    def has_ratio_curve(self) -> bool:
        """True when the strategy runs at every refinement ratio (all kinds but single_run)."""
        return self.kind != "single_run"

    def applies_to(self, detector_type: str) -> bool:
        """Whether detectors of ``detector_type`` have every capability the strategy needs."""
        return not missing_capabilities(self.requires, detector_type)

    def check_applies_to(self, detector_type: str) -> None:
        """A clear error when ``detector_type`` lacks a capability the strategy requires."""
        require(self.requires, detector_type, f"strategy {self.name!r}")


def missing_capabilities(requires: frozenset[str], detector_type: str) -> list[str]:
    """The capabilities in ``requires`` that detectors of ``detector_type`` lack."""
    cls = detector_class(detector_type)
    return sorted(need for need in requires if not getattr(cls, CAPABILITIES[need], False))


def require(requires: frozenset[str], detector_type: str, who: str) -> None:
    """A ValueError naming ``who`` when ``detector_type`` lacks one of ``requires``."""
    missing = missing_capabilities(requires, detector_type)
    if missing:
        raise ValueError(
            f"{who} needs detectors with {missing}, which detector type {detector_type!r} "
            f"({detector_class(detector_type).__name__}) lacks: leave it out for this detector "
            "(the workflow does so with sroc.strategies.strategies_for)"
        )


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add ``strategy`` to :data:`STRATEGIES`; a name already taken is an error."""
    if strategy.name in STRATEGIES or strategy.name == "none":
        raise ValueError(
            f"a refinement strategy named {strategy.name!r} is already registered: choose "
            "another name"
        )
    STRATEGIES[strategy.name] = strategy
    return strategy


def get(name: str) -> Strategy:
    """The registered strategy ``name``, or a ValueError that lists the registered ones."""
    if name not in STRATEGIES:
        raise ValueError(
            f"unknown refinement strategy {name!r}; registered: {sorted(STRATEGIES)}. A plugin "
            "strategy needs its file in the config's plugins: list"
        )
    return STRATEGIES[name]


def label(name: str) -> str:
    """The label of strategy ``name`` in tables and figures (the name itself if unregistered)."""
    return STRATEGIES[name].label if name in STRATEGIES else name


def own_params(name: str, strategy_params: Mapping[str, Mapping]) -> dict:
    """Strategy ``name``'s own parameters: its registry defaults, overridden by its entry in
    ``strategy_params`` (the config's ``refinement.strategy_params``)."""
    return {**dict(get(name).params), **dict(strategy_params.get(name) or {})}


def auto_ratio_strategies() -> list[str]:
    """The single-run strategies that estimate their refinement ratio from the data and cut a
    ranking there (those with :attr:`Strategy.auto_ratio_of`)."""
    return [name for name, strategy in STRATEGIES.items() if strategy.auto_ratio_of]


def is_single_run(name: str) -> bool:
    """True for a registered single-run strategy (one run per cell, a ratio of its own)."""
    return name != "none" and get(name).kind == "single_run"


def default_strategies() -> list[str]:
    """The strategies a configuration runs when it names none: the paper's six."""
    return [name for name, strategy in STRATEGIES.items() if strategy.default]


def strategies_for(detector_type: str, strategies: Sequence[str]) -> list[str]:
    """The ``strategies`` that apply to ``detector_type`` (:meth:`Strategy.applies_to`)."""
    return [s for s in strategies if get(s).applies_to(detector_type)]


def settings_read(strategies: Sequence[str]) -> list[str]:
    """The refinement settings that ``strategies`` read, each once, in a stable order."""
    return sorted({key for name in strategies for key in get(name).settings})


def rank_job_cost(strategies: Sequence[str], model: CellCost) -> float:
    """The work of the ``rank`` job beyond the robustness curve: every ranking once, and every
    single-run strategy's run. A strategy that cuts the ranking of another in the same job
    (``auto_ratio_of``'s first) reuses it (:func:`_computed_once`): it adds its own work only."""
    seconds = 0.0
    for name in strategies:
        strategy = get(name)
        if strategy.kind == "ranked_per_ratio":
            continue
        seconds += strategy.cost(model)
        if strategy.auto_ratio_of and strategy.auto_ratio_of[0] in strategies:
            seconds -= get(strategy.auto_ratio_of[0]).cost(model)
    return seconds


def refine_job_cost(strategies: Sequence[str], model: CellCost, ratio: float) -> float:
    """The work of one ``refine`` job: a test run on the kept images for every strategy with a
    ratio curve, and the per-ratio rankings. Patch-level refits keep every image less a share of
    the patches: they are counted like an image-level refit at the same ratio."""
    kept = model.n - refinement.n_removed(model.n, ratio)
    seconds = 0.0
    for name in strategies:
        strategy = get(name)
        if strategy.kind == "ranked_per_ratio":
            seconds += strategy.cost(model)
        if strategy.has_ratio_curve:
            seconds += model.test_run(kept)
    return seconds


# --------------------------------------------------------------------------------------------
# The strategies of the paper (section 4.5) and beyond it (docs/refinement.md)


def _sroc(inputs: RankingInputs) -> refinement.Ranking:
    return refinement.sroc_ranking(
        inputs.features,
        inputs.image_ids,
        inputs.detector.factory(),
        fitted=inputs.fitted,
        tie_seed=inputs.rng_seed,
    )


def _random(inputs: RankingInputs) -> refinement.Ranking:
    return refinement.random_ranking(inputs.image_ids, inputs.rng_seed)


def _on_folds(ranking: Callable) -> Callable[[RankingInputs], refinement.Ranking]:
    """A strategy function for a fold-based ranking of sroc.refinement (cross-validation, STOC):
    ``n_folds`` folds, drawn with the cell's seed."""

    def rank(inputs: RankingInputs) -> refinement.Ranking:
        return ranking(
            inputs.features,
            inputs.image_ids,
            inputs.detector.factory(),
            inputs.settings["n_folds"],
            inputs.rng_seed,
        )

    return rank


def _by_refiner(inputs: RankingInputs) -> refinement.Ranking:
    return refinement.sroc_ranking(
        inputs.features, inputs.image_ids, inputs.refiner.factory(), tie_seed=inputs.rng_seed
    )


def _computed_once(inputs: RankingInputs, what: str, compute: Callable, *key) -> object:
    """``compute()``, or its result from earlier in this job for the same computation ``what``
    and ``key``, detector, features and seed: ``sroc_auto`` cuts ``sroc_loo``'s ranking,
    ``ensemble_auto`` reads ``ensemble_oob``'s out-of-bag scores, and a consensus member of the
    job's own detector type and parameters ranks as the job's strategy does. Every computation
    kept here is deterministic, so a result reused is the one a repeat would give."""
    detector = inputs.detector  # its name is a label: two names of one setting compute alike
    full_key = (
        what,
        detector.type,
        repr(sorted(dict(detector.params).items())),
        detector.random_state,
        detector.n_jobs,
        id(inputs.features),
        inputs.rng_seed,
        *key,
    )
    if full_key not in inputs.computed:
        inputs.computed[full_key] = compute()
    return inputs.computed[full_key]


def _leave_one_out(inputs: RankingInputs, ranking: Callable) -> refinement.Ranking:
    """``ranking`` of sroc.refinement (``sroc_ranking``, ``patch_sroc_ranking``) by the detector
    scoring each training image without it (``exclude_self``), once per job."""
    return _computed_once(
        inputs,
        ranking.__name__,
        lambda: ranking(
            inputs.features,
            inputs.image_ids,
            inputs.detector.factory(exclude_self=True),
            tie_seed=inputs.rng_seed,
        ),
    )


def _patch_sroc(inputs: RankingInputs) -> refinement.Ranking:
    return _leave_one_out(inputs, refinement.patch_sroc_ranking)


def _sroc_loo(inputs: RankingInputs) -> refinement.Ranking:
    if detector_class(inputs.detector.type).has_patch_bank:
        # patch_sroc's leave-one-image-out scoring gives these very image scores (each image's
        # highest patch score): one scoring serves both strategies.
        return replace(_patch_sroc(inputs), strategy="sroc", patch_scores=None)
    return _leave_one_out(inputs, refinement.sroc_ranking)


def _iterative_sroc(inputs: RankingInputs, ratio: float) -> refinement.Ranking:
    # The target is the refinement ratio itself: the true pollution ratio is unknown to a user.
    return refinement.iterative_sroc_ranking(
        inputs.features,
        inputs.image_ids,
        inputs.detector.factory(),
        ratio,
        inputs.settings["iterative_steps"],
        tie_seed=inputs.rng_seed,
    )


def _consensus_members(inputs: RankingInputs) -> Sequence[DetectorSpec]:
    return inputs.consensus or (inputs.detector,)


def _consensus(inputs: RankingInputs) -> refinement.Ranking:
    # Every member's ranking of every kind in consensus_rankings: a registered ranked strategy
    # run with the member as the detector and that strategy's own parameters.
    rankings = []
    for name in inputs.settings["consensus_rankings"]:
        strategy = get(name)
        params = own_params(name, inputs.settings["strategy_params"])
        for member in _consensus_members(inputs):
            require(strategy.requires, member.type, f"consensus member {member.type!r} ({name})")
            member_inputs = replace(inputs, detector=member, fitted=None, params=params)
            rankings.append(strategy.function(member_inputs))
    return refinement.consensus_ranking(rankings, inputs.image_ids, tie_seed=inputs.rng_seed)


def _consensus_cost(model: CellCost) -> float:
    return sum(
        get(name).cost(model.for_detector(member))
        for name in model.settings["consensus_rankings"]
        for member in model.consensus
    )


def _out_of_bag(inputs: RankingInputs) -> ensembles.OutOfBagScores:
    """The sparse ensembles' out-of-bag scores of the cell (``ensemble_oob_ranking``'s first
    steps), computed once per job for ``ensemble_oob``, ``ensemble_auto`` and the consensus."""
    n_members, fraction = inputs.params["n_members"], inputs.params["fraction"]

    def compute() -> ensembles.OutOfBagScores:
        n = len(inputs.image_ids)
        bags = ensembles.ensemble_bags(n, n_members, fraction, inputs.rng_seed)
        factory = inputs.detector.factory()
        return ensembles.out_of_bag_scores(inputs.features, inputs.image_ids, factory, bags)

    return _computed_once(inputs, "out of bag", compute, n_members, fraction)


def _ensemble_oob(inputs: RankingInputs) -> refinement.Ranking:
    return ensembles.out_of_bag_ranking(
        _out_of_bag(inputs), inputs.image_ids, inputs.params["aggregate"], inputs.rng_seed
    )


def _ensemble_auto(inputs: RankingInputs) -> Selection:
    # ensemble_oob's ranking, its out-of-bag scores kept for the estimate.
    n = len(inputs.image_ids)
    ranking = _ensemble_oob(inputs)
    # The contamination is read off the members' scores in the detector's units (averaged over
    # the members that did not see the image), whose healthy bulk the estimator models: rank
    # positions are bounded and near uniform, with no tail to find.
    ratio = estimate_contamination(_out_of_bag(inputs).mean())
    return Selection(ranking.order[: refinement.n_removed(n, ratio)], ratio)


def _oracle(inputs: RankingInputs) -> Selection:
    removed = np.flatnonzero(inputs.polluted)
    return Selection(removed, len(removed) / len(inputs.image_ids))


def _sroc_auto(inputs: RankingInputs) -> Selection:
    ranking = _sroc_loo(inputs)
    ratio = estimate_contamination(ranking.scores)
    return Selection(ranking.order[: refinement.n_removed(len(inputs.image_ids), ratio)], ratio)


def _folds(model: CellCost) -> int:
    return int(model.settings["n_folds"])


# The ensembles' parameters, chosen by benchmarks/ensemble_fraction.py on ../shared/data
# (docs/refinement.md): no fraction is better for every detector; 20 % is at or near the best for
# Mahalanobis and PaDiM and keeps KNN's 5 neighbours within a member on the 30-image piped sets.
ENSEMBLE_PARAMS = {"n_members": 10, "fraction": 0.2, "aggregate": "rank"}


def _check_ensemble_params(params: Mapping) -> None:
    n_members, fraction = params["n_members"], params["fraction"]
    if not isinstance(n_members, int) or isinstance(n_members, bool) or n_members < 2:
        raise ValueError(f"n_members must be an integer of at least 2, got {n_members!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise ValueError(f"fraction must be a number in (0, 1), got {fraction!r}")
    if params["aggregate"] not in ensembles.ENSEMBLE_AGGREGATES:
        raise ValueError(
            f"aggregate must be one of {list(ensembles.ENSEMBLE_AGGREGATES)}, got "
            f"{params['aggregate']!r}"
        )


def _ensemble_cost(name: str) -> Callable[[CellCost], float]:
    """B fits on round(f N) images, each scoring the N - round(f N) it did not see."""

    def cost(model: CellCost) -> float:
        params = own_params(name, model.settings.get("strategy_params") or {})
        bag = round_half_up(params["fraction"] * model.n)
        return params["n_members"] * (model.fit(bag) + model.score(bag, model.n - bag))

    return cost


register(
    Strategy(
        name="sroc",
        label="SROC",
        kind="ranked",
        function=_sroc,
        cost=lambda m: m.self_score(),  # the robustness curve's fit at p is reused
        report_outputs=("table2_refinement", "figure5_strategies", "refinement_curves"),
        in_paper=True,
        default=True,
    )
)
register(
    Strategy(
        name="random",
        label="random",
        kind="ranked",
        function=_random,
        cost=lambda m: 0.0,
        ranked_by=lambda inputs: "none",
        in_paper=True,
        default=True,
    )
)
register(
    Strategy(
        name="cross_validation",
        label="cross-validation",
        kind="ranked",
        function=_on_folds(refinement.cross_validation_ranking),
        cost=lambda m: (
            _folds(m)
            * (m.fit(m.n - m.n / _folds(m)) + m.score(m.n - m.n / _folds(m), m.n / _folds(m)))
        ),
        settings=("n_folds",),
        in_paper=True,
        default=True,
    )
)
register(
    Strategy(
        name="stoc",
        label="STOC",
        kind="ranked",
        function=_on_folds(refinement.stoc_ranking),
        cost=lambda m: _folds(m) * (m.fit(m.n / _folds(m)) + m.score(m.n / _folds(m), m.n)),
        settings=("n_folds",),
        in_paper=True,
        default=True,
    )
)
register(
    Strategy(
        name="oracle",
        label="oracle",
        kind="single_run",
        function=_oracle,
        cost=lambda m: m.test_run(m.n - m.n_polluted),
        ranked_by=lambda inputs: "none",
        in_paper=True,
        default=True,
    )
)
register(
    Strategy(
        name="by_refiner",
        label="SROC ranked by the refiner",
        kind="ranked",
        function=_by_refiner,
        cost=lambda m: m.ranking_by(m.refiner),
        ranked_by=lambda inputs: inputs.refiner.type,
        settings=("refiner", "refiner_params"),
        uses_refiner=True,
        report_outputs=("table4_refiner", "refiner_curves"),
        in_paper=True,
        default=True,
    )
)
register(
    Strategy(
        name="sroc_loo",
        label="SROC, leave-one-out",
        kind="ranked",
        function=_sroc_loo,
        cost=lambda m: m.fit(m.n) + m.self_score(),
        requires=frozenset({"exclude_self"}),
    )
)
register(
    Strategy(
        name="iterative_sroc",
        label="iterative SROC",
        kind="ranked_per_ratio",
        function=_iterative_sroc,
        # At most one fit and self-score per step, for every refinement ratio.
        cost=lambda m: int(m.settings["iterative_steps"]) * (m.fit(m.n) + m.self_score()),
        settings=("iterative_steps",),
    )
)
register(
    Strategy(
        name="consensus",
        label="consensus of detectors",
        kind="ranked",
        function=_consensus,
        cost=_consensus_cost,
        ranked_by=lambda inputs: "+".join(member.type for member in _consensus_members(inputs)),
        # strategy_params: the own parameters of the member rankings (consensus_rankings).
        settings=("consensus", "consensus_params", "consensus_rankings", "strategy_params"),
    )
)
register(
    Strategy(
        name="sroc_auto",
        label="SROC, ratio from the data",
        kind="single_run",
        function=_sroc_auto,
        # A leave-one-out ranking, then a refit, sized as at r = p.
        cost=lambda m: m.fit(m.n) + m.self_score() + m.test_run(m.n - m.n_polluted),
        requires=frozenset({"exclude_self"}),
        report_outputs=("auto_ratio",),
        auto_ratio_of=("sroc_loo", "sroc"),
    )
)
register(
    Strategy(
        name="patch_sroc",
        label="SROC, patch-level",
        kind="patch",
        function=_patch_sroc,
        cost=lambda m: m.fit(m.n) + m.self_score(),
        requires=frozenset({"exclude_self", "patch_bank"}),
    )
)
register(
    Strategy(
        name="ensemble_oob",
        label="sparse ensembles, out of bag",
        kind="ranked",
        function=_ensemble_oob,
        cost=_ensemble_cost("ensemble_oob"),
        params=dict(ENSEMBLE_PARAMS),
        check_params=_check_ensemble_params,
    )
)
register(
    Strategy(
        name="ensemble_auto",
        label="sparse ensembles, ratio from the data",
        kind="single_run",
        function=_ensemble_auto,
        # The ensemble, then a refit, sized as at r = p.
        cost=lambda m: _ensemble_cost("ensemble_auto")(m) + m.test_run(m.n - m.n_polluted),
        params=dict(ENSEMBLE_PARAMS),
        check_params=_check_ensemble_params,
        report_outputs=("auto_ratio",),
        auto_ratio_of=("ensemble_oob",),
    )
)
