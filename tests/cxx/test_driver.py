"""The C++ inference driver (cxx/) against the Python route, on exported models.

The driver is configured and built once per session into ``build/cxx-tests`` at the
repository root (kept between sessions, so later runs only re-link what changed;
test_unit_tests.py builds the Catch2 unit tests there too). These tests skip only when
cmake or a C++ compiler is missing (and fail then under
SHALLOW_ENSEMBLE_REQUIRE_ENGINES=1).
"""

import json
import os
import subprocess

import ase.io
import numpy as np
import pytest
import torch
from metatensor.torch import Labels

from cmake_build import CXX_BUILD, build_target
from conftest import ETHANOL, SILICON, export_calibrated_model, requires_cuda
from shallow_ensemble.export.predict import load_exported, run_model


BUILD = CXX_BUILD
RTOL = 1e-10
SYSTEM_OUTPUTS = {
    "energy": "system",
    "energy_uncertainty": "system",
    "energy_ensemble": "system",
}
ATOM_OUTPUTS = {
    "energy": "atom",
    "energy_uncertainty": "atom",
    "energy_ensemble": "atom",
}
# what torch prints when a custom operator has no backward formula (forces wrong)
NO_AUTOGRAD = "autograd kernel was not registered"


@pytest.fixture(scope="session")
def driver():
    """Path to the built ``shallow-ensemble-driver`` (configured from the root)."""
    build_target(BUILD, "shallow-ensemble-driver")
    path = BUILD / "cxx" / "shallow-ensemble-driver"
    assert path.is_file()
    return path


def _export(tmp_path_factory, name, atomic_types, seed):
    return export_calibrated_model(tmp_path_factory.mktemp(name), atomic_types, seed)


@pytest.fixture(scope="session")
def silicon_model(tmp_path_factory):
    return _export(tmp_path_factory, "silicon-model", [14], seed=1)


@pytest.fixture(scope="session")
def ethanol_model(tmp_path_factory):
    return _export(tmp_path_factory, "ethanol-model", [1, 6, 8], seed=2)


_LOADED = {}


def _python_model(path):
    if path not in _LOADED:
        _LOADED[path] = load_exported(path)
    return _LOADED[path]


