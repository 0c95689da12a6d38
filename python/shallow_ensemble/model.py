"""Ensembles on pair-vector backbones: a backbone, ensemble heads and calibration.

:py:class:`BackboneEnsemble` implements the model contract
(:py:class:`~shallow_ensemble.kinds.ModelKind`) once for every
:py:class:`~shallow_ensemble.backbones.Backbone`; its kinds are
:py:class:`EnsembleModel` (``soap_bpnn``), :py:class:`StackedEnsemble` (``stacked``,
a deep ensemble) and any new backbone's (a subclass naming ``kind`` and
``backbone_class``).
"""

from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    List,
    Optional,
    Sequence,
    Tuple,
    Type,
    cast,
)

import torch
from metatomic.torch import NeighborListOptions, System

from .backbones import Backbone, SoapBpnn, StackedBackbone
from .heads import ShallowEnsembleHead
from .kinds import (
    KindError,
    ModelKind,
    Prediction,
    check_forces_mode,
    get_kind,
    register_kind,
    sum_per_system,
)


if TYPE_CHECKING:
    from .config import ModelConfig
    from .data import Batch, GraphDataset


__all__ = [
    "BackboneEnsemble",
    "EnsembleModel",
    "PairEnsembleModule",
    "Prediction",
    "StackedEnsemble",
    "pair_forces_to_atoms",
]


def species_index(
    type_to_index: torch.Tensor, atomic_types: List[int], numbers: torch.Tensor
) -> torch.Tensor:
    """Index of each atomic number in ``atomic_types``; errors if unknown."""
    n_lookup = type_to_index.shape[0]
    inside = (numbers >= 0) & (numbers < n_lookup)
    species = type_to_index.index_select(0, torch.clamp(numbers, 0, n_lookup - 1))
    unknown = (~inside) | (species < 0)
    if bool(unknown.any()):
        bad = int(numbers[unknown][0])
        raise ValueError(
            "atomic type "
            + str(bad)
            + " is not one of the model's atomic types "
            + str(atomic_types)
        )
    return species


