"""Run an exported (or in-memory) metatomic model on ASE structures from Python."""

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import ase
import torch
from metatensor.torch import Labels, TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelEvaluationOptions,
    ModelOutput,
    System,
    load_atomistic_model,
    systems_to_torch,
)
from vesin.metatomic import neighbor_lists_for_model

from ..calibration.noise_floor import NoiseFloors
from ..calibration.predictions import EnsemblePredictions


def load_exported(
    path: str | Path, extensions_directory: str | Path | None = None
) -> AtomisticModel:
    """Load an exported model; extensions default to the folder beside the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist")
    if extensions_directory is None and (path.parent / "extensions").is_dir():
        extensions_directory = path.parent / "extensions"
    return load_atomistic_model(
        str(path),
        extensions_directory=None
        if extensions_directory is None
        else str(extensions_directory),
    )


def run_model(
    model: AtomisticModel,
    frames: list[ase.Atoms],
    outputs: dict[str, str],
    selected_atoms: Optional[Labels] = None,
    positions_requires_grad: bool = False,
    check_consistency: bool = True,
    systems: Optional[List[System]] = None,
) -> Tuple[Dict[str, TensorMap], List[System]]:
    """Evaluate ``model`` on ``frames``.

    :param outputs: output name -> ``"system"`` or ``"atom"``
    :param systems: the systems of ``frames`` if already built (e.g. strained, see
        :py:func:`strained_system`), in the model's dtype
    :return: (``dict`` of output TensorMaps, list of metatomic systems)
    """
    dtype = getattr(torch, model.capabilities().dtype)
    if systems is None:
        systems = systems_to_torch(
            frames, dtype=dtype, positions_requires_grad=positions_requires_grad
        )
    for calculator in neighbor_lists_for_model("angstrom", model, "angstrom"):
        calculator.add_neighbor_list(systems)
    options = ModelEvaluationOptions(
        length_unit="angstrom",
        outputs={
            name: ModelOutput(unit="eV", sample_kind=kind)
            for name, kind in outputs.items()
        },
        selected_atoms=selected_atoms,
    )
    results: dict[str, TensorMap] = model(systems, options, check_consistency)
    return results, systems


def strained_system(
    frame: ase.Atoms, model: AtomisticModel, strain: bool, grad: bool = True
) -> Tuple[System, List[torch.Tensor]]:
    """The metatomic system of ``frame`` whose positions (and, with ``strain``, a
    homogeneous strain of positions and cell) require gradients (nothing does
    without ``grad``).

    :return: the system and the tensors to differentiate with respect to: the
        positions, then the strain ``(3, 3)`` (its gradient is the volume times the
        stress)
    """
    dtype = getattr(torch, model.capabilities().dtype)
    (system,) = systems_to_torch([frame], dtype=dtype, positions_requires_grad=grad)
    if not strain or not grad:
        return system, [system.positions]
    positions = system.positions
    displacement = torch.zeros((3, 3), dtype=dtype, requires_grad=True)
    deformation = torch.eye(3, dtype=dtype) + displacement
    strained = System(
        types=system.types,
        positions=positions @ deformation,
        cell=system.cell @ deformation,
        pbc=system.pbc,
    )
    return strained, [positions, displacement]


def predict_frames(
    model: AtomisticModel,
    frames: list[ase.Atoms],
    forces: bool = True,
    energy_ref: torch.Tensor | None = None,
    forces_ref: torch.Tensor | None = None,
    stress_ref: torch.Tensor | None = None,
    stress_mask: torch.Tensor | None = None,
) -> EnsemblePredictions:
    """Calibrated member energies and member forces from an exported model, with
    the model's noise floors (:py:func:`exported_floors`).

    Member forces are gradients of each member energy (one backward pass per member:
    this is the engines' route, slower than the batched one used in training).
    Member stresses, for the frames in ``stress_mask``, are the gradients of each
    member energy with respect to a homogeneous strain of positions and cell, over
    the volume (as the engines compute the stress of the mean energy).

    :param energy_ref: reference energies ``(n_frames,)``, eV, if known
    :param forces_ref: reference forces ``(n_atoms_total, 3)``, eV/angstrom, if known
    :param stress_ref: reference stresses ``(n_frames, 3, 3)``, eV/Å³ (zeros where
        ``stress_mask`` is ``False``), if any frame has one
    :param stress_mask: ``(n_frames,)``, which frames have a reference stress
    """
    energies, atomic, member_forces, system_index = [], [], [], []
    member_stress = []
    for i, frame in enumerate(frames):
        with_stress = forces and stress_mask is not None and bool(stress_mask[i])
        system, inputs = strained_system(frame, model, with_stress, grad=forces)
        results, systems = run_model(
            model, [frame], {"energy_ensemble": "atom"}, systems=[system]
        )
        per_atom = results["energy_ensemble"].block().values
        total = per_atom.sum(dim=0)
        if forces:
            grads = [
                torch.autograd.grad(total[k], inputs, retain_graph=True)
                for k in range(total.shape[0])
            ]
            member_forces.append(-torch.stack([g[0] for g in grads]).detach().double())
            volume = abs(float(torch.linalg.det(systems[0].cell.detach())))
            member_stress.append(
                torch.stack([g[1] for g in grads]).detach().double() / volume
                if with_stress
                else torch.zeros((total.shape[0], 3, 3), dtype=torch.float64)
            )
        energies.append(total.detach().double())
        atomic.append(per_atom.detach().double())
        system_index.append(torch.full((len(frame),), i, dtype=torch.long))

    has_stress = forces and stress_mask is not None and bool(stress_mask.any())
    return EnsemblePredictions(
        energies=torch.stack(energies),
        energy_ref=energy_ref,
        n_atoms=torch.tensor([len(f) for f in frames]),
        atomic=torch.cat(atomic),
        forces=torch.cat(member_forces, dim=1) if forces else None,
        forces_ref=forces_ref if forces else None,
        system_index=torch.cat(system_index),
        stress=torch.stack(member_stress, dim=1) if has_stress else None,
        stress_ref=stress_ref if has_stress else None,
        stress_mask=stress_mask if has_stress else None,
        numbers=torch.cat(
            [torch.as_tensor(f.numbers, dtype=torch.long) for f in frames]
        ),
        floors=exported_floors(model),
    )


def exported_floors(model: AtomisticModel) -> NoiseFloors:
    """The noise floors stored in an exported model (none for models exported
    before noise floors existed)."""
    if not hasattr(model.module, "floor_scale_forces"):
        return NoiseFloors()
    return NoiseFloors.from_buffers(model.module)
