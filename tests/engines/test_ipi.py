"""i-PI runs exported shallow-ensemble models: MD, committee outputs, warnings.

Every test runs the real ``i-pi`` server, and (except with ``ffdirect``) the
``i-pi-py_driver`` client, as subprocesses of a folder in ``tmp_path``, with timeouts;
both are killed (process groups) and UNIX sockets removed whatever happens. The model is
trained for three epochs on bundled silicon structures and exported once per module.

What works, and how (i-PI 3.3.1, metatomic-torch 0.1):

* Driver: ``i-pi-py_driver -m metatomic -o template=init.xyz,model=model.pt
  [,energy_ensemble=True][,force_virial_ensemble=True][,uncertainty_threshold=0.1]``
  (plus ``extensions=DIR`` only for a backbone with compiled extensions; the built-in
  one has none), over a UNIX socket (``-u -a NAME``, i-PI ``<ffsocket mode="unix">``)
  or TCP (``-a 127.0.0.1 -p PORT``, ``mode="inet"``).
* Forces: the driver's autograd forces equal the model's, and NVE conserves energy.
  (Models whose graph held sphericart's compiled operator got wrong forces in the
  driver, which loads the library without ``import sphericart.torch``, where its
  autograd is registered; PyTorch then warns "an autograd kernel was not registered".
  The tests assert that this warning is absent.)
* Committee energies and uncertainty: ``<ffcommittee><parse_json>true</parse_json>``
  around one ``<ffsocket>``, with ``energy_ensemble=True``: the extras
  ``committee_pot`` (M calibrated member energies) and ``committee_uncertainty`` (their
  std, ddof=1) are written in Hartree.
* Member forces: a plain ``<ffsocket>`` (or ``<ffdirect>``) with
  ``energy_ensemble=True,force_virial_ensemble=True`` writes the extras
  ``committee_pot``, ``committee_force`` (M x N x 3 values, Hartree/Bohr, member-major)
  and ``committee_virial``. NOT ``ffcommittee`` + ``parse_json``: its ``gather`` extends
  the member list with the flat force list and raises ``ValueError: If the committee
  returns forces, we need *all* components`` in the polling thread, after which i-PI
  and the driver hang (strict xfail below).
* ``uncertainty_threshold``: the driver compares the per-atom ``energy_uncertainty``
  (also written as the extra ``energy_uncertainty``, Hartree) with the threshold (eV)
  and prints ``!W! the estimated atomic energy uncertainty ... exceeds the selected
  threshold`` at verbosity "medium". Only i-PI sets that level (``<simulation
  verbosity="medium">``), so the warning appears with ``<ffdirect>`` (the driver runs
  inside i-PI) and never from ``i-pi-py_driver``, which has no way to raise its level
  (strict xfail below).
* Reweighting: ``i-pi-committee-reweight sim.committee_pot_0 obs.dat --kt KT_HARTREE
  [--direct]`` gives the per-member averages of ``shallow_ensemble.observables``
  (its "Error" is the ddof=0 std). Its ``--stride`` with a negative value (observable
  written more often than the potentials) fails with ``UnboundLocalError: cannot
  access local variable 'potentials'``: subsample the observable file yourself.

The committee test runs ``examples/ipi/input.xml`` itself (fewer steps, own socket), and
``examples/ipi/reweight.py`` on its output.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
import torch

from conftest import SILICON, tiny_config


pytest.importorskip("ipi")

from ipi.utils.units import unit_to_internal, unit_to_user  # noqa: E402

from shallow_ensemble.export import export_model  # noqa: E402
from shallow_ensemble.export.predict import (  # noqa: E402
    load_exported,
    predict_frames,
    run_model,
)
from shallow_ensemble.observables import reweight_observable  # noqa: E402
from shallow_ensemble.training import train  # noqa: E402


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ipi"
TEMPERATURE = 300.0
INIT_FRAME = 10  # a 24-atom silicon surface slab from the bundled data
RUN_TIMEOUT = 90.0  # seconds, for one simulation (i-PI + driver)
WARNING = "exceeds the selected threshold"


def _script(name: str) -> str:
    """An i-PI console script of this interpreter's environment."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"`ipi` is importable but the '{name}' script is not installed")
    return found


