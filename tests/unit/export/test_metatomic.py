"""The export of a SOAP-BPNN ensemble: selected atoms, output combinations,
predictions from the exported file, errors; the outputs of every kind (calibration,
member forces, TorchScript round trip) are checked in tests/contract."""

import pytest
import torch
from metatensor.torch import Labels

from conftest import graph_of, make_model
from shallow_ensemble.export import export_model
from shallow_ensemble.export.predict import load_exported, predict_frames, run_model


ALPHAS = {"alpha_energy": 1.7, "alpha_forces": 0.6, "alpha_atom": 2.5}


@pytest.fixture(scope="module")
def calibrated_model():
    model = make_model([1, 6, 8], num_members=5)
    for key, value in ALPHAS.items():
        getattr(model, key).fill_(value)
    return model


@pytest.fixture(scope="module")
def exported(calibrated_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.pt"
    export_model(calibrated_model, path)
    return path


def direct_members(model, atoms):
    """Uncalibrated per-atom member energies straight from the eager model."""
    positions, centers, neighbors, shifts, numbers = graph_of(
        atoms, model.backbone.cutoff
    )
    vectors = positions[neighbors] - positions[centers] + shifts
    return model(vectors, centers, neighbors, model.species_index(numbers)).detach()


def test_selected_atoms_sum_to_whole_system(exported, calibrated_model):
    """Two disjoint selections (as two domains of a decomposition) add up."""
    import ase

    model = load_exported(exported)
    import numpy as np

    rng = np.random.default_rng(3)
    atoms = ase.Atoms(
        numbers=[8, 1, 1, 6] * 4,
        positions=rng.uniform(0, 5.0, (16, 3)),
        cell=np.eye(3) * 5.0,
        pbc=True,
    )
    whole, _ = run_model(model, [atoms], {"energy_ensemble": "system"})
    per_atom_all, _ = run_model(model, [atoms], {"energy_ensemble": "atom"})
    first = list(range(0, 16, 2))
    second = list(range(1, 16, 2))
    parts = []
    for selection in (first, second):
        labels = Labels(
            ["system", "atom"],
            torch.tensor([[0, a] for a in selection], dtype=torch.int32),
        )
        part, _ = run_model(
            model, [atoms], {"energy_ensemble": "system"}, selected_atoms=labels
        )
        per_atom, _ = run_model(
            model, [atoms], {"energy_ensemble": "atom"}, selected_atoms=labels
        )
        block = per_atom["energy_ensemble"].block()
        assert block.samples.values[:, 1].tolist() == selection
        torch.testing.assert_close(
            block.values, per_atom_all["energy_ensemble"].block().values[selection]
        )
        torch.testing.assert_close(
            part["energy_ensemble"].block().values[0], block.values.sum(dim=0)
        )
        parts.append(part["energy_ensemble"].block().values[0])
    total = parts[0] + parts[1]
    torch.testing.assert_close(total, whole["energy_ensemble"].block().values[0])


def test_per_atom_uncertainty_with_per_system_ensemble(exported, ethanol_frames):
    model = load_exported(exported)
    frames = [ethanol_frames[5], ethanol_frames[6]]
    together, _ = run_model(
        model,
        frames,
        {"energy_uncertainty": "atom", "energy_ensemble": "system", "energy": "system"},
    )
    alone_ens, _ = run_model(model, frames, {"energy_ensemble": "system"})
    alone_unc, _ = run_model(model, frames, {"energy_uncertainty": "atom"})
    torch.testing.assert_close(
        together["energy_ensemble"].block().values,
        alone_ens["energy_ensemble"].block().values,
    )
    assert together["energy_ensemble"].block().values.shape == (2, 5)
    torch.testing.assert_close(
        together["energy_uncertainty"].block().values,
        alone_unc["energy_uncertainty"].block().values,
    )
    assert together["energy_uncertainty"].block().values.shape == (18, 1)


def test_predict_frames_matches_checkpoint_route(
    calibrated_model, exported, ethanol_frames
):
    model = load_exported(exported)
    frames = ethanol_frames[:3]
    predictions = predict_frames(model, frames)
    for i, atoms in enumerate(frames):
        members = direct_members(calibrated_model, atoms).sum(dim=0)
        mean = members.mean()
        torch.testing.assert_close(
            predictions.energies[i], mean + ALPHAS["alpha_energy"] * (members - mean)
        )
    assert predictions.forces.shape == (5, 27, 3)


def test_unknown_output_and_element_are_rejected(
    exported, silicon_frames, ethanol_frames
):
    model = load_exported(exported)
    with pytest.raises(Exception, match="non_conservative_forces|can not compute"):
        run_model(
            model,
            [ethanol_frames[0]],
            {"non_conservative_forces": "atom"},
            check_consistency=False,
        )
    with pytest.raises(Exception, match="14|atomic type"):
        run_model(
            model, [silicon_frames[0]], {"energy": "system"}, check_consistency=False
        )
