"""Shared fixtures: bundled structures, small models and graphs."""

from importlib import resources

import ase
import ase.io
import numpy as np
import pytest
import torch

from shallow_ensemble.backbones import SoapBpnn
from shallow_ensemble.config import config_from_dict
from shallow_ensemble.model import EnsembleModel


RESOURCES = resources.files("shallow_ensemble") / "resources"
ETHANOL = str(RESOURCES / "ethanol.xyz")
SILICON = str(RESOURCES / "silicon.xyz")

SMALL_HYPERS = {
    "cutoff": 3.5,
    "max_radial": 4,
    "max_angular": 3,
    "hidden_sizes": [24, 16],
}


TINY_MODEL = {
    "num_members": 4,
    "cutoff": 3.5,
    "max_radial": 3,
    "max_angular": 2,
    "hidden_sizes": [16, 8],
}


def tiny_config(folder, model=None, **training):
    """A quick float64 configuration on ``folder/{train,valid}.xyz``."""
    return config_from_dict(
        {
            "data": {
                "train": str(folder / "train.xyz"),
                "valid": str(folder / "valid.xyz"),
            },
            "model": {**TINY_MODEL, **(model or {})},
            "training": {
                "epochs": 2,
                "warmup_epochs": 1,
                "batch_size": 6,
                "dtype": "float64",
                **training,
            },
        }
    )


def make_model(atomic_types, num_members=4, seed=0, **hypers) -> EnsembleModel:
    """A small float64 model with non-trivial (random) weights and normalisation."""
    torch.manual_seed(seed)
    backbone = SoapBpnn(atomic_types, **{**SMALL_HYPERS, **hypers})
    model = EnsembleModel(backbone, num_members).to(torch.float64)
    with torch.no_grad():
        model.head.bias.normal_()
        model.head.composition.normal_()
        backbone.feature_scale.uniform_(0.5, 2.0)
        backbone.feature_shift.normal_(std=0.1)
    return model


def export_calibrated_model(folder, atomic_types, seed):
    """Export a small untrained float64 model with non-trivial weights and
    calibration factors (alpha_energy 1.3, alpha_forces 0.7, alpha_atom 2.1) to
    ``folder/model.pt``; return the path."""
    from shallow_ensemble.export import export_model

    torch.manual_seed(seed)
    backbone = SoapBpnn(
        atomic_types, cutoff=4.0, max_radial=4, max_angular=3, hidden_sizes=[16, 8]
    )
    model = EnsembleModel(backbone, 4).to(torch.float64)
    with torch.no_grad():
        model.alpha_energy.fill_(1.3)
        model.alpha_forces.fill_(0.7)
        model.alpha_atom.fill_(2.1)
        model.head.bias.normal_()
    return export_model(model, folder / "model.pt")


def assert_selected_atoms_sum_to_whole(model, atoms):
    """Ensemble energies of two halves of ``atoms`` (``selected_atoms``) add up to
    those of the whole structure (an exported model, loaded)."""
    from metatensor.torch import Labels

    from shallow_ensemble.export.predict import run_model

    whole, _ = run_model(model, [atoms], {"energy_ensemble": "system"})
    total = 0
    n = len(atoms)
    for selection in (range(0, n, 2), range(1, n, 2)):
        labels = Labels(["system", "atom"], torch.tensor([[0, a] for a in selection]))
        part, _ = run_model(
            model, [atoms], {"energy_ensemble": "system"}, selected_atoms=labels
        )
        total = total + part["energy_ensemble"].block().values
    torch.testing.assert_close(total, whole["energy_ensemble"].block().values)


def graph_of(atoms: ase.Atoms, cutoff: float, requires_grad: bool = False):
    """Positions, pair indices, cell shifts of a structure (full neighbour list)."""
    from vesin import NeighborList

    periodic = bool(np.all(atoms.pbc))
    box = atoms.cell.array if periodic else np.zeros((3, 3))
    i, j, shifts = NeighborList(cutoff=cutoff, full_list=True).compute(
        atoms.positions, box, periodic, "ijS"
    )
    positions = torch.tensor(atoms.positions, requires_grad=requires_grad)
    cell_shifts = torch.tensor(shifts, dtype=torch.float64) @ torch.tensor(box)
    return (
        positions,
        torch.tensor(i, dtype=torch.long),
        torch.tensor(j, dtype=torch.long),
        cell_shifts,
        torch.tensor(atoms.numbers, dtype=torch.long),
    )


@pytest.fixture(scope="session")
def ethanol_frames():
    return ase.io.read(ETHANOL, ":")


@pytest.fixture(scope="session")
def silicon_frames():
    return ase.io.read(SILICON, ":")
