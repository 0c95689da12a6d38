"""Shallow ensembles on top of an existing metatomic model.

The wrapped model's own per-atom energy :math:`e_i^0` is kept as the ensemble mean,
and member ``k`` adds a linear deviation of the last-layer features :math:`f_i`:

.. math::

    e_{ik} = e_i^0 + s\\,(\\delta w_k \\cdot f_i + \\delta b_k)

With deviations of zero mean over the members (as drawn by the last-layer Laplace
approximation, which recentres its samples), the ensemble mean is exactly the original
model's energy, composition baseline and additive terms included. Fine-tuning then
trains the deviations (heads only) or also the wrapped TorchScript module's
parameters (full) with the joint energy + force NLL.

A full fine-tune moves the wrapped model, hence the mean. With ``pin_mean``
(:py:meth:`ExtendedModel.freeze_mean`) a frozen copy of the wrapped model keeps
giving :math:`e_i^0`, and the fine-tuned copy only gives the members' deviations,
recentred on zero: the mean energy and forces stay exactly the original model's,
and the exported model runs both copies.
"""

from typing import TYPE_CHECKING, Any

import torch
from metatomic.torch import NeighborListOptions, System

from .backbones.metatomic_model import MetatomicModelBackbone, batch_to_systems
from .heads import ResidualEnsembleHead
from .kinds import (
    KindError,
    ModelKind,
    Prediction,
    check_forces_mode,
    register_kind,
    sum_per_system,
)


if TYPE_CHECKING:
    from .data import Batch, GraphDataset


