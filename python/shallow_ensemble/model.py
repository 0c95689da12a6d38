"""The shallow-ensemble model: a backbone, ensemble heads and calibration factors."""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .backbones import Backbone
from .heads import ShallowEnsembleHead
from .kinds import register_kind


@register_kind
class EnsembleModel(torch.nn.Module):
    """Backbone + :py:class:`ShallowEnsembleHead`, with calibration factors.

    The scripted path (:py:meth:`forward`) returns per-atom member energies; the
    exported metatomic model sums them, averages them and takes their spread. Training
    and evaluation use :py:meth:`predict`, which also gives member forces for all
    members at once (no loop over members).

    Calibration (fitted on validation data, 1 before that) is stored here so that it
    travels in checkpoints and exports:

    - ``alpha_energy`` stretches the member energies around their mean;
    - ``alpha_forces`` stretches the member *forces* (the gradients) around theirs;
    - ``alpha_atom`` scales the per-atom energy uncertainty (see
      :py:meth:`calibrated_atomic_energies`).

    :param backbone: the shared feature extractor
    :param num_members: number of heads ``M``
    """

    kind = "soap_bpnn"

    def __init__(self, backbone: Backbone, num_members: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.atomic_types: List[int] = list(backbone.atomic_types)
        self.head = ShallowEnsembleHead(
            backbone.feature_size, num_members, len(self.atomic_types)
        )
        lookup = torch.full((max(self.atomic_types) + 1,), -1, dtype=torch.long)
        for i, z in enumerate(self.atomic_types):
            lookup[z] = i
        self.register_buffer("type_to_index", lookup)
        self.register_buffer("alpha_energy", torch.ones(()))
        self.register_buffer("alpha_forces", torch.ones(()))
        self.register_buffer("alpha_atom", torch.ones(()))

    @property
    def num_members(self) -> int:
        return self.head.num_members

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """Index of each atomic number in :py:attr:`atomic_types`; errors if unknown."""
        n_lookup = self.type_to_index.shape[0]
        inside = (numbers >= 0) & (numbers < n_lookup)
        species = self.type_to_index.index_select(
            0, torch.clamp(numbers, 0, n_lookup - 1)
        )
        unknown = (~inside) | (species < 0)
        if bool(unknown.any()):
            bad = int(numbers[unknown][0])
            raise ValueError(
                "atomic type "
                + str(bad)
                + " is not one of the model's atomic types "
                + str(self.atomic_types)
            )
        return species

    def forward(
        self,
        vectors: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        species: torch.Tensor,
    ) -> torch.Tensor:
        """Uncalibrated per-atom member energies, ``(n_atoms, n_members)``, eV."""
        features = self.backbone(vectors, centers, neighbors, species)
        return self.head(features, species)

    def calibrated_atomic_energies(
        self, atomic: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Apply the calibration to per-atom member energies ``(n_atoms, M)``.

        Returns the calibrated per-atom ensemble and the per-atom uncertainty. The
        ensemble is stretched around its mean by ``alpha_energy`` in value and by
        ``alpha_forces`` in gradient, so that summed member energies and autograd
        member forces are both calibrated; the per-atom uncertainty is the per-atom
        member spread times ``alpha_atom`` (per-atom spreads do not add up; the
        per-atom ensemble does).
        """
        mean = atomic.mean(dim=-1, keepdim=True)
        delta = atomic - mean
        ensemble = (
            mean
            + self.alpha_forces * delta
            + (self.alpha_energy - self.alpha_forces) * delta.detach()
        )
        if atomic.shape[-1] > 1:
            std = atomic.std(dim=-1)
        else:
            std = torch.zeros_like(atomic[:, 0])
        return ensemble, self.alpha_atom * std

    # ---------------------------------------------------------------- eager only --
    @torch.jit.unused
    def predict(
        self, batch, forces: str = "none", create_graph: bool = False
    ) -> "Prediction":
        """Member energies (and forces) of a :py:class:`~shallow_ensemble.data.Batch`.

        :param batch: the structures
        :param forces: ``"none"``, ``"mean"`` (forces of the mean energy only, one
            pass) or ``"members"`` (forces of every member, one batched pass)
        :param create_graph: keep the graph of the forces for a force loss
        :return: uncalibrated :py:class:`Prediction`
        """
        if forces not in ("none", "mean", "members"):
            raise ValueError(
                f"`forces` is '{forces}' but must be 'none', 'mean' or 'members'"
            )
        species = self.species_index(batch.numbers)
        vectors = batch.pair_vectors()
        grad_mode = torch.is_grad_enabled()
        if forces == "mean":  # plain autograd: one backward pass is the cheapest
            vectors = vectors.detach().requires_grad_(True)
        with torch.set_grad_enabled(grad_mode or forces == "mean"):
            atomic = self(vectors, batch.centers, batch.neighbors, species)
        energies = torch.zeros(
            (batch.n_systems, atomic.shape[1]), dtype=atomic.dtype, device=atomic.device
        ).index_add(0, batch.system_index, atomic)

        member_forces: Optional[torch.Tensor] = None
        if forces == "mean":
            (pair_grads,) = torch.autograd.grad(
                atomic.mean(dim=1).sum(),
                vectors,
                create_graph=create_graph,
                retain_graph=create_graph or grad_mode,
            )
            member_forces = pair_forces_to_atoms(
                pair_grads.unsqueeze(0), batch.centers, batch.neighbors, atomic.shape[0]
            )
            if not grad_mode:
                atomic, energies = atomic.detach(), energies.detach()
        elif forces == "members":
            cotangents = self.head.member_cotangents()
            cotangents = cotangents.unsqueeze(1).expand(-1, atomic.shape[0], -1)
            pair_grads = self.backbone.vectors_vjp(
                vectors,
                batch.centers,
                batch.neighbors,
                species,
                cotangents,
                create_graph=create_graph,
            )
            member_forces = pair_forces_to_atoms(
                pair_grads, batch.centers, batch.neighbors, atomic.shape[0]
            )
        return Prediction(atomic=atomic, energies=energies, forces=member_forces)

    @torch.jit.unused
    def head_design(self, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-atom features in which the heads are linear, and per-atom offsets.

        Member energies are :math:`e_i = \\phi_i \\cdot \\theta + o_i` with
        :math:`\\theta = (w, b)`, :math:`\\phi_i = s (f_i, 1)` and the composition
        baseline as offset :math:`o_i` (the last-layer Laplace approximation works
        in this space).

        :return: ``phi`` ``(n_atoms, F + 1)`` and offsets ``(n_atoms,)``, float64
        """
        with torch.no_grad():
            species = self.species_index(batch.numbers)
            features = self.backbone(
                batch.pair_vectors(), batch.centers, batch.neighbors, species
            )
        return self._design(features), self.head.composition.double()[species]

    @torch.jit.unused
    def _design(self, features: torch.Tensor) -> torch.Tensor:
        """``phi_i = s (f_i, 1)``, float64, from per-atom last-layer features."""
        features = features.double()
        return self.head.energy_scale.double() * torch.cat(
            [features, torch.ones_like(features[:, :1])], dim=1
        )

    @torch.jit.unused
    def fit_baseline(
        self, counts: torch.Tensor, energies: torch.Tensor, n_atoms: torch.Tensor
    ) -> None:
        """Fit the composition baseline and the energy scale on training data.

        :param counts: number of atoms of each type in each structure,
            ``(n_structures, n_types)``
        :param energies: reference energies, ``(n_structures,)``, eV
        :param n_atoms: ``(n_structures,)``
        """
        counts = counts.to(torch.float64)
        energies = energies.to(torch.float64)
        solution = torch.linalg.lstsq(counts, energies.unsqueeze(-1), driver="gelsd")
        composition = solution.solution.squeeze(-1)
        residual = energies - counts @ composition
        # typical per-atom residual, assuming independent atomic contributions
        scale = torch.sqrt((residual**2 / n_atoms.to(torch.float64)).mean())
        scale = torch.clamp(scale, min=1e-3)
        self.head.composition.copy_(composition.to(self.head.composition))
        self.head.energy_scale.copy_(scale.to(self.head.energy_scale))


@dataclass
class Prediction:
    """Uncalibrated model outputs for a batch.

    :param atomic: per-atom member energies, ``(n_atoms, n_members)``, eV
    :param energies: member energies, ``(n_systems, n_members)``, eV
    :param forces: member forces ``(n_members, n_atoms, 3)`` (or ``(1, n_atoms, 3)``
        for the forces of the mean energy), eV/angstrom; ``None`` if not computed
    """

    atomic: torch.Tensor
    energies: torch.Tensor
    forces: Optional[torch.Tensor]


def pair_forces_to_atoms(
    pair_grads: torch.Tensor,
    centers: torch.Tensor,
    neighbors: torch.Tensor,
    n_atoms: int,
) -> torch.Tensor:
    """Forces from energy gradients w.r.t. pair vectors :math:`R_{ij} = r_j - r_i`.

    :param pair_grads: ``(n_members, n_pairs, 3)``
    :return: :math:`F = -\\partial E / \\partial r`, ``(n_members, n_atoms, 3)``
    """
    forces = pair_grads.new_zeros((pair_grads.shape[0], n_atoms, 3))
    forces = forces.index_add(1, centers, pair_grads)
    return forces.index_add(1, neighbors, -pair_grads)