# ----------------------------------------------------------------------------------
# model and structure


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """Train 3 epochs on 24 silicon frames, export; holds model.pt and init.xyz."""
    folder = tmp_path_factory.mktemp("ipi-model")
    frames = ase.io.read(SILICON, ":")
    ase.io.write(folder / "train.xyz", frames[:24])
    ase.io.write(folder / "valid.xyz", frames[24:32])
    config = tiny_config(
        folder,
        model={"cutoff": 4.0, "max_radial": 4, "max_angular": 3},
        strategy="energy_force_nll",
        epochs=3,
        warmup_epochs=None,
    )
    result = train(config, folder / "run", progress=False)
    export_model(result.model, folder / "model.pt")
    init = frames[INIT_FRAME]
    bare = ase.Atoms(init.numbers, init.positions, cell=init.cell, pbc=True)
    ase.io.write(folder / "init.xyz", bare)
    return folder


@pytest.fixture(scope="module")
def model(model_folder):
    """The exported file, loaded in this process: the reference for i-PI's numbers."""
    return load_exported(model_folder / "model.pt")


def member_energies(model, atoms: ase.Atoms) -> np.ndarray:
    """Calibrated member energies ``(M,)`` in eV."""
    results, _ = run_model(model, [atoms], {"energy_ensemble": "system"})
    return results["energy_ensemble"].block().values[0].detach().numpy()


def atomic_uncertainties(model, atoms: ase.Atoms) -> np.ndarray:
    results, _ = run_model(model, [atoms], {"energy_uncertainty": "atom"})
    return results["energy_uncertainty"].block().values[:, 0].detach().numpy()


def member_forces(model, atoms: ase.Atoms) -> np.ndarray:
    """Forces of each member ``(M, N, 3)`` in eV/A, by autograd."""
    results, systems = run_model(
        model, [atoms], {"energy_ensemble": "system"}, positions_requires_grad=True
    )
    members = results["energy_ensemble"].block().values[0]
    positions = systems[0].positions
    grads = [torch.autograd.grad(e, positions, retain_graph=True)[0] for e in members]
    return -torch.stack(grads).detach().numpy()


# ----------------------------------------------------------------------------------
# running i-PI


@dataclass
class Run:
    folder: Path
    ipi_output: str
    driver_output: str
    failure: str = ""

    def properties(self) -> np.ndarray:
        return np.loadtxt(self.folder / "sim.out", ndmin=2)

    def frames(self, name: str) -> list[ase.Atoms]:
        return ase.io.read(self.folder / f"sim.{name}_0.extxyz", ":")

    def extras(self, name: str) -> dict[int, np.ndarray]:
        """The ``extras`` trajectory ``name``: step -> values (i-PI units)."""
        blocks: dict[int, list[float]] = {}
        step = None
        for line in (self.folder / f"sim.{name}_0").read_text().splitlines():
            if line.strip().startswith("#EXTRAS"):
                step = int(line.split("Step:")[1])
                blocks[step] = []
            elif line.strip():
                blocks[step].extend(float(v) for v in line.split())
        return {s: np.array(v) for s, v in blocks.items()}


