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
) -> Tuple[Dict[str, TensorMap], List[System]]:
    """Evaluate ``model`` on ``frames``.

    :param outputs: output name -> ``"system"`` or ``"atom"``
    :return: (``dict`` of output TensorMaps, list of metatomic systems)
    """
    dtype = getattr(torch, model.capabilities().dtype)
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


def predict_frames(
    model: AtomisticModel,
    frames: list[ase.Atoms],
    forces: bool = True,
    energy_ref: torch.Tensor | None = None,
    forces_ref: torch.Tensor | None = None,
) -> EnsemblePredictions:
    """Calibrated member energies and member forces from an exported model.

    Member forces are gradients of each member energy (one backward pass per member:
    this is the engines' route, slower than the batched one used in training).
    :param energy_ref: reference energies ``(n_frames,)``, eV, if known
    :param forces_ref: reference forces ``(n_atoms_total, 3)``, eV/angstrom, if known
    """
    energies, atomic, member_forces, system_index = [], [], [], []
    for i, frame in enumerate(frames):
        results, systems = run_model(
            model,
            [frame],
            {"energy_ensemble": "atom"},
            positions_requires_grad=forces,
        )
        per_atom = results["energy_ensemble"].block().values
        total = per_atom.sum(dim=0)
        if forces:
            position = systems[0].positions
            grads = [
                torch.autograd.grad(total[k], position, retain_graph=True)[0]
                for k in range(total.shape[0])
            ]
            member_forces.append(-torch.stack(grads).detach().double())
        energies.append(total.detach().double())
        atomic.append(per_atom.detach().double())
        system_index.append(torch.full((len(frame),), i, dtype=torch.long))

    return EnsemblePredictions(
        energies=torch.stack(energies),
        energy_ref=energy_ref,
        n_atoms=torch.tensor([len(f) for f in frames]),
        atomic=torch.cat(atomic),
        forces=torch.cat(member_forces, dim=1) if forces else None,
        forces_ref=forces_ref if forces else None,
        system_index=torch.cat(system_index),
    )
