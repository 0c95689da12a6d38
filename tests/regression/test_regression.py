"""Seeded outputs at initialisation and after training, stored as numbers.

The training run has one warm-up (MSE) epoch and two NLL epochs, with two
validation batches; the selected model must be one of the NLL epochs.

A change here means the numbers a user gets changed: intended (then regenerate the
values with ``python tests/regression/test_regression.py`` and say why in the
changelog) or not (then find out why).
"""

import json

import ase.io
import torch

from conftest import ETHANOL, graph_of, make_model, tiny_config
from shallow_ensemble.training import train


INITIAL = [-0.7277127200656548, -3.71536303410726, -1.018203285384741]
TRAINED_MEMBERS = [-4209.502715120798, -4209.573133956481, -4209.696265155406]
TRAINED_CALIBRATION = {
    "alpha_energy": 2.5572575084668623,
    "alpha_forces": 7.520319331702881,
    "alpha_atom": 4.849599884246488,
    "sigma0_energy": 0.0,
    "sigma0_atom": 0.0,
    "sigma0_forces": {
        "H": 0.5512865252319701,
        "C": 1.45043751371132,
        "O": 0.9453116865778403,
    },
    "floor_scale_energy": 1.0,
    "floor_scale_atom": 1.0,
    "floor_scale_forces": 0.8379749560142814,
}


def initial_energies():
    model = make_model([1, 6, 8], num_members=3, seed=7)
    atoms = ase.io.read(ETHANOL, "0")
    positions, centers, neighbors, shifts, numbers = graph_of(
        atoms, model.backbone.cutoff
    )
    vectors = positions[neighbors] - positions[centers] + shifts
    species = model.species_index(numbers)
    return model(vectors, centers, neighbors, species).sum(dim=0).detach()


def trained_energies(folder):
    frames = ase.io.read(ETHANOL, ":")
    ase.io.write(folder / "train.xyz", frames[:12])
    ase.io.write(folder / "valid.xyz", frames[150:158])
    config = tiny_config(
        folder,
        model={"num_members": 3},
        strategy="energy_force_nll",
        epochs=3,
        warmup_epochs=1,
        batch_size=4,
        seed=3,
    )
    result = train(config, folder / "run", progress=False)
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    assert metrics["best_epoch"] in (2, 3), metrics["best_epoch"]
    model = result.model
    atoms = frames[150]
    positions, centers, neighbors, shifts, numbers = graph_of(
        atoms, model.backbone.cutoff
    )
    vectors = positions[neighbors] - positions[centers] + shifts
    species = model.species_index(numbers)
    members = model(vectors, centers, neighbors, species).sum(dim=0).detach()
    return members, result.calibration


def test_initial_outputs():
    expected = torch.tensor(INITIAL, dtype=torch.float64)
    torch.testing.assert_close(initial_energies(), expected, rtol=1e-9, atol=1e-9)


def test_outputs_after_training(tmp_path):
    members, calibration = trained_energies(tmp_path)
    torch.testing.assert_close(
        members,
        torch.tensor(TRAINED_MEMBERS, dtype=torch.float64),
        rtol=1e-8,
        atol=1e-8,
    )
    for key, value in TRAINED_CALIBRATION.items():
        if isinstance(value, dict):  # the force floors by element
            assert calibration[key].keys() == value.keys()
            for element, floor in value.items():
                assert abs(calibration[key][element] - floor) < 1e-6 * floor, element
        else:
            assert abs(calibration[key] - value) <= 1e-6 * abs(value), key


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    torch.set_printoptions(precision=12)
    print("INITIAL =", initial_energies().tolist())
    members, calibration = trained_energies(Path(tempfile.mkdtemp()))
    print("TRAINED_MEMBERS =", members.tolist())
    print("TRAINED_CALIBRATION =", calibration)