def simulation_xml(
    forcefield: str,
    outputs: str,
    steps: int,
    dynamics: str = "nvt",
    timestep_fs: float = 1.0,
) -> str:
    thermostat = (
        '<thermostat mode="svr"><tau units="femtosecond">10</tau></thermostat>'
        if dynamics == "nvt"
        else ""
    )
    return f"""<simulation verbosity="medium" safe_stride="1000">
  <output prefix="sim">
{outputs}
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>12345</seed></prng>
  {forcefield}
  <system>
    <initialize nbeads="1">
      <file mode="ase">init.xyz</file>
      <velocities mode="thermal" units="kelvin">{TEMPERATURE}</velocities>
    </initialize>
    <forces><force forcefield="model"/></forces>
    <motion mode="dynamics">
      <dynamics mode="{dynamics}">
        <timestep units="femtosecond">{timestep_fs}</timestep>
        {thermostat}
      </dynamics>
    </motion>
    <ensemble><temperature units="kelvin">{TEMPERATURE}</temperature></ensemble>
  </system>
</simulation>
"""


def ffsocket_xml(connection: dict, name: str = "model") -> str:
    if connection["mode"] == "unix":
        where = f"<address>{connection['address']}</address>"
    else:
        where = f"<address>127.0.0.1</address><port>{connection['port']}</port>"
    return (
        f'<ffsocket name="{name}" mode="{connection["mode"]}" pbc="true">'
        f"{where}<latency>1e-3</latency><timeout>60</timeout></ffsocket>"
    )


def unix_connection() -> dict:
    # short and unique: i-PI puts the socket at /tmp/ipi_<address>
    return {"mode": "unix", "address": f"se-{uuid.uuid4().hex[:12]}"}


def tcp_connection() -> dict:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"mode": "inet", "port": port}


def driver_args(connection: dict, model_folder: Path, options: str) -> list[str]:
    if connection["mode"] == "unix":
        where = ["-u", "-a", connection["address"]]
    else:
        where = ["-a", "127.0.0.1", "-p", str(connection["port"])]
    base = f"template=init.xyz,model={model_folder / 'model.pt'}"
    if (model_folder / "extensions").is_dir():  # only with compiled extensions
        base += f",extensions={model_folder / 'extensions'}"
    options = base + ("," + options if options else "")
    return [*where, "-m", "metatomic", "-o", options]


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=10)


