"""Export a trained ensemble as a metatomic ``AtomisticModel`` (TorchScript).

The exported model declares ``energy`` (ensemble mean), ``energy_uncertainty``
(calibrated standard deviation) and ``energy_ensemble`` (calibrated members), all
available per system and per atom. LAMMPS, i-PI, ASE and C++ code run it directly;
forces and stress come from the engine's autograd of ``energy`` (member forces from
``energy_ensemble``).
"""

import copy
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelMetadata,
    ModelOutput,
    System,
)

from ..kinds import CALIBRATION_BUFFERS, ModelKind, calibrate_members


REFERENCES = {
    "architecture": [
        "M. Kellner, M. Ceriotti, 'Uncertainty quantification by direct propagation "
        "of shallow ensembles', Mach. Learn.: Sci. Technol. 5, 035006 (2024)",
        "https://arxiv.org/abs/2602.15747 (How to train a shallow ensemble, 2026)",
        "F. Bigi, S. Chong, M. Ceriotti, F. Grasselli, 'A prediction rigidity "
        "formalism for low-cost uncertainties in trained neural networks', Mach. "
        "Learn.: Sci. Technol. 5, 045018 (2024)",
    ],
}

OUTPUT_NAMES = ["energy", "energy_uncertainty", "energy_ensemble"]

#: per-atom last-layer features (the name metatrain uses), on which the heads act
LAST_LAYER_FEATURES = "mtt::aux::energy_last_layer_features"