@register_kind
class ExtendedModel(ModelKind):
    """An exported metatomic model extended into a shallow ensemble (kind
    ``metatomic``).

    Training, Laplace sampling, calibration and checkpoints treat it as any model
    kind; its scripted path (:py:meth:`forward`, also its exported module) takes
    metatomic systems, as the wrapped model does.

    :param backbone: the wrapped model
    :param num_members: number of heads
    """

    kind = "metatomic"
    __jit_ignored_attributes__ = ["_batched_forces"]

    def __init__(
        self,
        backbone: MetatomicModelBackbone,
        num_members: int,
        keep_mean: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.atomic_types = list(backbone.atomic_types)
        self.cutoff = float(backbone.cutoff)
        self.head = ResidualEnsembleHead(backbone.feature_size, num_members)
        self._batched_forces: bool | None = None
        for parameter in self.parameters():  # loaded TorchScript models are frozen
            parameter.requires_grad_(True)
        # the frozen copy of the wrapped model that gives the mean (freeze_mean): a
        # list of none or one module, as TorchScript has no optional submodules
        self.originals = torch.nn.ModuleList()
        if keep_mean:
            self.freeze_mean()

    def forward(self, systems: list[System]) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncalibrated per-atom member energies ``(n_atoms, n_members)``, eV, and
        the wrapped model's last-layer features ``(n_atoms, F)``."""
        features, base = self.backbone(systems)
        atomic = self.head(features, base)
        for original in self.originals:
            _, base = original(systems)
            atomic = base.unsqueeze(-1) + atomic - atomic.mean(dim=1, keepdim=True)
        return atomic, features

    @torch.jit.unused
    def freeze_mean(self) -> None:
        """Keep the current mean energy exactly from now on: a frozen copy of the
        wrapped model gives it, the trained copy only the members' deviations
        (see the module documentation)."""
        if len(self.originals) > 0:
            return
        backbone = self.backbone
        original = MetatomicModelBackbone.from_bytes(
            backbone.source, backbone.features_output, backbone.feature_size
        )
        original.load_state_dict(backbone.state_dict())
        parameter = next(backbone.parameters(), None)
        if parameter is not None:
            original.to(dtype=parameter.dtype, device=parameter.device)
        for parameter in original.parameters():
            parameter.requires_grad_(False)
        self.originals.append(original)

    @torch.jit.export
    def requested_neighbor_lists(self) -> list[NeighborListOptions]:
        return self.backbone.neighbor_options

    # ------------------------------------------------------------- the contract --
    def hypers(self) -> dict[str, Any]:
        return {
            "model_bytes": self.backbone.source,
            "features_output": self.backbone.features_output,
            "feature_size": self.backbone.feature_size,
            "num_members": self.num_members,
            "keep_mean": len(self.originals) > 0,
        }

    @classmethod
    def from_hypers(cls, hypers: dict[str, Any]) -> "ExtendedModel":
        wrapped = MetatomicModelBackbone.from_bytes(
            hypers["model_bytes"], hypers["features_output"], hypers["feature_size"]
        )
        return cls(
            wrapped, int(hypers["num_members"]), bool(hypers.get("keep_mean", False))
        )

    def exported_module(self) -> torch.nn.Module:
        return self

    def describe(self) -> str:
        return f"the metatomic model '{self.backbone.model_name}'"

    def predict(
        self,
        batch: "Batch",
        forces: str = "none",
        create_graph: bool = False,
        stress: bool = False,
    ) -> Prediction:
        """Member energies (and forces, by autograd through the wrapped model);
        stresses are not available for this kind (the exported model's engines
        compute them)."""
        check_forces_mode(forces)
        if stress:
            raise KindError(
                "the model kind 'metatomic' cannot train on or predict stresses; set "
                "`training.stress_weight: 0` or remove the stresses from the data"
            )
        positions = batch.positions
        if forces != "none":
            positions = positions.detach().requires_grad_(True)
        systems = batch_to_systems(batch, positions, self.backbone.neighbor_options)
        atomic, _ = self(systems)
        energies = sum_per_system(atomic, batch)
        member_forces = None
        if forces == "mean":
            (grad,) = torch.autograd.grad(
                energies.mean(dim=1).sum(), positions, create_graph=create_graph
            )
            member_forces = -grad.unsqueeze(0)
        elif forces == "members":
            member_forces = -self._member_gradients(energies, positions, create_graph)
        return Prediction(atomic=atomic, energies=energies, forces=member_forces)

    def _member_gradients(
        self, energies: torch.Tensor, positions: torch.Tensor, create_graph: bool
    ) -> torch.Tensor:
        """``d E_k / d positions`` for every member, ``(M, n_atoms, 3)``.

        One batched (vmapped) backward pass when the wrapped model supports it, else
        one backward pass per member.
        """
        n_members = energies.shape[1]
        if self._batched_forces is not False:
            eye = torch.eye(n_members, dtype=energies.dtype, device=energies.device)
            cotangents = eye.unsqueeze(1).expand(-1, energies.shape[0], -1)
            try:
                (grads,) = torch.autograd.grad(
                    energies,
                    positions,
                    grad_outputs=cotangents,
                    is_grads_batched=True,
                    retain_graph=True,
                    create_graph=create_graph,
                )
                self._batched_forces = True
                return grads
            except RuntimeError:  # an operation of the wrapped model has no vmap rule
                self._batched_forces = False
        member_grads: list[torch.Tensor] = []
        for k in range(n_members):
            (grad,) = torch.autograd.grad(
                energies[:, k].sum(),
                positions,
                retain_graph=True,
                create_graph=create_graph,
            )
            member_grads.append(grad)
        return torch.stack(member_grads)

    def head_design(self, batch: "Batch") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-atom ``phi_i = s (f_i, 1)`` and offsets (the base energies), float64."""
        with torch.no_grad():
            systems = batch_to_systems(
                batch, batch.positions, self.backbone.neighbor_options
            )
            features, base = self.backbone(systems)
            for original in self.originals:  # the mean's model (freeze_mean)
                _, base = original(systems)
        return self._design(features), base.double()


@torch.no_grad()
def extend_metatomic_model(
    path: str,
    train_set: "GraphDataset",
    features_output: str = "auto",
    dtype: torch.dtype = torch.float64,
    batch_size: int = 8,
) -> ExtendedModel:
    """Wrap the exported model at ``path`` as a one-member :py:class:`ExtendedModel`.

    The energy scale ``s`` of the heads is the typical per-atom error of the wrapped
    model on ``train_set`` (so that head weights are of order one).
    """
    from .data import iterate_batches

    backbone = MetatomicModelBackbone.from_file(path, features_output)
    train_types = sorted({int(z) for g in train_set.graphs for z in g.numbers})
    backbone.check_atomic_types(train_types, "the training set")
    model = ExtendedModel(backbone, 1).to(dtype)
    errors2, n_atoms = [], []
    for batch in iterate_batches(train_set, batch_size, shuffle=False):
        batch = batch.to(dtype=dtype)
        energy = model.predict(batch).energies[:, 0]
        assert batch.energy is not None, "training data have energies"
        errors2.append((batch.energy - energy).double() ** 2)
        n_atoms.append(batch.n_atoms.double())
    scale = torch.sqrt((torch.cat(errors2) / torch.cat(n_atoms)).mean())
    model.head.energy_scale.fill_(float(torch.clamp(scale, min=1e-3)))
    return model