def run_simulation(
    folder: Path,
    model_folder: Path,
    xml: str,
    connection: dict | None = None,
    driver: list[str] | None = None,
    timeout: float = RUN_TIMEOUT,
    check: bool = True,
) -> Run:
    """Run i-PI (and a driver) in ``folder``; stop at the first Python traceback."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_folder / "init.xyz", folder / "init.xyz")
    (folder / "input.xml").write_text(xml)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ipi_log_path, driver_log_path = folder / "ipi.log", folder / "driver.log"
    socket_file = (
        Path("/tmp") / f"ipi_{connection['address']}"
        if connection is not None and connection["mode"] == "unix"
        else None
    )
    processes: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout
    failure = ""
    with open(ipi_log_path, "w") as ipi_log, open(driver_log_path, "w") as driver_log:
        try:
            ipi = subprocess.Popen(
                [_script("i-pi"), "input.xml"],
                cwd=folder,
                stdout=ipi_log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            processes.append(ipi)
            if driver is not None:
                while "@interfacesocket.open: Created" not in ipi_log_path.read_text():
                    if ipi.poll() is not None or time.monotonic() > deadline:
                        failure = "i-PI did not open its socket"
                        break
                    time.sleep(0.1)
                if not failure:
                    processes.append(
                        subprocess.Popen(
                            [_script("i-pi-py_driver"), *driver],
                            cwd=folder,
                            stdout=driver_log,
                            stderr=subprocess.STDOUT,
                            env=env,
                            start_new_session=True,
                        )
                    )
            while not failure and ipi.poll() is None:
                if time.monotonic() > deadline:
                    failure = f"timed out after {timeout} s"
                elif "Traceback (most recent call last)" in ipi_log_path.read_text():
                    failure = "i-PI raised an exception"
                elif len(processes) > 1 and processes[1].poll() not in (None, 0):
                    failure = "the driver failed"
                time.sleep(0.1)
            if not failure and len(processes) > 1:
                try:
                    processes[1].wait(timeout=15)
                except subprocess.TimeoutExpired:
                    failure = "the driver did not exit after i-PI"
        finally:
            for process in processes:
                _kill(process)
            if socket_file is not None:
                socket_file.unlink(missing_ok=True)
    run = Run(folder, ipi_log_path.read_text(), driver_log_path.read_text(), failure)
    codes = [p.returncode for p in processes]
    if check and (failure or any(code != 0 for code in codes)):
        pytest.fail(
            f"{failure or 'non-zero exit'} (exit codes {codes})\n"
            f"--- i-PI ---\n{run.ipi_output[-3000:]}\n"
            f"--- driver ---\n{run.driver_output[-3000:]}"
        )
    return run


PROPERTIES = (
    '<properties stride="{stride}" filename="out"> [ step, time{{picosecond}}, '
    "conserved{{electronvolt}}, temperature{{kelvin}}, kinetic_md{{electronvolt}}, "
    "potential{{electronvolt}} ] </properties>"
)
STEP, CONSERVED, TEMP, KINETIC, POTENTIAL = 0, 2, 3, 4, 5


def trajectory(name: str, what: str, stride: int) -> str:
    if what in ("positions", "forces"):
        return (
            f'<trajectory filename="{name}" stride="{stride}" format="ase">'
            f" {what} </trajectory>"
        )
    return (
        f'<trajectory filename="{name}" stride="{stride}" extra_type="{what}">'
        " extras </trajectory>"
    )


def to_ev(values):
    return unit_to_user("energy", "electronvolt", np.asarray(values, dtype=float))


# ----------------------------------------------------------------------------------
# simulations, once per module


@pytest.fixture(scope="module")
def nvt_unix(model_folder, tmp_path_factory):
    connection = unix_connection()
    outputs = "\n".join(
        [
            PROPERTIES.format(stride=1),
            trajectory("pos", "positions", 5),
            trajectory("frc", "forces", 5),
            trajectory("committee_pot", "committee_pot", 5),
        ]
    )
    return run_simulation(
        tmp_path_factory.mktemp("nvt-unix"),
        model_folder,
        simulation_xml(ffsocket_xml(connection), outputs, steps=20),
        connection,
        driver_args(connection, model_folder, "energy_ensemble=True"),
    )


@pytest.fixture(scope="module")
def nvt_tcp(model_folder, tmp_path_factory):
    connection = tcp_connection()
    outputs = "\n".join(
        [
            PROPERTIES.format(stride=1),
            trajectory("pos", "positions", 10),
            trajectory("uncertainty", "energy_uncertainty", 10),
        ]
    )
    return run_simulation(
        tmp_path_factory.mktemp("nvt-tcp"),
        model_folder,
        simulation_xml(ffsocket_xml(connection), outputs, steps=20),
        connection,
        driver_args(connection, model_folder, "uncertainty_threshold=0.001"),
    )


@pytest.fixture(scope="module")
def nve(model_folder, tmp_path_factory):
    connection = unix_connection()
    outputs = "\n".join(
        [
            PROPERTIES.format(stride=1),
            trajectory("pos", "positions", 50),
        ]
    )
    return run_simulation(
        tmp_path_factory.mktemp("nve"),
        model_folder,
        simulation_xml(
            ffsocket_xml(connection), outputs, steps=50, dynamics="nve", timestep_fs=0.5
        ),
        connection,
        driver_args(connection, model_folder, ""),
    )


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"'{old}' not found once in the example"
    return text.replace(old, new)


@pytest.fixture(scope="module")
def committee(model_folder, tmp_path_factory):
    """examples/ipi/input.xml (ffcommittee + parse_json), 10 steps, its own socket."""
    connection = unix_connection()
    xml = (EXAMPLES / "input.xml").read_text()
    xml = replace_once(
        xml, "<total_steps>2000</total_steps>", "<total_steps>10</total_steps>"
    )
    xml = replace_once(
        xml,
        "<address>shallow-ensemble</address>",
        f"<address>{connection['address']}</address>",
    )
    return run_simulation(
        tmp_path_factory.mktemp("committee"),
        model_folder,
        xml,
        connection,
        driver_args(connection, model_folder, "energy_ensemble=True"),
    )


# ----------------------------------------------------------------------------------
# (a), (b): NVT over UNIX and TCP sockets


def check_nvt_outputs(run: Run, n_steps: int, positions_stride: int):
    properties = run.properties()
    assert properties.shape == (n_steps + 1, 6)
    np.testing.assert_array_equal(properties[:, STEP], np.arange(n_steps + 1))
    assert np.all(np.isfinite(properties))
    # thermostatted at 300 K: a 24-atom system fluctuates, but stays in range
    assert np.all((properties[:, TEMP] > 30) & (properties[:, TEMP] < 1500))
    frames = run.frames("pos")
    assert len(frames) == n_steps // positions_stride + 1
    for frame in frames:
        assert len(frame) == 24 and np.all(np.isfinite(frame.positions))
    assert not np.allclose(frames[0].positions, frames[-1].positions)
    return properties, frames


def test_nvt_over_unix_socket(nvt_unix):
    properties, frames = check_nvt_outputs(nvt_unix, 20, 5)
    committee = nvt_unix.extras("committee_pot")
    assert sorted(committee) == [0, 5, 10, 15, 20]
    for step, values in committee.items():
        assert values.shape == (4,)
        # the dynamics runs on the mean of the (calibrated) members
        assert to_ev(values).mean() == pytest.approx(
            properties[step, POTENTIAL], abs=1e-5
        )


def test_nvt_over_tcp(nvt_tcp, model):
    _, frames = check_nvt_outputs(nvt_tcp, 20, 10)
    # per-atom uncertainties travel as an extra, in Hartree
    written = nvt_tcp.extras("uncertainty")
    assert sorted(written) == [0, 10, 20]
    for frame, step in zip(frames, [0, 10, 20], strict=True):
        expected = atomic_uncertainties(model, frame)
        np.testing.assert_allclose(to_ev(written[step]), expected, atol=1e-6)
        assert expected.max() > 0.001  # above the threshold given to the driver


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="i-PI 3.3.1: the metatomic driver warns at verbosity 'medium', which "
    "i-pi-py_driver never sets (see module docstring)",
)
def test_socket_driver_warns_above_the_threshold(nvt_tcp):
    assert WARNING in nvt_tcp.driver_output


# ----------------------------------------------------------------------------------
# forces and (c) NVE


def test_forces_are_the_model_forces(nvt_unix, model):
    # PyTorch's warning when a compiled operator in the model has no autograd kernel
    assert "autograd kernel was not registered" not in nvt_unix.driver_output
    positions, forces = nvt_unix.frames("pos"), nvt_unix.frames("frc")
    assert len(positions) == len(forces) == 5
    for where, written in zip(positions, forces, strict=True):
        expected = member_forces(model, where).mean(axis=0)
        # positions and forces are written with 8 decimals (A, eV/A)
        np.testing.assert_allclose(written.get_forces(), expected, atol=1e-5)


def test_nve_conserves_energy(nve):
    properties = nve.properties()
    assert properties.shape == (51, 6)
    conserved = properties[:, CONSERVED]
    kinetic = properties[:, KINETIC]
    drift = np.abs(conserved - conserved[0]).max()
    # Velocity Verlet conserves a shadow energy; its error relative to the kinetic
    # energy fluctuations is ~(omega dt)^2 ~ (0.1 fs^-1 x 0.5 fs)^2 ~ 3e-3 for
    # silicon phonons (measured: drift / std(K) ~ 1e-3). 2 % of std(K) leaves room
    # for that, and fails for forces inconsistent with the energy (a compiled
    # operator without autograd kernel in the model gave ~70 %), which is what the
    # test is for.
    assert kinetic.std() > 0.01  # the atoms move: K fluctuates by tens of meV
    assert drift < 0.02 * kinetic.std(), (drift, kinetic.std())


# ----------------------------------------------------------------------------------
# (d) committee outputs


def test_committee_energies_are_the_calibrated_ensemble(committee, model):
    pots = committee.extras("committee_pot")
    sigmas = committee.extras("committee_uncertainty")
    frames = committee.frames("pos")
    steps = [0, 2, 4, 6, 8, 10]
    assert sorted(pots) == steps and sorted(sigmas) == steps
    for frame, step in zip(frames, steps, strict=True):
        expected = member_energies(model, frame)
        # the file keeps 9 digits of ~4.6 Hartree: ~1e-6 eV
        np.testing.assert_allclose(to_ev(pots[step]), expected, atol=2e-5, rtol=0)
        results, _ = run_model(model, [frame], {"energy_uncertainty": "system"})
        sigma = float(results["energy_uncertainty"].block().values[0, 0])
        assert sigma == pytest.approx(expected.std(ddof=1), rel=1e-10)
        assert float(to_ev(sigmas[step][0])) == pytest.approx(sigma, rel=1e-6)


def test_reweighting_agrees_with_ipi_committee_reweight(committee, tmp_path):
    """Our exact and cumulant averages == i-pi-committee-reweight's, on i-PI files."""
    properties = committee.properties()
    potential = properties[:, POTENTIAL]
    observable = potential - potential.mean()  # eV, centred to keep the digits
    np.savetxt(tmp_path / "obs.dat", observable)
    pots = committee.extras("committee_pot")
    members = to_ev(np.stack([pots[s] for s in sorted(pots)]))
    kt = unit_to_internal("temperature", "kelvin", TEMPERATURE)  # Hartree
    pot_file = committee.folder / "sim.committee_pot_0"
    for method, flag in (("cumulant", []), ("exact", ["--direct"])):
        ours = reweight_observable(observable, members, TEMPERATURE, method=method)
        output = subprocess.run(
            [_script("i-pi-committee-reweight"), str(pot_file), "obs.dat"]
            + ["--kt", f"{float(kt):.17g}", *flag],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        theirs = np.loadtxt(output.splitlines())
        # columns: mean, population std, then one average per member; beta
        # differs by ~1e-6 relative (i-PI's Boltzmann constant and Hartree vs
        # ase.units'), hence rtol
        np.testing.assert_allclose(theirs[2:], ours.members, rtol=1e-5, atol=1e-9)
        n = members.shape[1]
        population_std = ours.std * np.sqrt((n - 1) / n)
        assert theirs[1] == pytest.approx(population_std, rel=1e-5)
    assert np.abs(ours.members - observable.mean()).max() > 1e-5  # non-trivial


def test_reweight_example_on_the_committee_run(committee):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "reweight.py"), "--temperature", "300"],
        cwd=committee.folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("6 frames, 4 members, T = 300.0 K")
    for name in ("potential energy (eV)", "nearest-neighbour distance (A)"):
        (row,) = [line for line in lines if line.startswith(name)]
        plain, reweighted, std, ess = (float(v) for v in row[32:].split())
        assert np.isfinite([plain, reweighted, std]).all() and std > 0
        assert 1.0 <= ess <= 6.0