class BackboneEnsemble(ModelKind):
    """A :py:class:`~shallow_ensemble.backbones.Backbone` and a
    :py:class:`~shallow_ensemble.heads.ShallowEnsembleHead`, with calibration factors.

    The scripted path (:py:meth:`forward`) returns per-atom member energies of a pair
    graph; the exported module (:py:class:`PairEnsembleModule`) builds that graph
    from the engine's neighbour list. Training and evaluation use :py:meth:`predict`,
    which also gives member forces for all members at once (the backbone's
    :py:meth:`~shallow_ensemble.backbones.Backbone.vectors_vjp`, no loop over
    members).

    Calibration (fitted on validation data, 1 before that) is stored here so that it
    travels in checkpoints and exports:

    - ``alpha_energy`` stretches the member energies around their mean;
    - ``alpha_forces`` stretches the member *forces* (the gradients) around theirs;
    - ``alpha_atom`` scales the per-atom energy uncertainty (see
      :py:meth:`calibrated_atomic_energies`).

    A kind on a new backbone is a registered subclass naming ``kind`` and
    ``backbone_class`` (whose ``hypers``/``from_hypers``/``from_config`` rebuild
    it).

    :param backbone: the shared feature extractor
    :param num_members: number of heads ``M``
    """

    predicts_stress = True
    #: the backbone of this kind (``None``: the subclass builds its own)
    backbone_class: Optional[Type[Backbone]] = None
    from_scratch = True

    type_to_index: torch.Tensor
    if TYPE_CHECKING:  # submodules set in __init__ (not class annotations: TorchScript)
        backbone: Backbone
        head: ShallowEnsembleHead

    def __init__(self, backbone: Backbone, num_members: int) -> None:
        super().__init__()
        expected = type(self).backbone_class
        if expected is not None and not isinstance(backbone, expected):
            raise TypeError(
                f"a '{self.kind}' model needs a {expected.__name__} backbone, not "
                f"{type(backbone).__name__}"
            )
        self.backbone = backbone
        self.atomic_types: List[int] = list(backbone.atomic_types)
        self.cutoff = float(backbone.cutoff)
        self.head = ShallowEnsembleHead(
            backbone.feature_size, num_members, len(self.atomic_types)
        )
        lookup = torch.full((max(self.atomic_types) + 1,), -1, dtype=torch.long)
        for i, z in enumerate(self.atomic_types):
            lookup[z] = i
        self.register_buffer("type_to_index", lookup)

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """Index of each atomic number in :py:attr:`atomic_types`; errors if unknown."""
        return species_index(self.type_to_index, self.atomic_types, numbers)

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

    # ------------------------------------------------------------- the contract --
    def hypers(self) -> Dict[str, Any]:
        return {"backbone": self.backbone.hypers(), "num_members": self.num_members}

    @classmethod
    def from_hypers(cls, hypers: Dict[str, Any]) -> "BackboneEnsemble":
        if cls.backbone_class is None:
            raise NotImplementedError(f"{cls.__name__} has no `backbone_class`")
        backbone = cls.backbone_class.from_hypers(hypers["backbone"])
        return cls(backbone, num_members=int(hypers["num_members"]))

    @classmethod
    def from_config(
        cls, model_config: "ModelConfig", atomic_types: List[int], num_members: int
    ) -> "BackboneEnsemble":
        if not cls.from_scratch or cls.backbone_class is None:
            # ModelKind.from_config raises KindError (no fresh model of this kind)
            model = super().from_config(model_config, atomic_types, num_members)
            return cast("BackboneEnsemble", model)
        backbone = cls.backbone_class.from_config(model_config, atomic_types)
        return cls(backbone, num_members=num_members)

    def exported_module(self) -> torch.nn.Module:
        return PairEnsembleModule(self)

    def predict(
        self,
        batch: "Batch",
        forces: str = "none",
        create_graph: bool = False,
        stress: bool = False,
    ) -> Prediction:
        """Member energies (and forces, stresses) of a
        :py:class:`~shallow_ensemble.data.Batch` (see
        :py:meth:`~shallow_ensemble.kinds.ModelKind.predict`); member forces and
        stresses in one batched pass (both contract the same gradients with respect
        to the pair vectors), ``"mean"`` ones by one plain backward pass."""
        check_forces_mode(forces)
        if stress and forces == "none":
            raise ValueError("stresses need `forces` to be 'mean' or 'members'")
        species = self.species_index(batch.numbers)
        vectors = batch.pair_vectors()
        grad_mode = torch.is_grad_enabled()
        if forces == "mean":  # plain autograd: one backward pass is the cheapest
            vectors = vectors.detach().requires_grad_(True)
        with torch.set_grad_enabled(grad_mode or forces == "mean"):
            atomic = self(vectors, batch.centers, batch.neighbors, species)
        energies = sum_per_system(atomic, batch)

        member_forces: Optional[torch.Tensor] = None
        if forces == "mean":
            (pair_grads,) = torch.autograd.grad(
                atomic.mean(dim=1).sum(),
                vectors,
                create_graph=create_graph,
                retain_graph=create_graph or grad_mode,
            )
            pair_grads = pair_grads.unsqueeze(0)
            member_forces = pair_forces_to_atoms(
                pair_grads, batch.centers, batch.neighbors, atomic.shape[0]
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
        member_stress: Optional[torch.Tensor] = None
        if stress:
            member_stress = pair_stress(pair_grads, vectors.detach(), batch)
        return Prediction(
            atomic=atomic, energies=energies, forces=member_forces, stress=member_stress
        )

    def head_design(self, batch: "Batch") -> Tuple[torch.Tensor, torch.Tensor]:
        """``phi_i = s (f_i, 1)`` and the composition baseline as offsets, float64
        (see :py:meth:`~shallow_ensemble.kinds.ModelKind.head_design`)."""
        with torch.no_grad():
            species = self.species_index(batch.numbers)
            features = self.backbone(
                batch.pair_vectors(), batch.centers, batch.neighbors, species
            )
        return self._design(features), self.head.composition.double()[species]

    def init_from_data(self, dataset: "GraphDataset") -> None:
        """Descriptor standardisation (on up to 32 structures), composition baseline
        and energy scale (on all of them)."""
        graphs = [dataset[i] for i in range(min(len(dataset), 32))]
        self.backbone.fit_normalization(
            [
                [
                    g.pair_vectors(),
                    g.centers,
                    g.neighbors,
                    self.species_index(g.numbers),
                ]
                for g in graphs
            ]
        )
        n_types = len(self.atomic_types)
        counts = torch.zeros(len(dataset), n_types, dtype=torch.float64)
        energies = torch.zeros(len(dataset), dtype=torch.float64)
        n_atoms = torch.zeros(len(dataset), dtype=torch.float64)
        for i in range(len(dataset)):
            g = dataset[i]
            counts[i] = torch.bincount(self.species_index(g.numbers), minlength=n_types)
            assert g.energy is not None, "training data have energies"
            energies[i] = g.energy
            n_atoms[i] = len(g.numbers)
        self.fit_baseline(counts, energies, n_atoms)

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
        with torch.no_grad():
            self.head.composition.copy_(composition.to(self.head.composition))
            self.head.energy_scale.copy_(scale.to(self.head.energy_scale))


@register_kind
class EnsembleModel(BackboneEnsemble):
    """The SOAP-BPNN shallow ensemble (kind ``soap_bpnn``): a
    :py:class:`~shallow_ensemble.backbones.SoapBpnn` backbone and ``M`` heads.

    :param backbone: the SOAP-BPNN backbone
    :param num_members: number of heads ``M``
    """

    kind = "soap_bpnn"
    backbone_class = SoapBpnn

    def describe(self) -> str:
        return f"a SOAP-BPNN backbone (cutoff {self.cutoff} A)"


@register_kind
class StackedEnsemble(BackboneEnsemble):
    """A deep ensemble as one model (kind ``stacked``): member ``k`` has its own
    backbone, of the registered kind ``member_kind``.

    The backbones' features are concatenated (a
    :py:class:`~shallow_ensemble.backbones.StackedBackbone`) and the heads' weights
    are block-diagonal (member ``k`` reads only block ``k``), so that ``N``
    independently trained models export, calibrate and run in engines like a shallow
    ensemble. Built from trained models by :py:meth:`from_members`.

    :param backbones: the members' backbones
    :param member_kind: the kind of the stacked models
    :param num_members: number of heads (``len(backbones)`` once stacked)
    """

    kind = "stacked"
    from_scratch = False

    if TYPE_CHECKING:  # set by BackboneEnsemble (not a class annotation: TorchScript)
        backbone: StackedBackbone

    def __init__(
        self, backbones: List[Backbone], member_kind: str, num_members: int
    ) -> None:
        super().__init__(StackedBackbone(backbones), num_members)
        self.member_kind = str(member_kind)

    def hypers(self) -> Dict[str, Any]:
        return {
            "member_kind": self.member_kind,
            "backbones": [cast(Backbone, b).hypers() for b in self.backbone.backbones],
            "num_members": self.num_members,
        }

    @classmethod
    def from_hypers(cls, hypers: Dict[str, Any]) -> "StackedEnsemble":
        member = get_kind(hypers["member_kind"])
        backbones = [member.backbone_class.from_hypers(h) for h in hypers["backbones"]]
        return cls(backbones, hypers["member_kind"], int(hypers["num_members"]))

    @classmethod
    def from_members(cls, models: Sequence[ModelKind]) -> "StackedEnsemble":
        """One model whose member ``k`` is ``models[k]`` (their mean head).

        The models must be of one pair-vector kind (a :py:class:`BackboneEnsemble`
        with a ``backbone_class``) and share their composition baseline and energy
        scale (true for models trained on the same data, which fit them by least
        squares).
        """
        members = [m for m in models if isinstance(m, BackboneEnsemble)]
        kinds = sorted({model.kind for model in models})
        if len(members) != len(models) or len(kinds) != 1:
            raise KindError(
                f"only models of one pair-vector kind can be stacked, not {kinds}"
            )
        first = members[0]
        if first.backbone_class is None:
            raise KindError(f"'{first.kind}' models cannot be stacked again")
        for other in members[1:]:
            if not (
                torch.allclose(other.head.composition, first.head.composition)
                and torch.allclose(other.head.energy_scale, first.head.energy_scale)
            ):
                raise ValueError(
                    "deep-ensemble members have different energy baselines"
                )
        backbones = [member.backbone for member in members]
        stacked = cls(backbones, first.kind, num_members=len(members))
        stacked = stacked.to(first.head.weight.dtype)
        block = first.head.feature_size
        weight = torch.zeros(len(models), block * len(models), dtype=torch.float64)
        bias = torch.zeros(len(models), dtype=torch.float64)
        for k, member in enumerate(members):
            weight[k, k * block : (k + 1) * block] = member.head.weight.mean(dim=0)
            bias[k] = member.head.bias.mean()
        stacked.head.set_members(weight, bias)
        with torch.no_grad():
            stacked.head.composition.copy_(first.head.composition)
            stacked.head.energy_scale.copy_(first.head.energy_scale)
        return stacked

    def describe(self) -> str:
        return (
            f"{len(self.backbone.backbones)} stacked '{self.member_kind}' backbones "
            f"(a deep ensemble, cutoff {self.cutoff} A)"
        )


class PairEnsembleModule(torch.nn.Module):
    """The exported module of a :py:class:`BackboneEnsemble`: per-atom member
    energies and last-layer features of metatomic systems, from the engine's full
    neighbour list at the backbone's cutoff (see
    :py:meth:`~shallow_ensemble.kinds.ModelKind.exported_module`)."""

    type_to_index: torch.Tensor

    def __init__(self, model: BackboneEnsemble) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.atomic_types = list(model.atomic_types)
        self.register_buffer("type_to_index", model.type_to_index)
        self.neighbors = NeighborListOptions(
            cutoff=model.cutoff, full_list=True, strict=True
        )

    @torch.jit.export
    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return [self.neighbors]

    def forward(self, systems: List[System]) -> Tuple[torch.Tensor, torch.Tensor]:
        vectors: List[torch.Tensor] = []
        centers: List[torch.Tensor] = []
        neighbors: List[torch.Tensor] = []
        species: List[torch.Tensor] = []
        offset = 0
        for system in systems:
            nl = system.get_neighbor_list(self.neighbors)
            pairs = nl.samples.values
            vectors.append(nl.values.reshape(-1, 3))
            centers.append(pairs[:, 0].to(torch.long) + offset)
            neighbors.append(pairs[:, 1].to(torch.long) + offset)
            species.append(
                species_index(
                    self.type_to_index, self.atomic_types, system.types.to(torch.long)
                )
            )
            offset += len(system)
        species_all = torch.cat(species)
        features = self.backbone(
            torch.cat(vectors), torch.cat(centers), torch.cat(neighbors), species_all
        )
        return self.head(features, species_all), features


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
    # sum along the pairs in the layout the gradients are stored in (the batched
    # member route gives a (n_pairs, 3, n_members) tensor seen as a permutation)
    stored = pair_grads.permute(1, 2, 0)
    if stored.is_contiguous() and pair_grads.shape[0] > 1:
        forces = stored.new_zeros((n_atoms, 3, pair_grads.shape[0]))
        forces = forces.index_add(0, centers, stored)
        forces = forces.index_add(0, neighbors, stored, alpha=-1)
        return forces.permute(2, 0, 1).contiguous()
    forces = pair_grads.new_zeros((pair_grads.shape[0], n_atoms, 3))
    forces = forces.index_add(1, centers, pair_grads)
    return forces.index_add(1, neighbors, pair_grads, alpha=-1)


def pair_stress(
    pair_grads: torch.Tensor, vectors: torch.Tensor, batch: "Batch"
) -> torch.Tensor:
    r"""Stresses from energy gradients w.r.t. pair vectors :math:`R_{ij}`.

    A homogeneous strain :math:`\varepsilon` maps every pair vector to
    :math:`(1 + \varepsilon) R`, so
    :math:`\partial E / \partial \varepsilon_{ab} = \sum_{ij}
    (\partial E / \partial R_{ij})_a R_{ij, b}` summed over the pairs of a system,
    and the stress is that over the cell volume (ASE's convention; the virial is
    :math:`-V \sigma`). Systems without a volume (not periodic along all three
    directions) get zeros.

    :param pair_grads: ``(n_members, n_pairs, 3)``
    :param vectors: the pair vectors, ``(n_pairs, 3)``, Å
    :return: ``(n_members, n_systems, 3, 3)``, eV/Å³
    """
    per_pair = pair_grads.unsqueeze(-1) * vectors.unsqueeze(-2)
    pair_system = batch.system_index[batch.centers]
    strain_derivative = per_pair.new_zeros(
        (pair_grads.shape[0], batch.n_systems, 3, 3)
    ).index_add(1, pair_system, per_pair)
    assert batch.cell is not None, "batches from collate have cells"
    volume = torch.linalg.det(batch.cell.to(per_pair.dtype)).abs()
    safe = torch.where(volume > 0, volume, torch.ones_like(volume))
    inverse = torch.where(volume > 0, 1.0 / safe, torch.zeros_like(volume))
    return strain_derivative * inverse[None, :, None, None]
