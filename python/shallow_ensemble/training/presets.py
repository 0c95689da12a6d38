"""Presets: every ``training.strategy`` as a list of stages (:py:mod:`.stages`).

============================  ====================================================
``training.strategy``         stages (start / objective / trainable)
============================  ====================================================
``mse``                       fresh one-member model / mse / full
``energy_nll``                fresh / energy_nll (after an mse warm-up) / full
``energy_force_nll``          fresh / energy_force_nll (after a warm-up) / full
``laplace``                   Laplace heads on ``init_from`` / - / none
``random_heads``              random heads around ``init_from`` / - / none
``from_metatomic``            ``model.from_metatomic`` / - / none
``finetune``                  ``init_from`` / energy_force_nll / ``finetune_target``
``deep_ensemble``             ``num_members`` stages ``mse`` with seeds ``seed + k``
                              in ``members/NN``, then their stack / - / none
``protocol``                  ``1-mse`` -> ``2-laplace`` -> ``3-finetune`` (or
                              ``1-energy_nll`` -> ``2-finetune``, or
                              ``1-from_metatomic`` -> ``2-laplace`` ->
                              ``3-finetune``), see :py:func:`protocol_stages`
============================  ====================================================

A stage that starts from a trained model takes the previous stage's (the first
stage: ``training.init_from``). Single-stage presets write into the run's folder;
the stages of the others write into sub-folders (see :py:func:`.trainer.train`).
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path

from ..config import Config, ConfigError, TrainingConfig
from .stages import ObjectiveName, Stage, StartName


def _heads_rate(t: TrainingConfig) -> float:
    return t.learning_rate if t.heads_learning_rate is None else t.heads_learning_rate


def _trained(
    name: str,
    config: Config,
    objective: ObjectiveName,
    num_members: int,
    default_warmup: int,
) -> Stage:
    """A fresh model trained with the ``training`` section's epochs and rates."""
    t = config.training
    warmup = default_warmup if t.warmup_epochs is None else t.warmup_epochs
    return Stage(
        name=name,
        start="fresh",
        objective=objective,
        num_members=num_members,
        epochs=t.epochs,
        warmup_epochs=0 if objective == "mse" else warmup,
        learning_rate=t.learning_rate,
        heads_learning_rate=_heads_rate(t),
        seed=t.seed,
    )


def mse(config: Config) -> list[Stage]:
    """The deterministic baseline: one head, MSE on energies and forces."""
    return [_trained("mse", config, "mse", 1, 0)]