# ----------------------------------------------------------------------------------
# member forces


def test_member_forces_through_a_plain_ffsocket(model_folder, model, tmp_path):
    connection = unix_connection()
    outputs = "\n".join(
        [
            PROPERTIES.format(stride=1),
            trajectory("pos", "positions", 1),
            trajectory("frc", "forces", 1),
            trajectory("committee_force", "committee_force", 1),
            trajectory("committee_virial", "committee_virial", 1),
        ]
    )
    run = run_simulation(
        tmp_path,
        model_folder,
        simulation_xml(ffsocket_xml(connection), outputs, steps=2),
        connection,
        driver_args(
            connection,
            model_folder,
            "energy_ensemble=True,force_virial_ensemble=True",
        ),
    )
    written = run.extras("committee_force")
    positions, forces = run.frames("pos"), run.frames("frc")
    assert sorted(written) == [0, 1, 2]
    for step in (0, 2):
        expected = member_forces(model, positions[step])
        values = unit_to_user("force", "ev/ang", written[step]).reshape(4, 24, 3)
        # positions are written with 8 decimals: ~1e-6 eV/A from the rounding
        np.testing.assert_allclose(values, expected, atol=1e-5)
        # the member forces average to the forces the dynamics used
        np.testing.assert_allclose(
            values.mean(axis=0), forces[step].get_forces(), atol=1e-6
        )
    # member virials, -V times the strain derivative of each member energy over V
    virials = run.extras("committee_virial")
    for step in (0, 2):
        atoms = positions[step]
        stress = predict_frames(
            model,
            [ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)],
            stress_ref=torch.zeros((1, 3, 3), dtype=torch.float64),
            stress_mask=torch.tensor([True]),
        ).stress[:, 0]
        expected = -stress.numpy() * atoms.get_volume()
        values = unit_to_user("energy", "electronvolt", virials[step]).reshape(4, 3, 3)
        assert np.abs(expected).max() > 1e-2
        np.testing.assert_allclose(values, expected, atol=1e-4)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="i-PI 3.3.1: ffcommittee + parse_json with committee_force raises "
    "'ValueError: If the committee returns forces, we need *all* components'",
)
def test_ffcommittee_parse_json_with_member_forces(model_folder, tmp_path):
    connection = unix_connection()
    forcefield = (
        '<ffcommittee name="model"><parse_json>true</parse_json>'
        f"{ffsocket_xml(connection, name='member')}</ffcommittee>"
    )
    outputs = trajectory("committee_pot", "committee_pot", 1)
    run = run_simulation(
        tmp_path,
        model_folder,
        simulation_xml(forcefield, outputs, steps=1),
        connection,
        driver_args(
            connection,
            model_folder,
            "energy_ensemble=True,force_virial_ensemble=True",
        ),
        timeout=60,
        check=False,
    )
    assert "we need *all* components" not in run.ipi_output
    assert not run.failure