def run_driver(driver, *args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [str(driver), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    if check:
        assert process.returncode == 0, process.stderr
        assert NO_AUTOGRAD not in process.stderr
        return json.loads(process.stdout)
    return process


def python_reference(model_path, atoms, selected=None):
    """The same quantities as the driver, from the Python route."""
    model = _python_model(model_path)
    labels = None
    if selected is not None:
        labels = Labels(
            ["system", "atom"],
            torch.tensor([[0, a] for a in selected], dtype=torch.int32),
        )
    totals, systems = run_model(
        model,
        [atoms],
        SYSTEM_OUTPUTS,
        selected_atoms=labels,
        positions_requires_grad=True,
    )
    energy = totals["energy"].block().values
    forces = -torch.autograd.grad(energy.sum(), systems[0].positions)[0]
    per_atom, _ = run_model(model, [atoms], ATOM_OUTPUTS, selected_atoms=labels)
    return {
        "energy": energy.item(),
        "energy_uncertainty": totals["energy_uncertainty"].block().values.item(),
        "energy_ensemble": totals["energy_ensemble"].block().values[0].detach(),
        "atoms": per_atom["energy"].block().samples.values[:, 1].tolist(),
        "energy_per_atom": per_atom["energy"].block().values[:, 0].detach(),
        "energy_uncertainty_per_atom": per_atom["energy_uncertainty"]
        .block()
        .values[:, 0]
        .detach(),
        "energy_ensemble_per_atom": per_atom["energy_ensemble"].block().values.detach(),
        "forces": forces.detach(),
    }


def assert_close(actual, expected, rtol=RTOL):
    """Max abs difference within ``rtol`` of the largest expected magnitude."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = max(np.max(np.abs(expected)), 1e-300)
    error = np.max(np.abs(actual - expected)) / scale
    assert error <= rtol, f"relative error {error:.3e} > {rtol:.0e}"


COMPARED = [
    "energy",
    "energy_uncertainty",
    "energy_ensemble",
    "energy_per_atom",
    "energy_uncertainty_per_atom",
    "energy_ensemble_per_atom",
    "forces",
]


def assert_matches(output, reference):
    assert output["atoms"] == reference["atoms"]
    for key in COMPARED:
        assert_close(output[key], reference[key])


@pytest.mark.parametrize("frame", [0, 7])
def test_periodic_silicon_matches_python(driver, silicon_model, frame):
    atoms = ase.io.read(SILICON, frame)
    output = run_driver(driver, silicon_model, SILICON, "--frame", frame)
    assert output["n_atoms"] == len(atoms)
    assert output["periodic"] == [1, 1, 1]
    assert output["device"] == "cpu"
    assert output["dtype"] == "float64"
    assert len(output["energy_ensemble"]) == 4
    assert np.array(output["forces"]).shape == (len(atoms), 3)
    assert set(output["timing"]) >= {"load_s", "forward_s", "backward_s", "total_s"}
    assert_matches(output, python_reference(silicon_model, atoms))
    # the per-atom ensemble adds up to the system ensemble, whose std is the
    # system uncertainty
    members = np.array(output["energy_ensemble_per_atom"]).sum(axis=0)
    assert_close(members, output["energy_ensemble"])
    assert_close(np.std(members, ddof=1), output["energy_uncertainty"])


def test_non_periodic_ethanol_matches_python(driver, ethanol_model):
    atoms = ase.io.read(ETHANOL, 3)
    # the model needs no compiled extension; an explicit (empty) folder is accepted
    extensions = ethanol_model.parent / "no-extensions"
    extensions.mkdir(exist_ok=True)
    output = run_driver(
        driver, ethanol_model, ETHANOL, "--frame", 3, "--extensions", extensions
    )
    assert output["periodic"] == [0, 0, 0]
    assert output["n_atoms"] == 9
    assert_matches(output, python_reference(ethanol_model, atoms))


def test_selected_atoms_match_python(driver, silicon_model):
    atoms = ase.io.read(SILICON, 2)
    selected = [0, 3, 7, 11]
    output = run_driver(
        driver, silicon_model, SILICON, "--frame", 2, "--selected", "0,3,7,11"
    )
    assert output["selected_atoms"] == selected
    assert output["atoms"] == selected
    assert_matches(output, python_reference(silicon_model, atoms, selected))


@pytest.mark.parametrize("domains", [2, 3])
def test_domain_decomposition_equals_whole_system(driver, silicon_model, domains):
    whole = run_driver(driver, silicon_model, SILICON, "--frame", 4)
    split = run_driver(
        driver, silicon_model, SILICON, "--frame", 4, "--domains", domains
    )
    assert len(split["domains"]) == domains
    assert sum(d["local_atoms"] for d in split["domains"]) == whole["n_atoms"]
    assert all(d["ghost_atoms"] > 0 for d in split["domains"])
    assert split["atoms"] == whole["atoms"]
    for key in COMPARED:
        assert_close(split[key], whole[key])
    # the domain energies and member energies add up
    assert_close(sum(d["energy"] for d in split["domains"]), whole["energy"])
    members = np.sum([d["energy_ensemble"] for d in split["domains"]], axis=0)
    assert_close(np.std(members, ddof=1), whole["energy_uncertainty"])


def test_domain_decomposition_matches_python(driver, silicon_model):
    atoms = ase.io.read(SILICON, 9)
    split = run_driver(driver, silicon_model, SILICON, "--frame", 9, "--domains", 2)
    assert_matches(split, python_reference(silicon_model, atoms))


def test_mixed_periodicity_matches_python(driver, silicon_model, tmp_path):
    """A slab (periodic along a and b only), whole and domain-decomposed."""
    atoms = ase.io.read(SILICON, 3)
    atoms.pbc = [True, True, False]
    path = tmp_path / "slab.xyz"
    ase.io.write(path, atoms)  # with the full Lattice: the driver zeroes c
    atoms.cell[2] = 0.0  # as metatomic wants (and warns about from Python)
    reference = python_reference(silicon_model, atoms)
    output = run_driver(driver, silicon_model, path)
    assert output["periodic"] == [1, 1, 0]
    assert_matches(output, reference)
    split = run_driver(driver, silicon_model, path, "--domains", 2)
    assert_matches(split, reference)


def test_missing_model_file(driver, tmp_path):
    process = run_driver(driver, tmp_path / "nothing.pt", SILICON, check=False)
    assert process.returncode == 1
    assert "model file" in process.stderr
    assert "does not exist" in process.stderr
    assert process.stdout == ""


def test_element_not_in_model(driver, silicon_model):
    process = run_driver(driver, silicon_model, ETHANOL, check=False)
    assert process.returncode == 1
    assert "atomic type 6" in process.stderr or "atomic type 1" in process.stderr
    assert "does not support" in process.stderr


def test_bad_arguments(driver, silicon_model):
    process = run_driver(driver, silicon_model, check=False)
    assert process.returncode == 2
    assert "usage: shallow-ensemble-driver" in process.stderr
    process = run_driver(
        driver, silicon_model, SILICON, "--dtype", "float32", check=False
    )
    assert process.returncode == 1
    assert "exported in float64" in process.stderr


@pytest.mark.parametrize(
    "device, domains",
    [
        ("cpu", 0),
        pytest.param("cuda", 0, marks=requires_cuda),
        pytest.param("cuda:0", 2, marks=requires_cuda),
    ],
)
def test_device_matches_python_on_cpu(driver, silicon_model, device, domains):
    """``--device`` (``cpu`` given explicitly, and CUDA where torch sees a GPU):
    the same numbers as the Python route on the CPU, whole and domain-decomposed
    (float64; between devices only the summation order differs)."""
    atoms = ase.io.read(SILICON, 5)
    extra = ["--domains", domains] if domains else []
    output = run_driver(
        driver, silicon_model, SILICON, "--frame", 5, "--device", device, *extra
    )
    assert output["device"] == device
    reference = python_reference(silicon_model, atoms)
    assert output["atoms"] == reference["atoms"]
    for key in COMPARED:
        assert_close(
            output[key], reference[key], rtol=1e-10 if device == "cpu" else 1e-8
        )


def test_device_errors(driver, silicon_model):
    """A device that is not cpu, cuda or cuda:N is a usage error; CUDA on a torch
    without it is an error that says so."""
    process = run_driver(driver, silicon_model, SILICON, "--device", "gpu", check=False)
    assert process.returncode == 2
    assert "--device must be cpu, cuda or cuda:N, got 'gpu'" in process.stderr
    if not torch.cuda.is_available():
        process = run_driver(
            driver, silicon_model, SILICON, "--device", "cuda", check=False
        )
        assert process.returncode == 1
        assert "CUDA is not available" in process.stderr
    else:
        count = torch.cuda.device_count()
        process = run_driver(
            driver, silicon_model, SILICON, "--device", f"cuda:{count}", check=False
        )
        assert process.returncode == 1
        assert f"torch sees {count} CUDA device(s)" in process.stderr