def energy_nll(config: Config) -> list[Stage]:
    """Energy-only probabilistic training (DPOSE): energy NLL + MSE on the mean
    forces, after a warm-up of a fifth of the epochs by default."""
    t = config.training
    members = config.model.num_members
    return [_trained("energy_nll", config, "energy_nll", members, t.epochs // 5)]


def energy_force_nll(config: Config) -> list[Stage]:
    """Joint energy + force NLL with every member's forces, from scratch, after a
    warm-up of a fifth of the epochs by default."""
    t = config.training
    members = config.model.num_members
    return [
        _trained("energy_force_nll", config, "energy_force_nll", members, t.epochs // 5)
    ]


def _new_heads(config: Config, start: StartName) -> list[Stage]:
    """One untrained stage that gives the trained model (``init_from``) new heads."""
    return [
        Stage(
            name=start,
            start=start,
            trainable="none",
            num_members=config.model.num_members,
            seed=config.training.seed,
        )
    ]


def laplace(config: Config) -> list[Stage]:
    """Heads sampled from the last-layer Laplace posterior of the trained model
    (``init_from``), recentred on its head."""
    return _new_heads(config, "laplace")


def random_heads(config: Config) -> list[Stage]:
    """Heads drawn isotropically around the head of the trained model
    (``init_from``)."""
    return _new_heads(config, "random_heads")


def from_metatomic(config: Config) -> list[Stage]:
    """An exported metatomic model as a one-member ensemble, to extend further."""
    return [
        Stage(
            name="from_metatomic",
            start="from_metatomic",
            trainable="none",
            seed=config.training.seed,
        )
    ]


def finetune(config: Config) -> list[Stage]:
    """Joint energy + force NLL, starting from the trained ensemble ``init_from``
    (no warm-up by default)."""
    t = config.training
    return [
        Stage(
            name="finetune",
            start="checkpoint",
            objective="energy_force_nll",
            trainable=t.finetune_target,
            num_members=config.model.num_members,
            epochs=t.epochs,
            warmup_epochs=0 if t.warmup_epochs is None else t.warmup_epochs,
            learning_rate=t.learning_rate,
            heads_learning_rate=_heads_rate(t),
            pin_mean=t.pin_mean,
            seed=t.seed,
        )
    ]


def deep_ensemble(config: Config) -> list[Stage]:
    """``model.num_members`` independent ``mse`` models (seeds ``seed + k``, in
    ``members/NN``, not calibrated), then their stack as one ensemble."""
    t = config.training
    members = [
        dataclasses.replace(
            mse(config)[0], seed=t.seed + k, folder=f"members/{k:02d}", calibrate=False
        )
        for k in range(config.model.num_members)
    ]
    stack = Stage(
        name="deep_ensemble",
        start="stack",
        trainable="none",
        num_members=config.model.num_members,
        seed=t.seed,
    )
    return [*members, stack]


def protocol_stages(config: Config) -> list[Stage]:
    """The recommended protocol: a cheap ensemble, then a short fine-tune.

    ``mse`` training -> Laplace sampling of the heads -> fine-tune of the full
    model (``protocol.finetune_target``) with the joint energy + force NLL, each
    calibrated; or ``energy_nll`` -> fine-tune (``protocol.first``); with
    ``model.from_metatomic``, the exported model replaces the ``mse`` stage. The
    first stage uses the ``training`` section; the fine-tune has no warm-up and
    its own epochs and learning rate (``protocol.*``). Stage ``n`` writes
    ``OUTDIR/<n>-<name>/``.
    """
    p = config.protocol
    if config.model.from_metatomic is not None:
        stages = from_metatomic(config)
    else:
        stages = PRESETS[p.first](config)
    if stages[0].name in ("mse", "from_metatomic"):
        stages += laplace(config)
    (tuned,) = finetune(config)
    stages.append(
        dataclasses.replace(
            tuned,
            trainable=p.finetune_target,
            epochs=p.finetune_epochs,
            warmup_epochs=0,
            learning_rate=p.finetune_learning_rate,
            heads_learning_rate=p.finetune_learning_rate,
        )
    )
    return [
        dataclasses.replace(stage, folder=f"{n}-{stage.name}")
        for n, stage in enumerate(stages, 1)
    ]


PRESETS: dict[str, Callable[[Config], list[Stage]]] = {
    "mse": mse,
    "energy_nll": energy_nll,
    "energy_force_nll": energy_force_nll,
    "laplace": laplace,
    "random_heads": random_heads,
    "from_metatomic": from_metatomic,
    "deep_ensemble": deep_ensemble,
    "finetune": finetune,
    "protocol": protocol_stages,
}
"""Every ``training.strategy`` (:py:data:`shallow_ensemble.config.StrategyName`):
a function of the configuration giving its stages."""


def preset_stages(config: Config) -> list[Stage]:
    """The stages of ``config.training.strategy``."""
    strategy = config.training.strategy
    if strategy not in PRESETS:
        raise ConfigError(
            f"`training.strategy` is '{strategy}' but must be one of: "
            f"{', '.join(PRESETS)}"
        )
    return PRESETS[strategy](config)


def stage_subfolders(stages: list[Stage]) -> tuple[str, ...]:
    """The sub-folders of the run's folder that the stages write (removed by
    ``--overwrite``)."""
    names = [Path(s.folder).parts[0] for s in stages if s.folder != "."]
    return tuple(dict.fromkeys(names))
