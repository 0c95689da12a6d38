"""Model kinds: the contract every kind of ensemble model implements, and the
registry that finds a kind by its name.

A *kind* is a subclass of :py:class:`ModelKind` with a ``kind`` name, registered
with :py:func:`register_kind`. Checkpoints store the kind's name and
:py:meth:`ModelKind.hypers` and rebuild it with :py:meth:`ModelKind.from_hypers`;
``model.kind`` of the configuration picks the kind of a freshly trained model
(:py:meth:`ModelKind.from_config`); the exporter wraps
:py:meth:`ModelKind.exported_module` into a metatomic model. Nothing outside a
kind's own class dispatches on its type.

The built-in kinds: ``soap_bpnn`` (:py:class:`~shallow_ensemble.model.EnsembleModel`),
``stacked`` (:py:class:`~shallow_ensemble.model.StackedEnsemble`, a deep ensemble)
and ``metatomic`` (:py:class:`~shallow_ensemble.extended.ExtendedModel`, an exported
model extended into an ensemble). A new pair-vector backbone is a
:py:class:`~shallow_ensemble.backbones.Backbone` plus a four-line subclass of
:py:class:`~shallow_ensemble.model.BackboneEnsemble` (see docs/concepts.md).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .errors import ShallowEnsembleError


if TYPE_CHECKING:
    from .calibration.noise_floor import NoiseFloors
    from .config import ModelConfig
    from .data import Batch, GraphDataset
    from .heads import LinearHeads


#: size of the per-element tables indexed by atomic number (0 to 118)
NUM_ELEMENTS = 119
#: buffers of the scales of the noise-floor model (1: no floor)
FLOOR_SCALES = ("floor_scale_energy", "floor_scale_atom", "floor_scale_forces")
#: every calibration buffer of a model kind, copied into the exported model
CALIBRATION_BUFFERS = (
    "alpha_energy",
    "alpha_forces",
    "alpha_atom",
    "sigma0_energy",
    "sigma0_atom",
    "sigma0_forces",
    *FLOOR_SCALES,
)


class UnknownKindError(ShallowEnsembleError, ValueError):
    """No model kind of this name is registered."""


class KindError(ShallowEnsembleError, ValueError):
    """A model kind cannot do what was asked (e.g. be trained from scratch)."""


@dataclass
class Prediction:
    r"""Uncalibrated model outputs for a batch.

    :param atomic: per-atom member energies, ``(n_atoms, n_members)``, eV
    :param energies: member energies, ``(n_systems, n_members)``, eV
    :param forces: member forces ``(n_members, n_atoms, 3)`` (or ``(1, n_atoms, 3)``
        for the forces of the mean energy), eV/angstrom; ``None`` if not computed
    :param stress: member stresses ``(n_members, n_systems, 3, 3)`` (or
        ``(1, n_systems, 3, 3)`` for the mean energy, like ``forces``), eV/Å³, ASE's
        sign convention :math:`\frac{1}{V} \partial E / \partial \varepsilon`;
        zero for systems without a volume; ``None`` if not computed
    """

    atomic: torch.Tensor
    energies: torch.Tensor
    forces: torch.Tensor | None
    stress: torch.Tensor | None = None


FORCES_MODES = ("none", "mean", "members")


def check_forces_mode(forces: str) -> None:
    """``forces`` of :py:meth:`ModelKind.predict` must be one of
    :py:data:`FORCES_MODES`."""
    if forces not in FORCES_MODES:
        raise ValueError(
            f"`forces` is '{forces}' but must be 'none', 'mean' or 'members'"
        )


def calibrate_members(
    atomic: torch.Tensor,
    alpha_energy: torch.Tensor,
    alpha_forces: torch.Tensor,
    alpha_atom: torch.Tensor,
    sigma0_atom: torch.Tensor,
    floor_scale_atom: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the calibration to per-atom member energies ``(n_atoms, M)``.

    Returns the calibrated per-atom ensemble and the per-atom uncertainty. The
    ensemble is stretched around its mean by ``alpha_energy`` in value and by
    ``alpha_forces`` in gradient, so that summed member energies and autograd member
    forces are both calibrated; the per-atom uncertainty is the per-atom member spread
    times ``alpha_atom``, scaled by ``floor_scale_atom`` with the per-atom noise floor
    ``sigma0_atom`` added in quadrature (per-atom spreads do not add up; the
    per-atom ensemble does).
    TorchScript: the exported models call it too.
    """
    mean = atomic.mean(dim=-1, keepdim=True)
    delta = atomic - mean
    ensemble = (
        mean + alpha_forces * delta + (alpha_energy - alpha_forces) * delta.detach()
    )
    if atomic.shape[-1] > 1:
        std = atomic.std(dim=-1)
    else:
        std = torch.zeros_like(atomic[:, 0])
    spread = floor_scale_atom * alpha_atom * std
    return ensemble, torch.sqrt(spread**2 + sigma0_atom**2)


