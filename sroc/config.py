"""The workflow's configuration in the library: defaults, cross-key checks and the detector specs.

The JSON schema (workflow/schemas/config.schema.yaml) checks each key's type and range; this
module holds what the schema cannot express: the defaults of the ``refinement:`` section (its
default strategies come from the strategy registry), the checks across keys (a pollution ratio the
pollution set can supply, detector parameters each class accepts, strategies and detector types
that are registered) and how a config entry becomes a :class:`DetectorSpec`. The workflow
(workflow/rules/common.smk) and benchmarks/fit_cost.py both read the configuration through it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sroc import strategies
from sroc.detectors import BaseDetector, detector_class, make_detector, validate_params
from sroc.plugins import load_plugins


@dataclass(frozen=True)
class DetectorSpec:
    """A detector type with its hyper-parameters, and how it runs: ``name`` is the config
    entry's (several entries may share a type), ``n_jobs`` its threads."""

    type: str
    params: Mapping = field(default_factory=dict)
    random_state: int = 0
    n_jobs: int = 1
    name: str = ""

    def factory(self, **overrides) -> Callable[[], BaseDetector]:
        """A zero-argument callable returning a fresh, unfitted detector (``overrides`` replace
        hyper-parameters, e.g. ``exclude_self=True`` for leave-one-out self-scoring)."""
        params = {**dict(self.params), **overrides}
        return lambda: make_detector(
            self.type, random_state=self.random_state, n_jobs=self.n_jobs, **params
        )


def refinement_defaults() -> dict:
    """The ``refinement:`` section's defaults: the paper's protocol (section 4.5, Appendix B)."""
    return {
        "pollution_ratio": 0.2,
        "ratios": [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8],
        "strategies": strategies.default_strategies(),
        "n_folds": 5,
        "refiner": "mahalanobis",
        "refiner_params": {},
        "iterative_steps": 3,
        "consensus": ["knn", "mahalanobis", "padim"],
        "consensus_params": {},
        "consensus_rankings": ["sroc_loo"],
        "strategy_params": {},
    }


def refinement_settings(config: Mapping) -> dict:
    """The ``refinement:`` section of ``config`` over :func:`refinement_defaults`."""
    return {**refinement_defaults(), **(config.get("refinement") or {})}


def detector_specs(config: Mapping) -> list[DetectorSpec]:
    """The config's ``detectors:`` entries, each on its configured threads."""
    random_state = int(config.get("random_state", 0))
    return [
        DetectorSpec(
            type=str(entry["type"]),
            params=dict(entry.get("params") or {}),
            random_state=random_state,
            n_jobs=int(entry.get("threads", 1)),
            name=str(entry["name"]),
        )
        for entry in config.get("detectors") or []
    ]


def refiner_spec(config: Mapping) -> DetectorSpec:
    """The detector that ranks for ``by_refiner``, with ``refinement.refiner_params``."""
    settings = refinement_settings(config)
    return DetectorSpec(
        type=settings["refiner"],
        params=dict(settings["refiner_params"]),
        random_state=int(config.get("random_state", 0)),
        name="refiner",
    )


def consensus_specs(config: Mapping) -> list[DetectorSpec]:
    """The consensus members, each with its ``refinement.consensus_params`` entry."""
    settings = refinement_settings(config)
    return [
        DetectorSpec(
            type=member,
            params=dict(settings["consensus_params"].get(member) or {}),
            random_state=int(config.get("random_state", 0)),
            name=member,
        )
        for member in settings["consensus"]
    ]


def layered(base: Mapping, overlay: Mapping) -> dict:
    """``overlay`` over ``base`` as Snakemake's ``--configfile`` layers config files: mappings
    merged key by key, lists and values replaced."""
    out = dict(base)
    for key, value in overlay.items():
        both_mappings = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = layered(out[key], value) if both_mappings else value
    return out


def read_layered(paths: Sequence[str | Path]) -> dict:
    """The config files ``paths``, each later one layered over the earlier ones (:func:`layered`),
    as ``snakemake --configfile A B`` layers them over the workflow's config."""
    config: dict = {}
    for path in paths:
        config = layered(config, yaml.safe_load(Path(path).read_text()) or {})
    return config


def strategy_params(config: Mapping, name: str) -> dict:
    """Strategy ``name``'s own parameters: its registry defaults, overridden by
    ``refinement.strategy_params.<name>``."""
    return strategies.own_params(name, refinement_settings(config)["strategy_params"])


def load_config_plugins(config: Mapping) -> None:
    """Import the plugin files the config's ``plugins:`` list names (strategies, detectors)."""
    load_plugins(config.get("plugins") or [])


