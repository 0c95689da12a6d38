"""``selected_atoms`` over several systems at once, per-atom and per-system outputs.

With calibration factors ``alpha_energy``, ``alpha_atom`` and uncalibrated per-atom
member energies ``e_ik`` (atom ``i``, member ``k``), the exported model returns, for
the selected atoms only (the others are neighbours):

- per atom: ``energy`` = mean_k e_ik, ``energy_ensemble`` = that mean +
  ``alpha_energy`` (e_ik - mean), ``energy_uncertainty`` = ``alpha_atom`` std_k e_ik;
- per system: the sums over the selected atoms of the system of ``energy`` and
  ``energy_ensemble``, and ``energy_uncertainty`` = ``alpha_energy`` std_k of
  sum_i e_ik (the spread of the summed calibrated members).
"""

import ase
import numpy as np
import pytest
import torch
from metatensor.torch import Labels

from conftest import graph_of, make_model
from shallow_ensemble.export import export_model
from shallow_ensemble.export.predict import load_exported, run_model


ALPHAS = {"alpha_energy": 1.3, "alpha_forces": 0.7, "alpha_atom": 2.1}
FEATURES = "mtt::aux::energy_last_layer_features"
PER_ATOM = ["energy", "energy_ensemble", "energy_uncertainty", FEATURES]
PER_SYSTEM = ["energy", "energy_ensemble", "energy_uncertainty"]


@pytest.fixture(scope="module")
def model():
    model = make_model([1, 6, 8], num_members=4, seed=11)
    for key, value in ALPHAS.items():
        getattr(model, key).fill_(value)
    return model


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    path = export_model(model, tmp_path_factory.mktemp("export") / "model.pt")
    return load_exported(path)


@pytest.fixture(scope="module")
def systems(ethanol_frames):
    """Three systems of 9, 16 (periodic) and 9 atoms."""
    rng = np.random.default_rng(3)
    box = ase.Atoms(
        numbers=[8, 1, 1, 6] * 4,
        positions=rng.uniform(0, 5.0, (16, 3)),
        cell=np.eye(3) * 5.0,
        pbc=True,
    )
    return [ethanol_frames[0], box, ethanol_frames[3]]


def eager(model, atoms):
    """Uncalibrated per-atom member energies and last-layer features."""
    positions, centers, neighbors, shifts, numbers = graph_of(
        atoms, model.backbone.cutoff
    )
    vectors = positions[neighbors] - positions[centers] + shifts
    species = model.species_index(numbers)
    with torch.no_grad():
        features = model.backbone(vectors, centers, neighbors, species)
        return model.head(features, species), features


def labels(selection):
    rows = [[s, a] for s, atoms in enumerate(selection) for a in atoms]
    return Labels(["system", "atom"], torch.tensor(rows, dtype=torch.int32))


def values(results, name):
    return results[name].block().values


@pytest.mark.parametrize(
    "selection",
    [
        [[0, 3, 4, 8], [1, 2, 5, 7, 10, 11, 15], [6]],
        [[8, 2], [], [0, 1, 2, 3, 4, 5, 6, 7, 8]],
    ],
    ids=["all-systems", "one-system-empty"],
)
def test_selected_atoms_over_several_systems(model, exported, systems, selection):
    alpha_energy, alpha_atom = ALPHAS["alpha_energy"], ALPHAS["alpha_atom"]
    selected = labels(selection)
    # outputs list the selected atoms in system order, then atom order
    selection = [sorted(atoms) for atoms in selection]
    per_atom, _ = run_model(
        exported, systems, {n: "atom" for n in PER_ATOM}, selected_atoms=selected
    )
    per_system, _ = run_model(
        exported, systems, {n: "system" for n in PER_SYSTEM}, selected_atoms=selected
    )
    full, _ = run_model(exported, systems, {n: "atom" for n in PER_ATOM})

    # per-atom outputs: the selected rows of the full outputs, in order
    for name in PER_ATOM:
        block = per_atom[name].block()
        assert block.samples == labels(selection), name
        full_block = full[name].block()
        rows = [
            full_block.samples.position([s, a])
            for s, atoms in enumerate(selection)
            for a in atoms
        ]
        torch.testing.assert_close(block.values, full_block.values[rows])

    start = 0
    for s, (atoms, chosen) in enumerate(zip(systems, selection, strict=True)):
        members, features = eager(model, atoms)
        index = torch.tensor(chosen, dtype=torch.long)
        members, features = members[index], features[index]
        mean = members.mean(dim=1, keepdim=True)
        rows = slice(start, start + len(chosen))
        start += len(chosen)

        # ... and they are the calibrated per-atom quantities of the eager model
        if chosen:
            ensemble = mean + alpha_energy * (members - mean)
            torch.testing.assert_close(values(per_atom, "energy")[rows], mean)
            torch.testing.assert_close(
                values(per_atom, "energy_ensemble")[rows], ensemble
            )
            torch.testing.assert_close(
                values(per_atom, "energy_uncertainty")[rows, 0],
                alpha_atom * members.std(dim=1),
            )
            torch.testing.assert_close(values(per_atom, FEATURES)[rows], features)

        # per system: sums over the selected atoms
        torch.testing.assert_close(
            values(per_system, "energy_ensemble")[s],
            values(per_atom, "energy_ensemble")[rows].sum(dim=0),
        )
        torch.testing.assert_close(values(per_system, "energy")[s, 0], mean.sum())
        summed = members.sum(dim=0)
        expected_std = alpha_energy * summed.std() if chosen else summed.new_zeros(())
        torch.testing.assert_close(
            values(per_system, "energy_uncertainty")[s, 0], expected_std
        )
        # the per-system uncertainty is the spread of the per-system ensemble
        torch.testing.assert_close(
            values(per_system, "energy_uncertainty")[s, 0],
            values(per_system, "energy_ensemble")[s].std(),
        )
    assert per_system["energy"].block().samples.values[:, 0].tolist() == [0, 1, 2]