# ----------------------------------------------------------------------------------
# (e) uncertainty_threshold


@pytest.mark.parametrize("threshold", [0.001, 1000.0])
def test_uncertainty_threshold_warns_only_above_it(
    threshold, model_folder, model, tmp_path
):
    """In-process driver (ffdirect), where i-PI's verbosity applies."""
    parameters = (
        f"{{template: init.xyz, model: {model_folder / 'model.pt'}, "
        f"uncertainty_threshold: {threshold}}}"
    )
    if (model_folder / "extensions").is_dir():
        parameters = parameters[:-1] + f", extensions: {model_folder / 'extensions'}}}"
    forcefield = (
        '<ffdirect name="model"><pes>metatomic</pes>'
        f"<parameters>{parameters}</parameters></ffdirect>"
    )
    run = run_simulation(
        tmp_path,
        model_folder,
        simulation_xml(forcefield, PROPERTIES.format(stride=1), steps=2),
    )
    warnings = [line for line in run.ipi_output.splitlines() if WARNING in line]
    largest = atomic_uncertainties(model, ase.io.read(model_folder / "init.xyz")).max()
    if threshold > largest:
        assert warnings == []
    else:
        assert len(warnings) >= 1  # one per evaluation (steps 0, 1, 2)
        # "!W! the estimated atomic energy uncertainty 1.3863 eV/atom exceeds ..."
        first = float(warnings[0].split("uncertainty")[1].split("eV/atom")[0])
        assert first == pytest.approx(largest, abs=1e-4)
        assert f"threshold of {threshold:.4f} eV/atom" in warnings[0]
