"""Training on stress, with data labelled here by ASE's EMT potential for copper
(energies, forces, stresses): the stress term lowers the stress error, evaluate
reports calibrated stress metrics that agree between the checkpoint and the exported
model, the ASE calculator's stress is the mean of the member stresses, and NPT
dynamics with the exported model relax an expanded cell to EMT's volume."""

import dataclasses

import ase
import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.nptberendsen import NPTBerendsen
from ase.md.velocitydistribution import thermalize_momenta
from ase.units import fs

from conftest import tiny_config
from shallow_ensemble.export import export_model
from shallow_ensemble.export.predict import load_exported, predict_frames
from shallow_ensemble.training import train
from shallow_ensemble.workflows import evaluate_model


def emt_frames(n: int, seed: int, with_stress: bool = True) -> list[ase.Atoms]:
    """Rattled 16-atom fcc copper cells with random strains of ~3%, labelled by EMT."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
        deformation = np.eye(3) + 0.03 * rng.standard_normal((3, 3))
        atoms.set_cell(atoms.cell @ deformation, scale_atoms=True)
        atoms.rattle(0.08, seed=int(rng.integers(2**31)))
        atoms.calc = EMT()
        atoms.get_potential_energy()
        if not with_stress:
            atoms.calc.results.pop("stress", None)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def copper(tmp_path_factory):
    """Train the mean (``mse``) with and without the stress term, and an ensemble
    (``energy_force_nll``, member stresses in the NLL) that is exported; 12 of the
    48 training frames have no stress (mixed data)."""
    folder = tmp_path_factory.mktemp("emt-copper")
    train_frames = emt_frames(36, 1) + emt_frames(12, 4, with_stress=False)
    ase.io.write(folder / "train.xyz", train_frames)
    ase.io.write(folder / "valid.xyz", emt_frames(16, 2))
    ase.io.write(folder / "test.xyz", emt_frames(16, 3))
    results = {}
    for name, strategy, weight in (
        ("mse", "mse", 1.0),
        ("mse-no-stress", "mse", 0.0),
        ("ensemble", "energy_force_nll", 1.0),
    ):
        config = tiny_config(
            folder,
            strategy=strategy,
            epochs=20,
            warmup_epochs=5 if strategy != "mse" else None,
            learning_rate=1e-2,
            stress_weight=weight,
        )
        config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, test=str(folder / "test.xyz"))
        )
        results[name] = train(config, folder / name, progress=False)
    export_model(results["ensemble"].model, folder / "model.pt")
    return folder, results


def test_the_stress_term_lowers_the_stress_error(copper):
    _, results = copper
    with_stress = results["mse"].metrics["test"]["stress"]
    without = results["mse-no-stress"].metrics["test"]["stress"]
    assert with_stress["n"] == without["n"] == 16 * 6
    # measured: 0.0057 vs 0.035 eV/A^3 (stresses of ~0.03 eV/A^3)
    assert with_stress["rmse"] < 0.5 * without["rmse"]
    assert "valid_stress_mse" in results["mse"].history[-1]
    assert not any("stress" in key for key in results["mse-no-stress"].history[-1])
    assert "valid_stress_nll" in results["ensemble"].history[-1]


def test_checkpoint_and_export_report_the_same_calibrated_stresses(copper):
    folder, results = copper
    reports = [
        evaluate_model(path, folder / "test.xyz").report["stress"]
        for path in (results["ensemble"].checkpoint, folder / "model.pt")
    ]
    assert reports[0]["n"] == reports[1]["n"] == 96
    for key in ("rmse", "nll", "alpha"):
        assert reports[0][key] == pytest.approx(reports[1][key], rel=1e-6), key
    # the training run's test metrics are the same calibrated predictions
    assert reports[0]["rmse"] == pytest.approx(
        results["ensemble"].metrics["test"]["stress"]["rmse"], rel=1e-9
    )


def test_frames_without_stress_are_left_out_of_the_stress_metrics(copper):
    folder, results = copper
    frames = emt_frames(4, 5, with_stress=False) + emt_frames(3, 6)
    ase.io.write(folder / "mixed.xyz", frames)
    for path in (results["ensemble"].checkpoint, folder / "model.pt"):
        # batches of 2: some batches have no stress at all, one has both kinds
        result = evaluate_model(path, folder / "mixed.xyz", batch_size=2)
        assert result.report["stress"]["n"] == 3 * 6
        assert result.report["forces"]["n"] == 7 * 16 * 3


def test_the_calculator_stress_is_the_mean_of_the_member_stresses(copper):
    from metatomic_ase import MetatomicCalculator

    folder, _ = copper
    atoms = ase.io.read(folder / "test.xyz", 0)
    bare = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
    model = load_exported(folder / "model.pt")
    members = predict_frames(
        model,
        [bare],
        stress_ref=torch.zeros((1, 3, 3), dtype=torch.float64),
        stress_mask=torch.tensor([True]),
    ).stress
    assert members is not None and members.shape == (4, 1, 3, 3)
    assert float(members.std(dim=0).max()) > 1e-5  # the members differ
    bare.calc = MetatomicCalculator(folder / "model.pt")
    np.testing.assert_allclose(
        bare.get_stress(voigt=False), members.mean(dim=0)[0].numpy(), atol=1e-10
    )


def npt_volumes(atoms: ase.Atoms, steps: int) -> np.ndarray:
    """Volumes along a Berendsen NPT run at 300 K and zero pressure."""
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dynamics = NPTBerendsen(
        atoms,
        timestep=2 * fs,
        temperature_K=300,
        pressure_au=0.0,
        taut=50 * fs,
        taup=200 * fs,
        compressibility_au=1.0,  # 1/(eV/A^3); copper's is ~1.1 (B = 140 GPa)
    )
    volumes = []
    dynamics.attach(lambda: volumes.append(atoms.get_volume()), interval=1)
    dynamics.run(steps)
    return np.array(volumes)


def test_npt_relaxes_an_expanded_cell_to_the_emt_volume(copper):
    from metatomic_ase import MetatomicCalculator

    folder, _ = copper
    start = bulk("Cu", "fcc", a=3.68, cubic=True).repeat(2)  # EMT's a0 is 3.59 A
    reference, model = start.copy(), start.copy()
    reference.calc = EMT()
    model.calc = MetatomicCalculator(folder / "model.pt")
    expected = npt_volumes(reference, 400)
    volumes = npt_volumes(model, 400)
    assert np.isfinite(model.positions).all()
    initial = start.get_volume()
    target = expected[-100:].mean()
    assert target < 0.95 * initial  # the cell does shrink under EMT
    # the model's cell shrinks as EMT's does: within 1.5% of its volume at the end
    assert volumes[-100:].mean() == pytest.approx(target, rel=0.015)