def validate_config(config: Mapping) -> None:
    """The checks across keys that the schema cannot express; a ValueError names the key, the
    value and the fix. Load the config's plugins first (:func:`load_config_plugins`)."""
    names = [entry["name"] for entry in config.get("detectors") or []]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"config detectors: the name(s) {repeated} appear twice; give each detector a "
            "unique name"
        )
    for position, entry in enumerate(config.get("detectors") or []):
        validate_params(
            entry["type"],
            entry.get("params") or {},
            f"config detectors[{position}] ({entry['name']})",
        )
    settings = refinement_settings(config)
    validate_params(
        settings["refiner"], settings["refiner_params"], "config refinement.refiner_params"
    )
    for member in settings["consensus"]:
        detector_class_named(member, "config refinement.consensus")
    for member, params in settings["consensus_params"].items():
        if params is None:  # cleared by a layered config file
            continue
        if member not in settings["consensus"]:
            raise ValueError(
                f"config refinement.consensus_params names {member!r}, which is not in "
                f"refinement.consensus {settings['consensus']}: add it there or remove its "
                "parameters"
            )
        validate_params(member, params, f"config refinement.consensus_params.{member}")
    _validate_strategies(settings)
    _validate_pollution(config, settings)


def detector_class_named(detector_type: str, where: str) -> type[BaseDetector]:
    """The class of ``detector_type``, or a ValueError naming the config key ``where``."""
    try:
        return detector_class(detector_type)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _validate_strategies(settings: Mapping) -> None:
    for name in settings["strategies"]:
        try:
            strategies.get(name)
        except ValueError as error:
            raise ValueError(f"config refinement.strategies: {error}") from None
    for name, params in settings["strategy_params"].items():
        try:
            known = strategies.get(name).params
        except ValueError as error:
            raise ValueError(f"config refinement.strategy_params: {error}") from None
        unknown = sorted(set(params or {}) - set(known))
        if unknown:
            raise ValueError(
                f"config refinement.strategy_params.{name}: strategy {name!r} has no "
                f"parameter(s) {unknown}; its parameters: {sorted(known)}"
            )
    for name in settings["strategies"]:
        try:
            strategies.get(name).check_params(
                strategies.own_params(name, settings["strategy_params"])
            )
        except ValueError as error:
            raise ValueError(f"config refinement.strategy_params.{name}: {error}") from None
    _validate_consensus_rankings(settings)
    _validate_auto_ratio_params(settings)


def _validate_consensus_rankings(settings: Mapping) -> None:
    """Each of ``consensus_rankings`` a registered ranked strategy that every consensus member
    can run."""
    for name in settings["consensus_rankings"]:
        try:
            strategy = strategies.get(name)
        except ValueError as error:
            raise ValueError(f"config refinement.consensus_rankings: {error}") from None
        if strategy.kind != "ranked" or name == "consensus":
            raise ValueError(
                f"config refinement.consensus_rankings names {name!r}, a strategy of kind "
                f"{strategy.kind!r}: a consensus averages rankings computed once per cell, "
                "name strategies of kind 'ranked' other than consensus (e.g. sroc_loo, "
                "ensemble_oob)"
            )
        if "consensus" not in settings["strategies"]:
            continue
        try:
            strategy.check_params(strategies.own_params(name, settings["strategy_params"]))
        except ValueError as error:
            raise ValueError(f"config refinement.strategy_params.{name}: {error}") from None
        for member in settings["consensus"]:
            strategies.require(
                strategy.requires,
                member,
                f"config refinement.consensus ({member}) with consensus_rankings {name!r}",
            )


def _validate_auto_ratio_params(settings: Mapping) -> None:
    """A strategy that estimates its ratio and the ranking it is held against, both run, rank
    with the same parameters: else the auto_ratio table compares two different rankings."""
    chosen = settings["strategies"]
    for name in strategies.auto_ratio_strategies():
        counterpart = strategies.get(name).auto_ratio_of[0]
        if name not in chosen or counterpart not in chosen:
            continue
        own = strategies.own_params(name, settings["strategy_params"])
        theirs = strategies.own_params(counterpart, settings["strategy_params"])
        if own != theirs:
            raise ValueError(
                f"config refinement.strategy_params: {name} ranks with {own} but "
                f"{counterpart}, which the auto_ratio table holds it against, with {theirs}: "
                f"give strategy_params.{name} and strategy_params.{counterpart} the same values"
            )


def _validate_pollution(config: Mapping, settings: Mapping) -> None:
    pollution = config["pollution"]
    if settings["strategies"] and settings["pollution_ratio"] > pollution["set_fraction"] + 1e-9:
        raise ValueError(
            f"config refinement.pollution_ratio is {settings['pollution_ratio']}, above "
            f"pollution.set_fraction {pollution['set_fraction']}: the pollution set cannot "
            "supply it; lower it or raise set_fraction"
        )
    if max(pollution["ratios"]) > pollution["set_fraction"] + 1e-9:
        raise ValueError(
            f"config pollution.ratios reaches {max(pollution['ratios'])}, above "
            f"pollution.set_fraction {pollution['set_fraction']}: the pollution set cannot "
            "supply it; lower the ratio or raise set_fraction"
        )
