"""ASE molecular dynamics that watches its own uncertainty.

:py:class:`UncertaintyMonitor` is an ASE observer: attached to a dynamics object
(``dyn.attach(monitor, interval=10)``), it computes the calibrated uncertainties of
the current structure with an exported model (member forces from the gradients of
``energy_ensemble``, as in :py:func:`~shallow_ensemble.export.predict.
predict_frames`), records them in ``atoms.info`` and a CSV file, writes the
structures above a threshold to an extended XYZ file, and stops the run there by
raising :py:class:`ExtrapolationError` (:py:func:`run_until_uncertain` catches it)::

    from ase import units
    from ase.md.langevin import Langevin
    from metatomic_ase import MetatomicCalculator
    from shallow_ensemble.md import UncertaintyMonitor, run_until_uncertain

    atoms.calc = MetatomicCalculator("model.pt")
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.02)
    monitor = UncertaintyMonitor(
        dyn, force_threshold=0.5, log="sigma.csv", snapshots="uncertain.xyz"
    )
    record = run_until_uncertain(dyn, 10000, monitor, interval=10)
    if record is not None:
        print(f"stopped at step {record.step}: {record.max_force:.3f} eV/A")

Thresholds are on calibrated standard deviations: ``force_threshold`` on the
largest per-atom force uncertainty :math:`\\sqrt{\\sigma_x^2 + \\sigma_y^2 +
\\sigma_z^2}` (eV/A), ``energy_threshold`` on the energy uncertainty per atom
(eV/atom), the quantities of ``shallow-ensemble select``
(:py:func:`~shallow_ensemble.workflows.selection.structure_uncertainties`), and
``atom_energy_threshold`` on the largest per-atom ``energy_uncertainty`` (eV), the
quantity of the engines' ``uncertainty_threshold`` (LAMMPS, i-PI, ASE).
"""

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ShallowEnsembleError


if TYPE_CHECKING:
    import ase
    from metatomic.torch import AtomisticModel


logger = logging.getLogger(__name__)

#: the columns of the CSV log
COLUMNS = [
    "step",
    "time_fs",
    "max_force",
    "mean_force",
    "energy_per_atom",
    "max_atom_energy",
]


class ExtrapolationError(ShallowEnsembleError, RuntimeError):
    """The uncertainty of the simulated structure went above the threshold.

    :param record: the measurement that crossed it
    """

    def __init__(self, record: "UncertaintyRecord", message: str) -> None:
        super().__init__(message)
        self.record = record


@dataclass
class UncertaintyRecord:
    """The calibrated uncertainties of one MD frame.

    :param step: MD step (``dyn.nsteps``)
    :param time_fs: simulated time, fs
    :param max_force: largest per-atom force uncertainty, eV/A
    :param mean_force: mean per-atom force uncertainty, eV/A
    :param energy_per_atom: energy uncertainty per atom, eV/atom
    :param max_atom_energy: largest per-atom ``energy_uncertainty``, eV (what the
        engines compare with ``uncertainty_threshold``)
    """

    step: int
    time_fs: float
    max_force: float
    mean_force: float
    energy_per_atom: float
    max_atom_energy: float


def measure_uncertainty(
    model: "AtomisticModel", atoms: "ase.Atoms"
) -> dict[str, float]:
    """Calibrated uncertainties of ``atoms`` with an exported (loaded) model:
    ``max_force``, ``mean_force`` (eV/A), ``energy_per_atom`` (eV/atom) and
    ``max_atom_energy``, the largest per-atom ``energy_uncertainty`` output (eV; what
    ASE's ``MetatomicCalculator``, i-PI and LAMMPS compare with their
    ``uncertainty_threshold``)."""
    from .export.predict import predict_frames, run_model
    from .workflows.selection import structure_uncertainties

    frame = atoms.copy()
    frame.calc = None
    sigmas = structure_uncertainties(predict_frames(model, [frame], forces=True))
    result = {name: float(values[0]) for name, values in sigmas.items()}
    outputs, _ = run_model(model, [frame], {"energy_uncertainty": "atom"})
    per_atom = outputs["energy_uncertainty"].block().values.detach()
    result["max_atom_energy"] = float(per_atom.max())
    return result