def sum_per_system(atomic: torch.Tensor, batch: "Batch") -> torch.Tensor:
    """Per-system sums ``(n_systems, M)`` of per-atom values ``(n_atoms, M)``."""
    return torch.zeros(
        (batch.n_systems, atomic.shape[1]), dtype=atomic.dtype, device=atomic.device
    ).index_add(0, batch.system_index, atomic)


class ModelKind(torch.nn.Module):
    """The contract of a kind of ensemble model.

    Every kind has ``M`` linear heads on per-atom last-layer features
    (:py:attr:`head`, a :py:class:`~shallow_ensemble.heads.LinearHeads`: training,
    the last-layer Laplace approximation, random heads, stacking and pinning the mean
    act on it), the calibration factors (buffers ``alpha_energy``, ``alpha_forces``,
    ``alpha_atom``, 1 until calibrated) and noise floors (buffers ``sigma0_energy``,
    eV/atom, ``sigma0_atom``, eV, and ``sigma0_forces``, eV/Å indexed by atomic
    number, 0 until calibrated, with the scales ``floor_scale_energy``,
    ``floor_scale_atom``, ``floor_scale_forces``, 1 until calibrated; see
    :py:class:`~shallow_ensemble.calibration.noise_floor.NoiseFloors`),
    :py:attr:`atomic_types` and
    :py:attr:`cutoff` (the interaction range, angstrom). A kind implements:

    - ``kind`` (class attribute): its registered name;
    - :py:meth:`hypers` and :py:meth:`from_hypers`: everything needed to rebuild it
      before loading its state (checkpoints);
    - :py:meth:`from_config` and :py:meth:`init_from_data` (its data-dependent
      initialisation) for kinds that can be trained from scratch (``from_scratch =
      True``);
    - :py:meth:`predict`: member energies and forces of a batch;
    - :py:meth:`head_design`: the per-atom design matrix in which the heads are
      linear;
    - :py:meth:`exported_module`: the TorchScript module the exporter wraps;
    - optionally :py:meth:`describe` (for the exported model's description).

    Only the module of :py:meth:`exported_module` has to be TorchScript-compatible;
    everything else runs in Python (training, calibration, checkpoints).
    """

    kind = ""
    #: whether :py:meth:`from_config` builds a fresh model (``model.kind`` of a run
    #: that trains from scratch)
    from_scratch = False

    if TYPE_CHECKING:  # set by every kind (not a class annotation: TorchScript)
        head: LinearHeads
        atomic_types: list[int]
        cutoff: float

    # the calibration factors, buffers registered in ``__init__``
    alpha_energy: torch.Tensor
    alpha_forces: torch.Tensor
    alpha_atom: torch.Tensor
    sigma0_energy: torch.Tensor
    sigma0_atom: torch.Tensor
    sigma0_forces: torch.Tensor
    floor_scale_energy: torch.Tensor
    floor_scale_atom: torch.Tensor
    floor_scale_forces: torch.Tensor

    #: whether :py:meth:`predict` computes stresses (``stress=True``)
    predicts_stress: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("alpha_energy", torch.ones(()))
        self.register_buffer("alpha_forces", torch.ones(()))
        self.register_buffer("alpha_atom", torch.ones(()))
        self.register_buffer("sigma0_energy", torch.zeros(()))
        self.register_buffer("sigma0_atom", torch.zeros(()))
        self.register_buffer("sigma0_forces", torch.zeros(NUM_ELEMENTS))
        for name in FLOOR_SCALES:
            self.register_buffer(name, torch.ones(()))

    @property
    def num_members(self) -> int:
        return self.head.num_members

    def calibrated_atomic_energies(
        self, atomic: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:py:func:`calibrate_members` with this model's calibration factors."""
        return calibrate_members(
            atomic,
            self.alpha_energy,
            self.alpha_forces,
            self.alpha_atom,
            self.sigma0_atom,
            self.floor_scale_atom,
        )

    def freeze_mean(self) -> None:
        """Keep the ensemble's current mean energy exactly through a full fine-tune
        (``pin_mean`` with ``finetune_target: full``). Kinds that cannot do it (the
        default) only keep the mean head pinned, while the backbone moves."""

    def set_calibration(self, calibration: dict[str, Any]) -> None:
        """Set the calibration factors and noise floors from a dictionary of
        :py:func:`~shallow_ensemble.calibration.predictions.fit_calibration` (floors
        missing from it are zero)."""
        from .calibration.predictions import noise_floors

        floors = noise_floors(calibration)
        for name in ("alpha_energy", "alpha_forces", "alpha_atom"):
            getattr(self, name).fill_(float(calibration[name]))
        self.sigma0_energy.fill_(floors.energy)
        self.sigma0_atom.fill_(floors.atom)
        self.floor_scale_energy.fill_(floors.energy_scale)
        self.floor_scale_atom.fill_(floors.atom_scale)
        self.floor_scale_forces.fill_(floors.forces_scale)
        self.sigma0_forces.zero_()
        for number, value in floors.forces.items():
            self.sigma0_forces[number] = value

    def noise_floors(self) -> "NoiseFloors":
        """This model's noise floors."""
        from .calibration.noise_floor import NoiseFloors

        return NoiseFloors.from_buffers(self)

    # ------------------------------------------------------ what a kind implements --
    def hypers(self) -> dict[str, Any]:
        """Everything :py:meth:`from_hypers` needs (plain Python values and bytes,
        no tensors), without the kind's name (the checkpoint adds it)."""
        raise NotImplementedError

    @classmethod
    def from_hypers(cls, hypers: dict[str, Any]) -> "ModelKind":
        """An untrained model of this kind, ready to load a state dict."""
        raise NotImplementedError

    @classmethod
    def from_config(
        cls, model_config: "ModelConfig", atomic_types: list[int], num_members: int
    ) -> "ModelKind":
        """A fresh model from the ``model`` section of the configuration (kinds with
        :py:attr:`from_scratch`)."""
        raise KindError(
            f"model kind '{cls.kind}' cannot be trained from scratch (set "
            f"`model.kind` to one of {', '.join(kind_names(from_scratch=True))})"
        )

    def init_from_data(self, dataset: "GraphDataset") -> None:
        """Data-dependent initialisation of a fresh model (normalisation, baseline,
        energy scale) on the training set; nothing by default."""

    def predict(
        self,
        batch: "Batch",
        forces: str = "none",
        create_graph: bool = False,
        stress: bool = False,
    ) -> Prediction:
        """Member energies (and forces) of a :py:class:`~shallow_ensemble.data.Batch`.

        :param batch: the structures
        :param forces: ``"none"``, ``"mean"`` (forces of the mean energy only) or
            ``"members"`` (forces of every member)
        :param create_graph: keep the graph of the forces for a force loss
        :param stress: also the stresses, of the mean or of every member as
            ``forces`` says (which must not be ``"none"``); a kind that cannot
            compute them raises a :py:class:`KindError`
        :return: uncalibrated :py:class:`Prediction`
        """
        raise NotImplementedError

    def head_design(self, batch: "Batch") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-atom features in which the heads are linear, and per-atom offsets.

        Member energies are :math:`e_i = \\phi_i \\cdot \\theta + o_i` with
        :math:`\\theta = (w, b)` and :math:`\\phi_i = s (f_i, 1)` (the last-layer
        Laplace approximation works in this space).

        :return: ``phi`` ``(n_atoms, F + 1)`` and offsets ``(n_atoms,)``, float64
        """
        raise NotImplementedError

    def exported_module(self) -> torch.nn.Module:
        """The TorchScript-compatible module that the exporter wraps.

        Its ``forward(systems: List[System]) -> Tuple[Tensor, Tensor]`` gives the
        uncalibrated per-atom member energies ``(n_atoms, M)`` and the per-atom
        last-layer features ``(n_atoms, F)``, atoms in the order of ``systems``
        (concatenated); an exported ``requested_neighbor_lists()`` method declares
        the neighbour lists it reads. It may share parameters with the model (the
        exporter works on a copy).
        """
        raise NotImplementedError

    def describe(self) -> str:
        """What the model is, for the exported model's description."""
        return f"a '{self.kind}' model (cutoff {self.cutoff} A)"

    # -------------------------------------------------------------- shared helpers --
    def _design(self, features: torch.Tensor) -> torch.Tensor:
        """``phi_i = s (f_i, 1)``, float64, from per-atom last-layer features."""
        features = features.double()
        return self.head.energy_scale.double() * torch.cat(
            [features, torch.ones_like(features[:, :1])], dim=1
        )


# ----------------------------------------------------------------------- registry --
_KINDS: dict[str, type[ModelKind]] = {}

T = TypeVar("T", bound=type)


def register_kind(cls: T) -> T:
    """Class decorator: register ``cls`` under its ``kind`` attribute."""
    name = getattr(cls, "kind", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a `kind` name to be registered")
    if not issubclass(cls, ModelKind):
        raise TypeError(
            f"{cls.__name__} must be a subclass of shallow_ensemble.kinds.ModelKind "
            "to be registered as a model kind"
        )
    if name in _KINDS and _KINDS[name] is not cls:
        raise ValueError(
            f"model kind '{name}' is already registered by {_KINDS[name].__name__}"
        )
    _KINDS[name] = cls
    return cls


def _load_builtin_kinds() -> None:
    from . import extended, model  # noqa: F401  (they register their kinds)


def kind_names(from_scratch: bool = False) -> list[str]:
    """Names of the registered model kinds (only those that can be trained from
    scratch with ``from_scratch``)."""
    _load_builtin_kinds()
    return sorted(n for n, c in _KINDS.items() if not from_scratch or c.from_scratch)


def get_kind(name: str) -> Any:
    """The class of the model kind ``name``."""
    _load_builtin_kinds()
    if name not in _KINDS:
        raise UnknownKindError(
            f"model kind '{name}' is unknown; registered kinds: "
            f"{', '.join(sorted(_KINDS))}"
        )
    return _KINDS[name]
