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
