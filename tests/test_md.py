""":py:mod:`shallow_ensemble.md`: real ASE molecular dynamics with an exported
model that logs its calibrated uncertainty and stops above a threshold."""

import csv

import ase.io
import numpy as np
import pytest
from ase import units
from ase.md.verlet import VelocityVerlet
from metatomic_ase import MetatomicCalculator

from conftest import ETHANOL, export_calibrated_model
from shallow_ensemble.errors import ShallowEnsembleError
from shallow_ensemble.export.predict import load_exported


try:  # ASE >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:
    from ase.md.velocitydistribution import (
        MaxwellBoltzmannDistribution as thermalize_momenta,
    )

from shallow_ensemble.md import (
    COLUMNS,
    ExtrapolationError,
    UncertaintyMonitor,
    measure_uncertainty,
    run_until_uncertain,
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return export_calibrated_model(tmp_path_factory.mktemp("md"), [1, 6, 8], seed=3)


def dynamics(model_path):
    atoms = ase.io.read(ETHANOL, index=0)
    atoms.calc = MetatomicCalculator(
        str(model_path), check_consistency=True, uncertainty_threshold=None
    )
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    return VelocityVerlet(atoms, timestep=0.5 * units.fs)


def read_log(path):
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    return rows[0], [[float(x) for x in row] for row in rows[1:]]


def test_high_threshold_runs_every_step(model_path, tmp_path):
    dyn = dynamics(model_path)
    monitor = UncertaintyMonitor(
        dyn,
        force_threshold=1e6,
        energy_threshold=1e6,
        log=tmp_path / "sigma.csv",
        snapshots=tmp_path / "uncertain.xyz",
    )
    assert run_until_uncertain(dyn, 20, monitor, interval=5) is None
    assert dyn.nsteps == 20
    header, rows = read_log(tmp_path / "sigma.csv")
    assert header == COLUMNS
    assert [row[0] for row in rows] == [0, 5, 10, 15, 20]
    np.testing.assert_allclose([row[1] for row in rows], [0, 2.5, 5, 7.5, 10])
    assert not (tmp_path / "uncertain.xyz").exists()
    # the last row is the final structure's uncertainty, also left in atoms.info
    final = measure_uncertainty(load_exported(model_path), dyn.atoms)
    np.testing.assert_allclose(
        rows[-1][2:], [final[name] for name in COLUMNS[2:]], rtol=1e-10
    )
    assert dyn.atoms.info["sigma_force_max"] == pytest.approx(final["max_force"])
    assert all(row[2] > 0 and row[4] > 0 for row in rows)
    # the structure moved: the uncertainty changed along the run
    assert len({row[2] for row in rows}) == len(rows)


def test_threshold_below_the_first_frame_stops_at_once(model_path, tmp_path):
    dyn = dynamics(model_path)
    start = dyn.atoms.copy()
    sigma0 = measure_uncertainty(load_exported(model_path), dyn.atoms)["max_force"]
    threshold = 0.99 * sigma0
    monitor = UncertaintyMonitor(
        dyn,
        force_threshold=threshold,
        log=tmp_path / "sigma.csv",
        snapshots=tmp_path / "uncertain.xyz",
    )
    record = run_until_uncertain(dyn, 20, monitor, interval=5)
    assert record is not None and record.step == 0
    assert dyn.nsteps == 0
    assert record.max_force == pytest.approx(sigma0) and record.max_force > threshold
    _, rows = read_log(tmp_path / "sigma.csv")
    assert len(rows) == 1
    snapshots = ase.io.read(tmp_path / "uncertain.xyz", ":")
    assert len(snapshots) == 1
    np.testing.assert_allclose(snapshots[0].positions, start.positions)
    assert snapshots[0].info["md_step"] == 0
    assert snapshots[0].info["sigma_force_max"] > threshold

    # attached by hand, the monitor raises; without `stop` it only snapshots
    dyn = dynamics(model_path)
    dyn.attach(UncertaintyMonitor(dyn, force_threshold=threshold), interval=5)
    with pytest.raises(ExtrapolationError, match="above the threshold"):
        dyn.run(10)
    dyn = dynamics(model_path)
    keep_going = UncertaintyMonitor(
        dyn,
        force_threshold=threshold,
        snapshots=tmp_path / "all.xyz",
        stop=False,
        model=model_path,
    )
    assert run_until_uncertain(dyn, 10, keep_going, interval=5) is None
    above = [r for r in keep_going.records if r.max_force > threshold]
    assert len(ase.io.read(tmp_path / "all.xyz", ":")) == len(above) >= 1


def test_atom_energy_threshold_is_the_calculators(model_path):
    """``max_atom_energy`` is the largest per-atom ``energy_uncertainty`` that the
    ASE calculator (and i-PI, LAMMPS) compare with ``uncertainty_threshold``."""
    from metatomic.torch import ModelOutput

    dyn = dynamics(model_path)
    output = ModelOutput(unit="eV", sample_kind="atom")
    per_atom = dyn.atoms.calc.run_model(dyn.atoms, {"energy_uncertainty": output})
    largest = float(per_atom["energy_uncertainty"].block().values.max())
    monitor = UncertaintyMonitor(dyn, atom_energy_threshold=0.99 * largest)
    record = run_until_uncertain(dyn, 10, monitor, interval=5)
    assert record is not None and record.step == 0
    assert record.max_atom_energy == pytest.approx(largest, rel=1e-10)
    assert dyn.atoms.info["sigma_atom_energy_max"] == pytest.approx(largest)


def test_monitor_errors(model_path):
    dyn = dynamics(model_path)
    with pytest.raises(ShallowEnsembleError, match="`force_threshold` is 0"):
        UncertaintyMonitor(dyn, force_threshold=0)
    with pytest.raises(ShallowEnsembleError, match="`interval` is 0"):
        run_until_uncertain(dyn, 10, UncertaintyMonitor(dyn), interval=0)
    dyn.atoms.calc = None
    with pytest.raises(ShallowEnsembleError, match="no model"):
        UncertaintyMonitor(dyn)
