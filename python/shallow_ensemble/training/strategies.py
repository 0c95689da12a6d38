"""Training strategies: small objects plugged into the one training loop.

A strategy says how the starting model is built (:py:meth:`Strategy.initialize`),
which parameters are trained with which learning rates, whether epochs run at all,
and how a batch's loss is computed. The loop in :py:mod:`.trainer` is the same for
all of them.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import losses
from ..config import Config, ConfigError, TrainingConfig
from ..data import Batch
from ..model import EnsembleModel, Prediction
from . import initialization
from .distributed import Workers


@dataclass
class LossParts:
    """A batch loss as its weighted energy and force terms, and named, detached
    parts (for logs).

    Both terms are means (over structures, and over atoms or force components), so
    the loss of a batch split over processes is
    ``sum_p (share_E[p] * energy[p] + share_F[p] * forces[p])`` with the shares of
    structures and atoms each process holds (see :py:meth:`weighted`).
    """

    energy: torch.Tensor
    forces: torch.Tensor
    parts: dict[str, float]

    @property
    def total(self) -> torch.Tensor:
        return self.energy + self.forces

    def weighted(self, energy_share: float, forces_share: float) -> torch.Tensor:
        """This part of a larger batch's loss, given its shares of the batch."""
        return energy_share * self.energy + forces_share * self.forces


@dataclass
class Context:
    """What :py:meth:`Strategy.initialize` may use."""

    config: Config
    datasets: dict[str, Any]
    atomic_types: list[int]
    outdir: Path
    progress: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    workers: Workers = field(default_factory=Workers)
    resume: bool = False


class Strategy:
    """Base class: fresh model, MSE on the ensemble mean (energy per atom, forces)."""

    name = "base"
    probabilistic = False
    trains = True
    #: sub-folders of OUTDIR the strategy writes (replaced with ``--overwrite``)
    subfolders: tuple[str, ...] = ()

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config
        warmup = config.warmup_epochs
        self.warmup_epochs = config.epochs // 5 if warmup is None else warmup

    # -- the starting model -------------------------------------------------------
    def num_members(self, requested: int) -> int:
        return requested

    def initialize(self, context: Context) -> EnsembleModel:
        """A fresh model with data-dependent normalisation and baseline."""
        members = self.num_members(context.config.model.num_members)
        model = initialization.build_model(
            context.config, context.atomic_types, members
        )
        initialization.init_data_dependent(model, context.datasets["train"])
        return model

    def _load_start(self, context: Context) -> EnsembleModel:
        from .checkpoints import load_model

        path = self.config.init_from
        assert path is not None, "checked by the configuration"
        model = load_model(path)
        initialization.check_compatible(model, context.atomic_types, str(path))
        return model

    # -- optimisation ---------------------------------------------------------------
    def param_groups(self, model: EnsembleModel) -> list[dict[str, Any]]:
        c = self.config
        heads = list(model.head.parameters())
        head_ids = {id(p) for p in heads}
        backbone = [p for p in model.parameters() if id(p) not in head_ids]
        heads_lr = (
            c.learning_rate if c.heads_learning_rate is None else c.heads_learning_rate
        )
        return [
            {"params": backbone, "lr": c.learning_rate},
            {"params": heads, "lr": heads_lr},
        ]

    def prepare(self, model: EnsembleModel) -> None:
        """Called once the model to train is ready (fresh or resumed)."""

    def after_step(self, model: EnsembleModel) -> None:
        """Called after every optimiser step."""

    # -- losses ---------------------------------------------------------------------
    def in_warmup(self, epoch: int) -> bool:
        return self.probabilistic and epoch < self.warmup_epochs

    def forces_mode(self, epoch: int) -> str:
        return "mean"

    def loss(self, model: EnsembleModel, batch: Batch, epoch: int) -> LossParts:
        mode = "mean" if self.in_warmup(epoch) else self.forces_mode(epoch)
        prediction = model.predict(batch, forces=mode, create_graph=True)
        if self.in_warmup(epoch):
            return self._mse(prediction, batch)
        return self._loss(prediction, batch)

    def _combine(
        self, energy: tuple[str, torch.Tensor], forces: tuple[str, torch.Tensor]
    ) -> LossParts:
        """Weighted sum of a named energy term and a named forces term."""
        c = self.config
        parts = {name: float(value.detach()) for name, value in (energy, forces)}
        return LossParts(
            c.energy_weight * energy[1], c.forces_weight * forces[1], parts
        )

    def _energy_nll(
        self, prediction: Prediction, batch: Batch
    ) -> tuple[str, torch.Tensor]:
        energy_loss = losses.get_energy_loss(self.config.energy_loss)
        return "energy_nll", energy_loss(
            prediction.energies, batch.energy, batch.n_atoms
        )

    def _forces_mse(
        self, prediction: Prediction, batch: Batch
    ) -> tuple[str, torch.Tensor]:
        assert prediction.forces is not None, "the loss asked for forces"
        return "forces_mse", losses.mse(prediction.forces.mean(dim=0), batch.forces)

    def _mse(self, prediction: Prediction, batch: Batch) -> LossParts:
        energy = prediction.energies.mean(dim=1) / batch.n_atoms
        e_loss = losses.mse(energy, batch.energy / batch.n_atoms)
        return self._combine(
            ("energy_mse", e_loss), self._forces_mse(prediction, batch)
        )

    def _loss(self, prediction: Prediction, batch: Batch) -> LossParts:
        return self._mse(prediction, batch)