class ExportedEnsemble(torch.nn.Module):
    """The TorchScript module inside the exported model (see module docstring).

    It runs the model kind's :py:meth:`~shallow_ensemble.kinds.ModelKind.
    exported_module` (per-atom member energies and features of the systems; it
    declares the neighbour lists it needs), then applies the calibration and builds
    the outputs, the same for every kind.

    Per-atom outputs and per-system sums only cover ``selected_atoms`` when given
    (the other atoms, e.g. ghosts of a domain decomposition, are neighbours only).
    The per-system uncertainty is the spread of the summed member energies, so a
    per-atom uncertainty and a per-system ensemble can be asked for in one call.
    """

    # the model's calibration factors, buffers registered in ``__init__``
    alpha_energy: torch.Tensor
    alpha_forces: torch.Tensor
    alpha_atom: torch.Tensor
    sigma0_energy: torch.Tensor
    sigma0_atom: torch.Tensor
    sigma0_forces: torch.Tensor
    floor_scale_energy: torch.Tensor
    floor_scale_atom: torch.Tensor
    floor_scale_forces: torch.Tensor

    def __init__(self, model: ModelKind) -> None:
        super().__init__()
        self.model = model.exported_module()
        self.num_members = model.num_members
        for name in CALIBRATION_BUFFERS:
            self.register_buffer(name, getattr(model, name).detach().clone())

    def forward(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> Dict[str, TensorMap]:
        if len(outputs) == 0:
            return {}
        for name in outputs.keys():
            if name not in [
                "energy",
                "energy_uncertainty",
                "energy_ensemble",
                "mtt::aux::energy_last_layer_features",
            ]:
                raise ValueError(f"this model can not compute the '{name}' output")

        atomic, features, sys_idx, atom_idx = self.atomic_outputs(systems)
        ensemble, atom_std = calibrate_members(
            atomic,
            self.alpha_energy,
            self.alpha_forces,
            self.alpha_atom,
            self.sigma0_atom,
            self.floor_scale_atom,
        )
        mean = atomic.mean(dim=1)

        if selected_atoms is not None:
            keep = self._selection_mask(sys_idx, atom_idx, selected_atoms)
            sys_idx = sys_idx[keep]
            atom_idx = atom_idx[keep]
            ensemble = ensemble[keep]
            atom_std = atom_std[keep]
            mean = mean[keep]
            features = features[keep]

        n_systems = len(systems)
        device = atomic.device
        result: Dict[str, TensorMap] = {}
        for name, request in outputs.items():
            per_atom = request.sample_kind == "atom"
            if name == "energy":
                values = mean.unsqueeze(-1)
            elif name == "energy_ensemble":
                values = ensemble
            elif name == "mtt::aux::energy_last_layer_features":
                values = features
            else:
                values = atom_std.unsqueeze(-1)
            if per_atom:
                samples = Labels(
                    ["system", "atom"],
                    torch.stack([sys_idx, atom_idx], dim=1).to(torch.int32),
                )
            else:
                if name == "energy_uncertainty":
                    summed = torch.zeros(
                        (n_systems, ensemble.shape[1]),
                        dtype=ensemble.dtype,
                        device=device,
                    ).index_add(0, sys_idx, ensemble)
                    spread = (
                        summed.std(dim=1, keepdim=True)
                        if summed.shape[1] > 1
                        else (torch.zeros_like(summed[:, :1]))
                    )
                    # the energy noise floor is per atom (of those selected)
                    n_atoms = torch.zeros(
                        (n_systems, 1), dtype=ensemble.dtype, device=device
                    ).index_add(0, sys_idx, torch.ones_like(ensemble[:, :1]))
                    values = torch.sqrt(
                        (self.floor_scale_energy * spread) ** 2
                        + (n_atoms * self.sigma0_energy) ** 2
                    )
                else:
                    values = torch.zeros(
                        (n_systems, values.shape[1]), dtype=values.dtype, device=device
                    ).index_add(0, sys_idx, values)
                samples = Labels(
                    ["system"],
                    torch.arange(n_systems, dtype=torch.int32, device=device).reshape(
                        -1, 1
                    ),
                )
            n_props = values.shape[1]
            properties = Labels(
                [
                    "feature"
                    if name == "mtt::aux::energy_last_layer_features"
                    else "energy"
                ],
                torch.arange(n_props, dtype=torch.int32, device=device).reshape(-1, 1),
            )
            block = TensorBlock(
                values=values, samples=samples, components=[], properties=properties
            )
            keys = Labels(["_"], torch.zeros((1, 1), dtype=torch.int32, device=device))
            result[name] = TensorMap(keys, [block])
        return result

    def atomic_outputs(
        self, systems: List[System]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-atom member energies ``(n_atoms, M)``, last-layer features, and the
        system and atom index of each atom."""
        atomic, features = self.model(systems)
        system_index: List[torch.Tensor] = []
        atom_index: List[torch.Tensor] = []
        for i_system, system in enumerate(systems):
            n_atoms = len(system)
            device = system.positions.device
            system_index.append(
                torch.full((n_atoms,), i_system, dtype=torch.long, device=device)
            )
            atom_index.append(torch.arange(n_atoms, device=device))
        return atomic, features, torch.cat(system_index), torch.cat(atom_index)

    def _selection_mask(
        self, sys_idx: torch.Tensor, atom_idx: torch.Tensor, selected: Labels
    ) -> torch.Tensor:
        """Boolean mask of the atoms listed in ``selected`` (``system``, ``atom``)."""
        values = selected.values.to(torch.long)
        sel_sys = values[:, selected.names.index("system")]
        sel_atom = values[:, selected.names.index("atom")]
        n_max = int(atom_idx.max()) + 1 if atom_idx.numel() > 0 else 1
        key = sys_idx * n_max + atom_idx
        wanted = sel_sys * n_max + sel_atom
        return torch.isin(key, wanted)


def capabilities(model: ModelKind, dtype: str) -> ModelCapabilities:
    outputs = {
        "energy": ModelOutput(
            unit="eV", sample_kind="atom", description="ensemble mean energy"
        ),
        "energy_uncertainty": ModelOutput(
            unit="eV",
            sample_kind="atom",
            description="calibrated standard deviation of the ensemble energy",
        ),
        "energy_ensemble": ModelOutput(
            unit="eV",
            sample_kind="atom",
            description=f"calibrated energies of the {model.num_members} members",
        ),
        LAST_LAYER_FEATURES: ModelOutput(
            sample_kind="atom",
            description="per-atom last-layer features shared by the heads (the "
            "energy is linear in them)",
        ),
    }
    return ModelCapabilities(
        outputs=outputs,
        atomic_types=list(model.atomic_types),
        interaction_range=float(model.cutoff),
        length_unit="angstrom",
        supported_devices=["cpu", "cuda"],
        dtype=dtype,
    )


def to_atomistic_model(
    model: ModelKind,
    dtype: str = "float64",
    name: str = "shallow-ensemble",
    description: str = "",
) -> AtomisticModel:
    """Wrap ``model`` (a copy, in ``dtype``) in a metatomic ``AtomisticModel``."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"`dtype` is '{dtype}' but must be 'float32' or 'float64'")
    with torch.no_grad():  # copies of TorchScript parameters would not be leaves
        model = copy.deepcopy(model)
    model = model.to(dtype=getattr(torch, dtype), device="cpu").eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    module = ExportedEnsemble(model).eval()
    metadata = ModelMetadata(
        name=name,
        description=description
        or (
            f"shallow ensemble of {model.num_members} heads on {model.describe()}, "
            f"calibrated on validation data ({_calibration_text(model)}); outputs "
            "energy, energy_uncertainty and energy_ensemble"
        ),
        authors=["shallow-ensemble"],
        references=REFERENCES,
    )
    return AtomisticModel(module, metadata, capabilities(model, dtype))


def _calibration_text(model: ModelKind) -> str:
    """The calibration factors and noise floors, for the model's description."""
    from ase.data import chemical_symbols

    floors = model.noise_floors()
    text = (
        f"alpha_energy {float(model.alpha_energy):.4g}, alpha_forces "
        f"{float(model.alpha_forces):.4g}, alpha_atom {float(model.alpha_atom):.4g}"
    )
    if floors.energy > 0 or floors.atom > 0 or floors.forces:
        forces = ", ".join(
            f"{chemical_symbols[z]} {value:.3g}"
            for z, value in sorted(floors.forces.items())
        )
        text += (
            f"; noise floors (uncertainty^2 = (scale * calibrated spread)^2 + "
            f"floor^2): energy {floors.energy:.3g} eV/atom with scale "
            f"{floors.energy_scale:.3g}, per-atom energy {floors.atom:.3g} eV with "
            f"scale {floors.atom_scale:.3g}, forces {forces or 'none'} eV/Å with "
            f"scale {floors.forces_scale:.3g} (the members: stretched by the "
            "alphas, no floor)"
        )
    return text


def export_model(
    model: ModelKind,
    path: str | Path,
    dtype: str = "float64",
    extensions_directory: str | Path | None = None,
) -> Path:
    """Export to ``path``.

    The built-in model kinds are plain TorchScript: engines load the file alone. A
    backbone using compiled TorchScript extensions would get them collected in
    ``extensions_directory`` (default: ``extensions/`` next to ``path``), which engines
    then need to be given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if extensions_directory is None:
        extensions_directory = path.parent / "extensions"
    atomistic = to_atomistic_model(model, dtype=dtype)
    atomistic.save(str(path), collect_extensions=str(extensions_directory))
    extensions = Path(extensions_directory)
    if extensions.is_dir() and not any(extensions.iterdir()):
        extensions.rmdir()  # the built-in backbones need no compiled extension
    return path
