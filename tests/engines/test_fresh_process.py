"""The exported model in a process that never imports shallow_ensemble.

Engines (ASE scripts, i-PI drivers, LAMMPS, C++) load the file alone. Anything the
model needs beyond TorchScript and metatomic (a compiled extension whose autograd is
registered from Python, for example) shows up here as wrong forces or an autograd
warning, which the subprocess turns into an error.
"""

import json
import subprocess
import sys

from conftest import ETHANOL, make_model
from shallow_ensemble.export import export_model


SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
import ase.io
import numpy as np
from metatomic_ase import MetatomicCalculator

atoms = ase.io.read(sys.argv[2], "7")
atoms.calc = MetatomicCalculator(sys.argv[1], check_consistency=True,
                                 uncertainty_threshold=None)
forces = atoms.get_forces()
delta, numeric = 1e-5, []
for atom, xyz in [(0, 0), (3, 1), (8, 2)]:
    energies = []
    for sign in (1, -1):
        moved = atoms.copy()
        moved.calc = atoms.calc
        moved.positions[atom, xyz] += sign * delta
        energies.append(moved.get_potential_energy())
    numeric.append([forces[atom, xyz], -(energies[0] - energies[1]) / (2 * delta)])
print(json.dumps({
    "pairs": numeric,
    "modules": sorted(m for m in sys.modules if m.startswith(("shallow", "spher"))),
}))
"""


def test_forces_are_exact_without_the_package(tmp_path):
    model = make_model([1, 6, 8], num_members=4)
    path = export_model(model, tmp_path / "model.pt")
    assert not (tmp_path / "extensions").exists()
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path), ETHANOL],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["modules"] == []
    for autograd, numeric in result["pairs"]:
        # central differences with delta = 1e-5 A: truncation ~1e-10, rounding ~1e-10
        assert abs(autograd - numeric) < 1e-7 * max(1.0, abs(numeric))