class UncertaintyMonitor:
    """An ASE observer that measures, logs and acts on calibrated uncertainties.

    Each call (every ``interval`` steps once attached with ``dyn.attach(monitor,
    interval=...)``, step 0 included) measures the current structure
    (:py:func:`measure_uncertainty`), stores the values in ``atoms.info``
    (``sigma_force_max``, ``sigma_force_mean``, ``sigma_energy_per_atom``,
    ``sigma_atom_energy_max``) and in
    :py:attr:`records`, and appends a row to ``log``. A structure above a threshold
    is appended to ``snapshots`` (with the values and ``md_step`` in its info); then,
    with ``stop``, :py:class:`ExtrapolationError` ends the run.

    :param dyn: the ASE dynamics (its ``atoms``, ``nsteps`` and ``get_time()`` are
        read)
    :param model: an exported model (path, or loaded ``AtomisticModel``); default:
        the model of the atoms' ``MetatomicCalculator``
    :param force_threshold: on the largest per-atom force uncertainty, eV/A
    :param energy_threshold: on the energy uncertainty per atom, eV/atom
    :param atom_energy_threshold: on the largest per-atom ``energy_uncertainty``,
        eV: the engines' ``uncertainty_threshold``
    :param log: CSV file (columns :py:data:`COLUMNS`), replaced if it exists
    :param snapshots: extended XYZ file for structures above a threshold, replaced
        if it exists
    :param stop: raise :py:class:`ExtrapolationError` above a threshold (otherwise
        only record and snapshot)
    :raises ShallowEnsembleError: for a non-positive threshold, or no model
    """

    def __init__(
        self,
        dyn: Any,
        *,
        model: "str | os.PathLike[str] | AtomisticModel | None" = None,
        force_threshold: float | None = None,
        energy_threshold: float | None = None,
        atom_energy_threshold: float | None = None,
        log: "str | os.PathLike[str] | None" = None,
        snapshots: "str | os.PathLike[str] | None" = None,
        stop: bool = True,
    ) -> None:
        for name, value in [
            ("force_threshold", force_threshold),
            ("energy_threshold", energy_threshold),
            ("atom_energy_threshold", atom_energy_threshold),
        ]:
            if value is not None and not value > 0:
                raise ShallowEnsembleError(
                    f"`{name}` is {value} but must be positive (or None)"
                )
        self.dyn = dyn
        self.model = _resolve_model(model, dyn.atoms)
        self.force_threshold = force_threshold
        self.energy_threshold = energy_threshold
        self.atom_energy_threshold = atom_energy_threshold
        self.log = None if log is None else Path(log)
        self.snapshots = None if snapshots is None else Path(snapshots)
        self.stop = stop
        self.records: list[UncertaintyRecord] = []
        if self.log is not None:
            with open(self.log, "w", newline="") as file:
                csv.writer(file).writerow(COLUMNS)
        if self.snapshots is not None and self.snapshots.exists():
            self.snapshots.unlink()

    def __call__(self) -> None:
        from ase import units

        atoms = self.dyn.atoms
        sigmas = measure_uncertainty(self.model, atoms)
        record = UncertaintyRecord(
            step=int(self.dyn.nsteps),
            time_fs=float(self.dyn.get_time()) / units.fs,
            max_force=sigmas["max_force"],
            mean_force=sigmas["mean_force"],
            energy_per_atom=sigmas["energy_per_atom"],
            max_atom_energy=sigmas["max_atom_energy"],
        )
        self.records.append(record)
        atoms.info["sigma_force_max"] = record.max_force
        atoms.info["sigma_force_mean"] = record.mean_force
        atoms.info["sigma_energy_per_atom"] = record.energy_per_atom
        atoms.info["sigma_atom_energy_max"] = record.max_atom_energy
        if self.log is not None:
            with open(self.log, "a", newline="") as file:
                csv.writer(file).writerow([getattr(record, name) for name in COLUMNS])
        reason = self.exceeded(record)
        if reason is None:
            return
        logger.log(
            logging.INFO if self.stop else logging.DEBUG,
            "step %d: %s",
            record.step,
            reason,
        )
        if self.snapshots is not None:
            self._snapshot(atoms, record)
        if self.stop:
            raise ExtrapolationError(record, f"step {record.step}: {reason}")

    def exceeded(self, record: UncertaintyRecord) -> str | None:
        """Which threshold ``record`` is above, in words, or ``None``."""
        if self.force_threshold is not None and record.max_force > self.force_threshold:
            return (
                f"largest per-atom force uncertainty {record.max_force:.4g} eV/A "
                f"above the threshold {self.force_threshold:.4g} eV/A"
            )
        if (
            self.energy_threshold is not None
            and record.energy_per_atom > self.energy_threshold
        ):
            return (
                f"energy uncertainty {record.energy_per_atom:.4g} eV/atom above the "
                f"threshold {self.energy_threshold:.4g} eV/atom"
            )
        if (
            self.atom_energy_threshold is not None
            and record.max_atom_energy > self.atom_energy_threshold
        ):
            return (
                f"largest per-atom energy uncertainty {record.max_atom_energy:.4g} eV "
                f"above the threshold {self.atom_energy_threshold:.4g} eV"
            )
        return None

    def _snapshot(self, atoms: "ase.Atoms", record: UncertaintyRecord) -> None:
        import ase.io

        assert self.snapshots is not None
        frame = atoms.copy()  # positions, cell, momenta and info, no calculator
        frame.info["md_step"] = record.step
        frame.info["md_time_fs"] = record.time_fs
        ase.io.write(self.snapshots, frame, format="extxyz", append=True)


def run_until_uncertain(
    dyn: Any, steps: int, monitor: UncertaintyMonitor, interval: int = 10
) -> UncertaintyRecord | None:
    """Attach ``monitor`` to ``dyn`` every ``interval`` steps and run ``steps``
    steps, or until the monitor stops the run.

    :return: the record above the threshold that stopped the run, or ``None`` if
        all the steps ran
    """
    if interval < 1:
        raise ShallowEnsembleError(f"`interval` is {interval} but must be at least 1")
    dyn.attach(monitor, interval=interval)
    try:
        dyn.run(steps)
    except ExtrapolationError as error:
        return error.record
    return None


def _resolve_model(model: Any, atoms: "ase.Atoms") -> "AtomisticModel":
    from .export.predict import load_exported

    if model is None:
        calc = atoms.calc
        if calc is None or not hasattr(calc, "model"):
            raise ShallowEnsembleError(
                "no model to measure the uncertainty with: give `model` (an "
                "exported model.pt) or attach a MetatomicCalculator to the atoms"
            )
        return calc.model()
    if isinstance(model, str | os.PathLike):
        return load_exported(Path(model))
    return model
