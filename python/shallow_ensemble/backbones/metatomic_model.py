"""An exported metatomic model (e.g. trained with metatrain) as a shared backbone.

The wrapped model keeps computing its own energy, which becomes the ensemble mean
(composition baseline, scaling and additive terms such as ZBL included), and gives the
per-atom last-layer features on which the ensemble heads are built (see
:py:mod:`shallow_ensemble.extended`).

Unlike a :py:class:`~shallow_ensemble.backbones.Backbone`, which works on pair
vectors, the wrapped model needs complete metatomic ``System`` objects (positions,
cell, neighbour lists with integer cell shifts): it is called exactly as an engine
would call it.
"""

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
from metatensor.torch import TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelOutput,
    NeighborListOptions,
    System,
    load_atomistic_model,
)

from ..errors import ShallowEnsembleError


if TYPE_CHECKING:
    from ..data import Batch


#: last-layer feature outputs tried, in this order, when ``features_output`` is auto
FEATURE_OUTPUTS = ["mtt::aux::energy_last_layer_features", "feature", "features"]


class MetatomicModelError(ShallowEnsembleError, ValueError):
    """An exported model cannot be extended as asked."""


def read_metatomic_model(path: str | Path) -> AtomisticModel:
    """Load an exported metatomic model, with a clear error for other files."""
    path = Path(path)
    if not path.is_file():
        raise MetatomicModelError(f"metatomic model '{path}' does not exist")
    try:
        return load_atomistic_model(str(path))
    except Exception as error:  # torch and metatomic raise many types
        raise MetatomicModelError(
            f"'{path}' is not a loadable metatomic model "
            f"({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error


def choose_features_output(capabilities: ModelCapabilities, requested: str) -> str:
    """The name of the per-atom last-layer feature output to use.

    :param requested: an output name, or ``"auto"`` for the first of
        :py:data:`FEATURE_OUTPUTS` the model has
    """
    available = list(capabilities.outputs.keys())
    candidates = FEATURE_OUTPUTS if requested == "auto" else [requested]
    for name in candidates:
        if name in available:
            output = capabilities.outputs[name]
            if output.sample_kind != "atom":
                raise MetatomicModelError(
                    f"the model's '{name}' output is per {output.sample_kind}, but "
                    "per-atom last-layer features are needed"
                )
            return name
    raise MetatomicModelError(
        "the model has no last-layer features output (looked for "
        f"{', '.join(repr(c) for c in candidates)}); its outputs are "
        f"{', '.join(repr(a) for a in available)}. Models trained with metatrain "
        "export 'mtt::aux::energy_last_layer_features'; set `model.features_output` "
        "to use another per-atom output"
    )


def check_capabilities(capabilities: ModelCapabilities) -> None:
    """The model must predict a per-atom energy in eV from positions in angstrom."""
    outputs = capabilities.outputs
    if "energy" not in outputs:
        raise MetatomicModelError(
            f"the model has no 'energy' output (its outputs: {', '.join(outputs)})"
        )
    energy = outputs["energy"]
    if energy.unit != "eV":
        raise MetatomicModelError(
            f"the model's energy unit is '{energy.unit}' but must be 'eV' (the unit "
            "of the training data); re-export the model in eV"
        )
    if capabilities.length_unit != "angstrom":
        raise MetatomicModelError(
            f"the model's length unit is '{capabilities.length_unit}' but must be "
            "'angstrom' (the unit of the training data)"
        )
    if energy.sample_kind != "atom":
        raise MetatomicModelError(
            "the model's energy is only available per system; per-atom energies are "
            "needed for per-atom uncertainties and domain decomposition"
        )


class MetatomicModelBackbone(torch.nn.Module):
    """The TorchScript module of an exported model, returning per-atom last-layer
    features and per-atom energies.

    :param atomistic: the loaded model
    :param features_output: name of the per-atom last-layer feature output, or
        ``"auto"``
    :param source: the model file's bytes, kept so checkpoints are self-contained
    :param feature_size: size of the last-layer features, if known (checkpoints
        store it); else the model is run once on two atoms to find it (models do not
        declare it)
    """

    __jit_ignored_attributes__ = ["source"]

    def __init__(
        self,
        atomistic: AtomisticModel,
        features_output: str = "auto",
        source: bytes = b"",
        feature_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        capabilities = atomistic.capabilities()
        check_capabilities(capabilities)
        self.features_output = choose_features_output(capabilities, features_output)
        self.module = atomistic.module
        self.atomic_types: List[int] = [int(t) for t in capabilities.atomic_types]
        self.cutoff = float(capabilities.interaction_range)
        self.neighbor_options: List[NeighborListOptions] = list(
            atomistic.requested_neighbor_lists()
        )
        self.model_name = atomistic.metadata().name
        self.source = bytes(source)
        self.outputs: Dict[str, ModelOutput] = {
            "energy": ModelOutput(unit="eV", sample_kind="atom"),
            self.features_output: ModelOutput(sample_kind="atom"),
        }
        if feature_size is None:
            feature_size = self._probe_feature_size(getattr(torch, capabilities.dtype))
        self.feature_size = int(feature_size)

    @classmethod
    def from_file(
        cls, path: str | Path, features_output: str = "auto"
    ) -> "MetatomicModelBackbone":
        """Load ``path`` (an exported ``.pt``) and check it can be extended."""
        atomistic = read_metatomic_model(path)
        return cls(atomistic, features_output, Path(path).read_bytes())

    @classmethod
    def from_bytes(
        cls,
        source: bytes,
        features_output: str = "auto",
        feature_size: Optional[int] = None,
    ) -> "MetatomicModelBackbone":
        """Rebuild from the bytes of a model file (as stored in checkpoints)."""
        fd, tmp = tempfile.mkstemp(suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(source)
            atomistic = read_metatomic_model(tmp)
        finally:
            os.remove(tmp)
        return cls(atomistic, features_output, source, feature_size)

    @torch.jit.unused
    def _probe_feature_size(self, dtype: torch.dtype) -> int:
        """Run the model on two atoms of its first type, 1.5 A apart, and count its
        last-layer features."""
        from vesin.metatomic import NeighborList

        z = self.atomic_types[0]
        system = System(
            types=torch.tensor([z, z], dtype=torch.int32),
            positions=torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.5]], dtype=dtype),
            cell=torch.zeros((3, 3), dtype=dtype),
            pbc=torch.zeros(3, dtype=torch.bool),
        )
        for option in self.neighbor_options:
            NeighborList(option, "angstrom").add_neighbor_list([system])
        with torch.no_grad():
            features, _ = self.forward([system])
        return int(features.shape[1])

    @torch.jit.unused
    def train(self, mode: bool = True) -> "MetatomicModelBackbone":
        """The wrapped module always runs in evaluation mode: exported models may
        compute something else in training mode (metatrain models then leave out
        their composition baseline and scaling, which their own trainer handles)."""
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, systems: List[System]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-atom features ``(n_atoms, F)`` and energies ``(n_atoms,)``, eV, in the
        order of the atoms of ``systems`` (concatenated)."""
        results = self.module(systems, self.outputs, None)
        energy = _per_atom_values(results["energy"], systems)
        features = _per_atom_values(results[self.features_output], systems)
        return features, energy[:, 0]

    def check_atomic_types(self, atomic_types: List[int], source: str) -> None:
        """Every atomic type of the data must be known to the model."""
        unknown = sorted(set(atomic_types) - set(self.atomic_types))
        if unknown:
            raise MetatomicModelError(
                f"the data in {source} has atomic types {unknown} that the model "
                f"'{self.model_name}' does not know (it has {self.atomic_types})"
            )


def _per_atom_values(tensor: TensorMap, systems: List[System]) -> torch.Tensor:
    """Values of a per-atom single-block output, reordered to the atoms' order."""
    block = tensor.block()
    values = block.values.reshape(block.values.shape[0], -1)
    samples = block.samples.values.to(torch.long)
    offsets = [0]
    for system in systems:
        offsets.append(offsets[-1] + len(system))
    offset = torch.tensor(offsets[:-1], dtype=torch.long, device=values.device)
    index = offset.index_select(0, samples[:, 0]) + samples[:, 1]
    if values.shape[0] != offsets[-1]:
        raise ValueError("the wrapped model did not return a value for every atom")
    ordered = torch.zeros_like(values).index_copy(0, index, values)
    return ordered


def batch_to_systems(
    batch: "Batch", positions: torch.Tensor, options: List[NeighborListOptions]
) -> List[System]:
    """metatomic ``System`` objects of a :py:class:`~shallow_ensemble.data.Batch`,
    with the neighbour lists in ``options`` (computed by vesin, differentiable with
    respect to ``positions``).

    :param positions: the batch's positions, ``(n_atoms, 3)``; slices of it become
        the systems' positions, so gradients flow back to it
    """
    from vesin.metatomic import NeighborList

    if batch.cell is None:
        raise ValueError("the batch has no cells: build it with `collate`")
    systems = []
    start = 0
    for i, n in enumerate(batch.n_atoms.tolist()):
        cell = batch.cell[i].to(positions.dtype)
        systems.append(
            System(
                types=batch.numbers[start : start + n].to(torch.int32),
                positions=positions[start : start + n],
                cell=cell,
                pbc=torch.any(cell != 0, dim=1),
            )
        )
        start += n
    for option in options:
        NeighborList(option, "angstrom").add_neighbor_list(systems)
    return systems