class MseStrategy(Strategy):
    """Deterministic baseline: one head, MSE on energies and forces."""

    name = "mse"

    def num_members(self, requested: int) -> int:
        return 1


class EnergyNllStrategy(Strategy):
    """Energy-only probabilistic training (DPOSE): energy NLL + MSE on mean forces.

    Forces come from the mean energy, so no member forces are needed; the force
    uncertainty is not trained (finding 2 of the reference).
    """

    name = "energy_nll"
    probabilistic = True

    def _loss(self, prediction: Prediction, batch: Batch) -> LossParts:
        return self._combine(
            self._energy_nll(prediction, batch), self._forces_mse(prediction, batch)
        )


class EnergyForceNllStrategy(Strategy):
    """Joint energy + force NLL with every member's forces, from scratch."""

    name = "energy_force_nll"
    probabilistic = True

    def forces_mode(self, epoch: int) -> str:
        return "members"

    def _loss(self, prediction: Prediction, batch: Batch) -> LossParts:
        force_loss = losses.get_force_loss(self.config.forces_loss)
        f_loss = force_loss(prediction.forces, batch.forces)
        return self._combine(
            self._energy_nll(prediction, batch), ("forces_nll", f_loss)
        )


class LaplaceStrategy(Strategy):
    """Heads sampled from the last-layer Laplace posterior of a trained model."""

    name = "laplace"
    trains = False

    def initialize(self, context: Context) -> EnsembleModel:
        model = self._load_start(context)
        lp = context.config.laplace
        fit = initialization.laplace_heads(
            model,
            context.datasets["train"],
            context.datasets["valid"],
            num_members=context.config.model.num_members,
            regularizer=lp.regularizer,
            per_atom=lp.features == "atom",
            seed=self.config.seed,
            workers=context.workers,
        )
        context.info["laplace"] = {
            "regularizer": fit.regularizer,
            "alpha": fit.alpha,
            "valid_nll": fit.nll,
        }
        return model


class RandomHeadsStrategy(Strategy):
    """Heads drawn isotropically around the head of a trained model."""

    name = "random_heads"
    trains = False

    def initialize(self, context: Context) -> EnsembleModel:
        model = self._load_start(context)
        initialization.random_heads(
            model,
            context.config.model.num_members,
            self.config.random_heads_std,
            self.config.seed,
        )
        return model


