"""Training stages: where a model comes from, what trains, and on which loss.

A *stage* is one pass of the training loop (:py:func:`.trainer.train`) in a folder
of its own. It is made of

- a **start**, how its model is obtained:

  - ``fresh``: a new model of ``config.model`` (descriptor normalisation, composition
    baseline and energy scale fitted on the training set);
  - ``checkpoint``: the model of the previous stage (``training.init_from`` for the
    first stage);
  - ``laplace``: that model, its heads replaced by samples of its last-layer Laplace
    posterior (``config.laplace``);
  - ``random_heads``: that model, its heads drawn isotropically around its head
    (``training.random_heads_std``);
  - ``from_metatomic``: the exported model ``model.from_metatomic`` as a one-member
    ensemble whose mean stays its energy;
  - ``stack``: the models of the previous stages as the members of one ensemble;

- an **objective**, the loss of a batch (weighted by ``training.energy_weight``,
  ``training.forces_weight`` and, on frames with a stress,
  ``training.stress_weight``):

  - ``mse``: MSE of the ensemble mean's per-atom energies and forces;
  - ``energy_nll``: ``training.energy_loss`` (Gaussian NLL or CRPS) of the per-atom
    energies and MSE of the mean forces (no member forces needed);
  - ``energy_force_nll``: ``training.energy_loss`` and ``training.forces_loss`` of
    the member forces;

  a probabilistic objective starts with ``warmup_epochs`` of ``mse``;

- a **trainable** set: ``full`` (backbone and heads), ``heads``, or ``none`` (no
  epochs: the start is the stage's model), optionally with the mean head pinned
  (``pin_mean``);

- the numbers of the run: epochs, learning rates, seed, and whether the result is
  calibrated.

A preset (:py:mod:`.presets`) is a list of stages; every ``training.strategy`` is
one. Stages are plain data: :py:class:`Objective` is what the loop optimises in a
stage, :py:func:`start_model` builds its model.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .. import losses
from ..config import Config, ConfigError, TrainingConfig
from ..data import Batch, GraphDataset
from ..kinds import ModelKind, Prediction
from . import initialization
from .distributed import Workers


StartName = Literal[
    "fresh", "checkpoint", "laplace", "random_heads", "from_metatomic", "stack"
]
ObjectiveName = Literal["mse", "energy_nll", "energy_force_nll"]
TrainableSet = Literal["full", "heads", "none"]

#: starts that build on one trained model: the previous stage's, or ``init_from``
BUILDS_ON_A_MODEL: tuple[StartName, ...] = ("checkpoint", "laplace", "random_heads")


@dataclass(frozen=True)
class Stage:
    """One run of the training loop; see the module documentation.

    :param name: what the stage is called (the ``strategy`` of its
        ``metrics.json``, the progress bar, its key in a preset's summary)
    :param start: how the model is obtained
    :param objective: the loss
    :param trainable: the parameters the optimiser moves (``none``: no epochs)
    :param num_members: members of a ``fresh``, ``laplace`` or ``random_heads``
        start (the other starts keep the count of the models they start from)
    :param epochs: epochs of the loop (0 when nothing trains)
    :param warmup_epochs: first epochs of ``mse`` before a probabilistic objective
    :param learning_rate: initial rate of the backbone
    :param heads_learning_rate: initial rate of the heads
    :param pin_mean: keep the mean head fixed while the members spread
    :param seed: seed of the start and of the shuffling
    :param folder: where the stage writes, relative to the run's folder (``.``:
        the run's folder itself)
    :param calibrate: fit the calibration factors at the end (if the
        configuration enables calibration)
    """

    name: str
    start: StartName
    objective: ObjectiveName = "mse"
    trainable: TrainableSet = "full"
    num_members: int = 1
    epochs: int = 0
    warmup_epochs: int = 0
    learning_rate: float = 0.0
    heads_learning_rate: float = 0.0
    pin_mean: bool = False
    seed: int = 0
    folder: str = "."
    calibrate: bool = True

    def __post_init__(self) -> None:
        if self.trains and self.epochs < 1:
            raise ValueError(f"stage '{self.name}' trains but has no epochs")
        if not self.trains and self.epochs != 0:
            raise ValueError(f"stage '{self.name}' trains nothing but has epochs")

    @property
    def trains(self) -> bool:
        """Whether the stage runs epochs of the training loop."""
        return self.trainable != "none"

    @property
    def probabilistic(self) -> bool:
        """Whether the objective trains the ensemble's spread."""
        return self.objective != "mse"

    def to_dict(self) -> dict[str, Any]:
        """The stage as stored in its checkpoints (and compared on resume)."""
        return dataclasses.asdict(self)


def loss_term(name: str) -> str:
    """The short name of a loss in logs: ``gaussian_crps_ensemble`` -> ``crps``,
    ``gaussian_nll_full_ensemble`` -> ``nll_full``."""
    return name.removeprefix("gaussian_").removesuffix("_ensemble")


@dataclass
class LossParts:
    """A batch loss as its weighted per-structure terms (energy, and stress where
    the data have it) and force terms, and named, detached parts (for logs).

    Both terms are means (over structures, and over atoms or force components), so
    the loss of a batch split over processes is
    ``sum_p (share_E[p] * per_structure[p] + share_F[p] * forces[p])`` with the
    shares of structures and atoms each process holds (see :py:meth:`weighted`).
    """

    per_structure: torch.Tensor
    forces: torch.Tensor
    parts: dict[str, torch.Tensor]

    @property
    def total(self) -> torch.Tensor:
        return self.per_structure + self.forces

    def weighted(self, energy_share: float, forces_share: float) -> torch.Tensor:
        """This part of a larger batch's loss, given its shares of the batch
        (of structures for the per-structure terms, of atoms for the forces)."""
        return energy_share * self.per_structure + forces_share * self.forces


class Objective:
    """What the loop optimises in one stage: the loss of a batch, the parameters
    it trains with their learning rates, and the pinned mean head.

    :param stage: the stage
    :param training: the loss names and weights (``training.energy_loss``, ...)
    """

    def __init__(self, stage: Stage, training: TrainingConfig) -> None:
        self.stage = stage
        self.training = training
        self._mean_head: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- optimisation ---------------------------------------------------------------
    def param_groups(self, model: ModelKind) -> list[dict[str, Any]]:
        """The backbone and the heads with their learning rates (the heads only,
        the backbone frozen, for a ``heads`` trainable set)."""
        heads = list(model.head.parameters())
        head_ids = {id(p) for p in heads}
        # parameters frozen by the model itself (freeze_mean's copy) are left out
        backbone = [
            p for p in model.parameters() if id(p) not in head_ids and p.requires_grad
        ]
        groups = [
            {"params": backbone, "lr": self.stage.learning_rate},
            {"params": heads, "lr": self.stage.heads_learning_rate},
        ]
        if self.stage.trainable == "heads":
            for parameter in backbone:
                parameter.requires_grad_(False)
            return groups[1:]
        return groups

    def prepare(self, model: ModelKind) -> None:
        """Called once the model to train is ready (fresh or resumed): records the
        mean head to keep fixed (``pin_mean``; on a resumed run it is still the
        pinned one)."""
        if not self.stage.pin_mean:
            return
        self._mean_head = (
            model.head.weight.detach().mean(dim=0, keepdim=True).clone(),
            model.head.bias.detach().mean().clone(),
        )

    def after_step(self, model: ModelKind) -> None:
        """Called after every optimiser step: moves the heads back to the pinned
        mean (``pin_mean``)."""
        if not self.stage.pin_mean:
            return
        head = model.head
        with torch.no_grad():
            assert self._mean_head is not None, "prepare() sets the pinned mean"
            weight, bias = self._mean_head
            head.weight.sub_(head.weight.mean(dim=0, keepdim=True) - weight)
            head.bias.sub_(head.bias.mean() - bias)

    # -- losses ---------------------------------------------------------------------
    def in_warmup(self, epoch: int) -> bool:
        """Whether ``epoch`` (from 0) trains the MSE warm-up."""
        return self.stage.probabilistic and epoch < self.stage.warmup_epochs

    def loss(
        self, model: ModelKind, batch: Batch, epoch: int, z2: bool = False
    ) -> LossParts:
        """The loss of ``batch`` at ``epoch`` (the warm-up's MSE, or the
        objective's); ``z2``: also the mean squared z-scores of its Gaussian NLL
        terms (parts ``energy_z2``, ``forces_z2``; see :py:meth:`selection_score`)."""
        warmup = self.in_warmup(epoch)
        members = self.stage.objective == "energy_force_nll" and not warmup
        stress = batch.stress is not None and self.training.stress_weight > 0
        prediction = model.predict(
            batch,
            forces="members" if members else "mean",
            create_graph=True,
            stress=stress,
        )
        if warmup or self.stage.objective == "mse":
            return self._mse(prediction, batch)
        energy = self._energy_term(prediction, batch)
        if self.stage.objective == "energy_nll":
            result = self._combine(
                energy,
                self._forces_mse(prediction, batch),
                self._stress_term("mse", prediction, batch),
            )
        else:
            name = self.training.forces_loss
            assert prediction.forces is not None, "the loss asked for forces"
            forces = losses.get_force_loss(name)(prediction.forces, batch.forces)
            result = self._combine(
                energy,
                (f"forces_{loss_term(name)}", forces),
                self._stress_term(name, prediction, batch),
            )
        if z2:
            result.parts.update(self._z2(prediction, batch))
        return result

    def _z2(self, prediction: Prediction, batch: Batch) -> dict[str, torch.Tensor]:
        """Mean squared z-scores of the Gaussian NLL terms of a probabilistic loss."""
        parts: dict[str, torch.Tensor] = {}
        gaussian = "gaussian_nll_ensemble"
        with torch.no_grad():
            if self.training.energy_loss == gaussian:
                assert batch.energy is not None, "training data have energies"
                parts["energy_z2"] = losses.energy_mean_squared_z(
                    prediction.energies.detach(), batch.energy, batch.n_atoms
                )
            trains_forces = self.stage.objective == "energy_force_nll"
            if trains_forces and self.training.forces_loss == gaussian:
                assert prediction.forces is not None and batch.forces is not None
                parts["forces_z2"] = losses.force_mean_squared_z(
                    prediction.forces.detach(), batch.forces
                )
        return parts

    def selection_score(
        self, loss: float, parts: dict[str, float], epoch: int
    ) -> float:
        r"""What the best epoch minimises: the validation ``loss``, or with
        ``training.select_epoch: calibrated_nll`` the loss with each Gaussian NLL
        term at its calibrated value: the term minus
        :math:`\frac{1}{2} (z^2 - 1 - \log z^2)`, its NLL after the global factor
        that the calibration fits (``parts``: the validation parts of
        :py:meth:`loss` with ``z2``). An ensemble that is right but globally too
        confident scores what it will score once calibrated."""
        if self.training.select_epoch == "loss" or self.in_warmup(epoch):
            return loss
        weights = {"energy": self.training.energy_weight}
        weights["forces"] = self.training.forces_weight
        score = loss
        for name, weight in weights.items():
            z2 = parts.get(f"{name}_z2")
            if z2 is not None and z2 > 0 and math.isfinite(z2):
                score -= weight * 0.5 * (z2 - 1.0 - math.log(z2))
        return score

    def _combine(
        self,
        energy: tuple[str, torch.Tensor],
        forces: tuple[str, torch.Tensor],
        stress: tuple[str, torch.Tensor] | None = None,
    ) -> LossParts:
        """Weighted sum of named energy, forces (and stress) terms; the stress term
        is a mean over structures, so it joins the energy term (see
        :py:meth:`LossParts.weighted`)."""
        t = self.training
        terms = [energy, forces] if stress is None else [energy, forces, stress]
        # detached, on the loss's device: no host synchronisation in a step
        parts = {name: value.detach() for name, value in terms}
        per_structure = t.energy_weight * energy[1]
        if stress is not None:
            per_structure = per_structure + t.stress_weight * stress[1]
        return LossParts(per_structure, t.forces_weight * forces[1], parts)

    def _stress_term(
        self, name: str, prediction: Prediction, batch: Batch
    ) -> tuple[str, torch.Tensor] | None:
        """The stress loss ``name`` (``mse`` of the mean, or a forces loss's kind
        on the members), if the batch has stresses to train on."""
        if prediction.stress is None:
            return None
        assert batch.stress is not None and batch.stress_mask is not None
        assert batch.cell is not None, "batches from collate have cells"
        value = losses.stress_loss(
            name,
            prediction.stress,
            batch.stress,
            batch.stress_mask,
            batch.cell,
            batch.n_atoms,
        )
        term = "mse" if name == "mse" else loss_term(name).removesuffix("_full")
        return f"stress_{term}", value

    def _energy_term(
        self, prediction: Prediction, batch: Batch
    ) -> tuple[str, torch.Tensor]:
        name = self.training.energy_loss
        value = losses.get_energy_loss(name)(
            prediction.energies, batch.energy, batch.n_atoms
        )
        return f"energy_{loss_term(name)}", value

    def _forces_mse(
        self, prediction: Prediction, batch: Batch
    ) -> tuple[str, torch.Tensor]:
        assert prediction.forces is not None, "the loss asked for forces"
        assert batch.forces is not None, "training data have forces"
        return "forces_mse", losses.mse(prediction.forces.mean(dim=0), batch.forces)

    def _mse(self, prediction: Prediction, batch: Batch) -> LossParts:
        assert batch.energy is not None, "training data have energies"
        energy = prediction.energies.mean(dim=1) / batch.n_atoms
        e_loss = losses.mse(energy, batch.energy / batch.n_atoms)
        return self._combine(
            ("energy_mse", e_loss),
            self._forces_mse(prediction, batch),
            self._stress_term("mse", prediction, batch),
        )


# --------------------------------------------------------------------- starts --
@dataclass
class Context:
    """What a stage's start may use.

    :param source: the trained model a ``checkpoint``, ``laplace`` or
        ``random_heads`` start builds on
    :param previous: the models (``model.ckpt``) of the earlier stages of the run
    :param info: what the start reports (kept in the stage's ``metrics.json``)
    :param inherited_seconds: training time of earlier stages that the stage's
        cost includes (the members of a ``stack``)
    """

    config: Config
    stage: Stage
    datasets: dict[str, GraphDataset]
    atomic_types: list[int]
    outdir: Path
    progress: bool = True
    workers: Workers = field(default_factory=Workers)
    source: str | Path | None = None
    previous: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    inherited_seconds: float = 0.0


def start_model(context: Context) -> ModelKind:
    """The model a stage starts from (see the module documentation)."""
    stage, config = context.stage, context.config
    if stage.start == "fresh":
        model = initialization.build_model(
            config, context.atomic_types, stage.num_members
        )
        initialization.init_data_dependent(model, context.datasets["train"])
        return model
    if stage.start == "from_metatomic":
        return _from_metatomic(context)
    if stage.start == "stack":
        return _stack(context)
    model = _load_source(context)
    if stage.pin_mean and stage.trainable == "full":
        model.freeze_mean()
    if stage.start == "laplace":
        lp = config.laplace
        fit = initialization.laplace_heads(
            model,
            context.datasets["train"],
            context.datasets["valid"],
            num_members=stage.num_members,
            regularizer=lp.regularizer,
            per_atom=lp.features == "atom",
            seed=stage.seed,
            workers=context.workers,
        )
        context.info["laplace"] = {
            "regularizer": fit.regularizer,
            "alpha": fit.alpha,
            "valid_nll": fit.nll,
        }
    elif stage.start == "random_heads":
        initialization.random_heads(
            model,
            stage.num_members,
            config.training.random_heads_std,
            stage.seed,
        )
    elif stage.probabilistic and model.num_members < 2:
        raise ConfigError(
            f"`training.init_from`: '{context.source}' has a single head: "
            "fine-tune an ensemble (from the laplace, random_heads or energy_nll "
            "strategies)"
        )
    return model


def _load_source(context: Context) -> ModelKind:
    from .checkpoints import load_model

    assert context.source is not None, "checked by the configuration"
    model = load_model(context.source)
    initialization.check_compatible(model, context.atomic_types, str(context.source))
    return model


def _from_metatomic(context: Context) -> ModelKind:
    from ..extended import extend_metatomic_model

    m, t = context.config.model, context.config.training
    assert m.from_metatomic is not None, "checked by the configuration"
    return extend_metatomic_model(
        m.from_metatomic,
        context.datasets["train"],
        features_output=m.features_output,
        dtype=getattr(torch, t.dtype),
        batch_size=t.batch_size,
    )


def _stack(context: Context) -> ModelKind:
    """The models of the earlier stages as one ensemble (a deep ensemble); its
    cost includes their training."""
    from .checkpoints import model_from_checkpoint, read_checkpoint

    if not context.previous:
        raise ValueError(f"stage '{context.stage.name}' has no models to stack")
    members = [read_checkpoint(p) for p in context.previous]
    seconds = sum(member["train_seconds"] for member in members)
    context.info["members_train_seconds"] = seconds
    context.inherited_seconds = seconds
    return initialization.stack_models([model_from_checkpoint(m) for m in members])
