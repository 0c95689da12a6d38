"""A new backbone (``tiny_backbone.py``, registered as the kind ``pair_gaussians``)
goes through training, export and ASE molecular dynamics with nothing but the
contract: the package knows nothing about it."""

import ase.io
import numpy as np
import pytest
import torch
from ase import units
from ase.md.verlet import VelocityVerlet
from metatomic_ase import MetatomicCalculator
from tiny_backbone import PairGaussiansModel

from conftest import ETHANOL, tiny_config, write_ethanol_split
from shallow_ensemble.data import GraphDataset, collate, read_structures
from shallow_ensemble.export import export_model
from shallow_ensemble.export.predict import load_exported, run_model
from shallow_ensemble.training import load_model, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_ethanol_split(tmp_path_factory.mktemp("data"), 12, (100, 106))


def test_train_export_and_run_md(data, tmp_path):
    config = tiny_config(
        data, model={"kind": "pair_gaussians"}, strategy="energy_force_nll", epochs=2
    )
    result = train(config, tmp_path / "run", progress=False)
    model = load_model(result.checkpoint)
    assert isinstance(model, PairGaussiansModel) and model.num_members == 4
    assert result.calibration["alpha_forces"] > 0

    path = export_model(model, tmp_path / "model.pt")
    atoms = ase.io.read(ETHANOL, "0")
    atoms.calc = MetatomicCalculator(str(path), uncertainty_threshold=None)
    VelocityVerlet(atoms, 0.5 * units.fs).run(5)
    assert np.isfinite(atoms.get_potential_energy())
    assert np.isfinite(atoms.get_forces()).all()
    results, _ = run_model(
        load_exported(path), [atoms], {"energy_uncertainty": "system"}
    )
    assert float(results["energy_uncertainty"].block().values[0, 0]) > 0


def test_deep_ensemble_of_the_new_backbone(data, tmp_path):
    config = tiny_config(
        data,
        model={"kind": "pair_gaussians", "num_members": 2},
        strategy="deep_ensemble",
        epochs=1,
        warmup_epochs=0,
    )
    result = train(config, tmp_path / "run", progress=False)
    model = load_model(result.checkpoint)
    assert model.kind == "stacked" and model.member_kind == "pair_gaussians"
    # member k of the stacked model is the k-th trained model
    batch = collate(GraphDataset(read_structures(data / "valid.xyz"), 3.5).graphs)
    energies = model.predict(batch).energies.detach()
    for k in range(2):
        member = load_model(tmp_path / "run" / "members" / f"{k:02d}" / "model.ckpt")
        expected = member.predict(batch).energies.detach()[:, 0]
        torch.testing.assert_close(energies[:, k], expected, rtol=1e-12, atol=1e-10)
    assert float((energies[:, 0] - energies[:, 1]).abs().max()) > 1e-6
    results, _ = run_model(
        load_exported(export_model(model, tmp_path / "model.pt")),
        ase.io.read(ETHANOL, "100:102"),
        {"energy_uncertainty": "system"},
    )
    assert bool((results["energy_uncertainty"].block().values > 0).all())