class FromMetatomicStrategy(Strategy):
    """An exported metatomic model as a one-member ensemble, to extend further.

    Its energy is kept as the ensemble mean and its last-layer features carry the
    heads (:py:mod:`shallow_ensemble.extended`); ``laplace`` then samples the heads
    and ``finetune`` trains them (``strategy: protocol`` runs all three).
    """

    name = "from_metatomic"
    trains = False

    def initialize(self, context: Context) -> EnsembleModel:
        from ..extended import extend_metatomic_model

        m = context.config.model
        assert m.from_metatomic is not None, "checked by the configuration"
        return extend_metatomic_model(
            m.from_metatomic,
            context.datasets["train"],
            features_output=m.features_output,
            dtype=getattr(torch, self.config.dtype),
            batch_size=self.config.batch_size,
        )


class DeepEnsembleStrategy(Strategy):
    """``num_members`` independently initialised MSE models, stacked into one."""

    name = "deep_ensemble"
    trains = False
    subfolders = ("members",)

    def initialize(self, context: Context) -> EnsembleModel:
        """Train the members in ``OUTDIR/members/NN``; on ``resume``, every member
        continues from its own ``last.ckpt`` (a finished one is only reloaded)."""
        import dataclasses

        from .trainer import train

        config = context.config
        members = []
        start = time.perf_counter()
        for k in range(config.model.num_members):
            training = dataclasses.replace(
                config.training, strategy="mse", seed=config.training.seed + k
            )
            member_config = dataclasses.replace(config, training=training)
            folder = context.outdir / "members" / f"{k:02d}"
            resume = context.resume and (folder / "last.ckpt").exists()
            result = train(
                member_config,
                folder,
                resume=resume,
                overwrite=not resume,
                progress=context.progress,
                calibrate=False,
            )
            members.append(result.model)
        context.info["members_train_seconds"] = time.perf_counter() - start
        return initialization.stack_models(members)


class FinetuneStrategy(EnergyForceNllStrategy):
    """Joint energy + force NLL, starting from a trained ensemble.

    The recommended protocol: start from ``laplace``, ``random_heads`` or
    ``energy_nll`` and fine-tune the full model (or the heads only) briefly.
    """

    name = "finetune"

    def __init__(self, config: TrainingConfig) -> None:
        super().__init__(config)
        self.warmup_epochs = 0 if config.warmup_epochs is None else config.warmup_epochs
        self._mean_head: tuple[torch.Tensor, torch.Tensor] | None = None

    def initialize(self, context: Context) -> EnsembleModel:
        model = self._load_start(context)
        if model.num_members < 2:
            raise ConfigError(
                f"`training.init_from`: '{self.config.init_from}' has a single "
                "head: fine-tune an ensemble (from the laplace, random_heads or "
                "energy_nll strategies)"
            )
        return model

    def param_groups(self, model: EnsembleModel) -> list[dict[str, Any]]:
        groups = super().param_groups(model)
        if self.config.finetune_target == "heads":
            for parameter in groups[0]["params"]:
                parameter.requires_grad_(False)
            return groups[1:]
        return groups

    def after_step(self, model: EnsembleModel) -> None:
        if not self.config.pin_mean:
            return
        head = model.head
        with torch.no_grad():
            assert self._mean_head is not None, "prepare() sets the pinned mean"
            weight, bias = self._mean_head
            head.weight.sub_(head.weight.mean(dim=0, keepdim=True) - weight)
            head.bias.sub_(head.bias.mean() - bias)

    def prepare(self, model: EnsembleModel) -> None:
        """Record the mean head to keep fixed (``pin_mean``; on a resumed run it is
        still the pinned one)."""
        self._mean_head = (
            model.head.weight.detach().mean(dim=0, keepdim=True).clone(),
            model.head.bias.detach().mean().clone(),
        )


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        MseStrategy,
        EnergyNllStrategy,
        EnergyForceNllStrategy,
        LaplaceStrategy,
        RandomHeadsStrategy,
        FromMetatomicStrategy,
        DeepEnsembleStrategy,
        FinetuneStrategy,
    )
}


def get_strategy(config: TrainingConfig) -> Strategy:
    """Strategy object for ``config.strategy``."""
    if config.strategy not in STRATEGIES:
        raise ConfigError(
            f"`training.strategy` is '{config.strategy}' but must be one of: "
            f"{', '.join(STRATEGIES)}"
        )
    return STRATEGIES[config.strategy](config)
