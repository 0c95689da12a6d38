"""Training strategies: small objects that define the loss of the one training loop.

Each strategy says how many members the model has, which forces it needs (none, the
mean's, or every member's) and how a batch's loss is computed. The loop in
:py:mod:`.trainer` is the same for all of them.
"""

from dataclasses import dataclass

import torch

from .. import losses
from ..config import TrainingConfig
from ..model import EnsembleModel


@dataclass
class LossParts:
    """A batch loss and its named, detached parts (for logs)."""

    total: torch.Tensor
    parts: dict[str, float]


class Strategy:
    """Base class: MSE on the ensemble mean (energy per atom and mean forces)."""

    name = "base"
    probabilistic = False

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config
        warmup = config.warmup_epochs
        self.warmup_epochs = config.epochs // 5 if warmup is None else warmup

    def num_members(self, requested: int) -> int:
        return requested

    def in_warmup(self, epoch: int) -> bool:
        return self.probabilistic and epoch < self.warmup_epochs

    def forces_mode(self, epoch: int) -> str:
        return "mean"

    def loss(self, model: EnsembleModel, batch, epoch: int) -> LossParts:
        mode = "mean" if self.in_warmup(epoch) else self.forces_mode(epoch)
        prediction = model.predict(batch, forces=mode, create_graph=True)
        if self.in_warmup(epoch):
            return self._mse(prediction, batch)
        return self._loss(prediction, batch)

    def _mse(self, prediction, batch) -> LossParts:
        c = self.config
        energy = prediction.energies.mean(dim=1) / batch.n_atoms
        e_loss = losses.mse(energy, batch.energy / batch.n_atoms)
        f_loss = losses.mse(prediction.forces.mean(dim=0), batch.forces)
        total = c.energy_weight * e_loss + c.forces_weight * f_loss
        return LossParts(
            total,
            {
                "energy_mse": float(e_loss.detach()),
                "forces_mse": float(f_loss.detach()),
            },
        )

    def _loss(self, prediction, batch) -> LossParts:
        return self._mse(prediction, batch)


class MseStrategy(Strategy):
    """Deterministic baseline: one head, MSE on energies and forces."""

    name = "mse"

    def num_members(self, requested: int) -> int:
        return 1


class EnergyNllStrategy(Strategy):
    """Energy-only probabilistic training (DPOSE): energy NLL + MSE on mean forces.

    Forces come from the mean energy, so no member forces are needed; the force
    uncertainty is left uncalibrated by construction (finding 2 of the reference).
    """

    name = "energy_nll"
    probabilistic = True

    def _loss(self, prediction, batch) -> LossParts:
        c = self.config
        energy_loss = losses.get_energy_loss(c.energy_loss)
        e_loss = energy_loss(prediction.energies, batch.energy, batch.n_atoms)
        f_loss = losses.mse(prediction.forces.mean(dim=0), batch.forces)
        total = c.energy_weight * e_loss + c.forces_weight * f_loss
        return LossParts(
            total,
            {
                "energy_nll": float(e_loss.detach()),
                "forces_mse": float(f_loss.detach()),
            },
        )


class EnergyForceNllStrategy(Strategy):
    """Joint energy + force NLL with every member's forces: the reference protocol."""

    name = "energy_force_nll"
    probabilistic = True

    def forces_mode(self, epoch: int) -> str:
        return "members"

    def _loss(self, prediction, batch) -> LossParts:
        c = self.config
        energy_loss = losses.get_energy_loss(c.energy_loss)
        force_loss = losses.get_force_loss(c.forces_loss)
        e_loss = energy_loss(prediction.energies, batch.energy, batch.n_atoms)
        f_loss = force_loss(prediction.forces, batch.forces)
        total = c.energy_weight * e_loss + c.forces_weight * f_loss
        return LossParts(
            total,
            {
                "energy_nll": float(e_loss.detach()),
                "forces_nll": float(f_loss.detach()),
            },
        )


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (MseStrategy, EnergyNllStrategy, EnergyForceNllStrategy)
}


def get_strategy(config: TrainingConfig) -> Strategy:
    """Strategy object for ``config.strategy``."""
    if config.strategy not in STRATEGIES:
        raise ValueError(
            f"`training.strategy` is '{config.strategy}' but must be one of: "
            f"{', '.join(STRATEGIES)}"
        )
    return STRATEGIES[config.strategy](config)
