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
"""

import torch
from metatomic.torch import System

from .backbones.metatomic_model import MetatomicModelBackbone, batch_to_systems
from .heads import ShallowEnsembleHead
from .kinds import register_kind
from .model import EnsembleModel, Prediction


class ResidualEnsembleHead(ShallowEnsembleHead):
    """Member deviations added to a base per-atom energy.

    ``e_ik = base_i + s (w_k . f_i + b_k)``; the weights start at zero (a single
    member equal to the base model). The composition baseline is not used: the base
    energy already contains the wrapped model's own baseline.
    """

    def __init__(self, feature_size: int, num_members: int, n_types: int) -> None:
        super().__init__(feature_size, num_members, n_types)
        with torch.no_grad():
            self.weight.zero_()

    def forward(self, features: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Per-atom member energies ``(n_atoms, n_members)`` from features and base
        energies ``(n_atoms,)``."""
        deltas = self.energy_scale * (features @ self.weight.T + self.bias)
        return base.unsqueeze(-1) + deltas


@register_kind
class ExtendedModel(EnsembleModel):
    """An exported metatomic model extended into a shallow ensemble.

    Training, Laplace sampling, calibration and checkpoints treat it as any
    :py:class:`~shallow_ensemble.model.EnsembleModel`; the scripted path
    (:py:meth:`forward`) takes metatomic systems, as the wrapped model does.

    :param backbone: the wrapped model
    :param num_members: number of heads
    :param feature_size: size of the wrapped model's last-layer features
    """

    kind = "metatomic"
    __jit_ignored_attributes__ = ["_batched_forces"]

    def __init__(
        self, backbone: MetatomicModelBackbone, num_members: int, feature_size: int
    ) -> None:
        backbone.feature_size = int(feature_size)
        super().__init__(backbone, num_members)  # type: ignore[arg-type]
        self.head = ResidualEnsembleHead(
            int(feature_size), num_members, len(self.atomic_types)
        )
        self._batched_forces: bool | None = None
        for parameter in self.parameters():  # loaded TorchScript models are frozen
            parameter.requires_grad_(True)

    def forward(self, systems: list[System]) -> torch.Tensor:  # type: ignore[override]
        """Uncalibrated per-atom member energies ``(n_atoms, n_members)``, eV."""
        features, base = self.backbone(systems)
        return self.head(features, base)

    @torch.jit.unused
    def predict(
        self, batch, forces: str = "none", create_graph: bool = False
    ) -> Prediction:
        """Member energies (and forces, by autograd through the wrapped model)."""
        if forces not in ("none", "mean", "members"):
            raise ValueError(
                f"`forces` is '{forces}' but must be 'none', 'mean' or 'members'"
            )
        positions = batch.positions
        if forces != "none":
            positions = positions.detach().requires_grad_(True)
        systems = batch_to_systems(batch, positions, self.backbone.neighbor_options)
        atomic = self(systems)
        energies = torch.zeros(
            (batch.n_systems, atomic.shape[1]), dtype=atomic.dtype, device=atomic.device
        ).index_add(0, batch.system_index, atomic)
        member_forces = None
        if forces == "mean":
            (grad,) = torch.autograd.grad(
                energies.mean(dim=1).sum(), positions, create_graph=create_graph
            )
            member_forces = -grad.unsqueeze(0)
        elif forces == "members":
            member_forces = -self._member_gradients(energies, positions, create_graph)
        return Prediction(atomic=atomic, energies=energies, forces=member_forces)

    @torch.jit.unused
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
        grads = []
        for k in range(n_members):
            (grad,) = torch.autograd.grad(
                energies[:, k].sum(),
                positions,
                retain_graph=True,
                create_graph=create_graph,
            )
            grads.append(grad)
        return torch.stack(grads)

    @torch.jit.unused
    def head_design(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-atom ``phi_i = s (f_i, 1)`` and offsets (the base energies), float64."""
        with torch.no_grad():
            systems = batch_to_systems(
                batch, batch.positions, self.backbone.neighbor_options
            )
            features, base = self.backbone(systems)
        return self._design(features), base.double()

    @torch.jit.unused
    def fit_baseline(self, counts, energies, n_atoms) -> None:
        raise NotImplementedError("the wrapped model keeps its own energy baseline")


@torch.no_grad()
def extend_metatomic_model(
    path: str,
    train_set,
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
    backbone = backbone.to(dtype)
    errors2, n_atoms = [], []
    feature_size = 0
    for batch in iterate_batches(train_set, batch_size, shuffle=False):
        batch = batch.to(dtype=dtype)
        systems = batch_to_systems(batch, batch.positions, backbone.neighbor_options)
        features, base = backbone(systems)
        feature_size = features.shape[1]
        energy = torch.zeros(batch.n_systems, dtype=dtype).index_add(
            0, batch.system_index, base
        )
        errors2.append((batch.energy - energy).double() ** 2)
        n_atoms.append(batch.n_atoms.double())
    model = ExtendedModel(backbone, 1, feature_size).to(dtype)
    scale = torch.sqrt((torch.cat(errors2) / torch.cat(n_atoms)).mean())
    model.head.energy_scale.fill_(float(torch.clamp(scale, min=1e-3)))
    return model
