"""The quickstart: train, calibrate, export and run molecular dynamics on bundled
ethanol data."""

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._models import PathLike


if TYPE_CHECKING:
    import ase

    from ..config import Config
    from ..training import TrainResult


logger = logging.getLogger(__name__)


@dataclass
class MDStep:
    """One report of :py:func:`run_md`: the potential energy and its uncertainty
    (eV), the largest per-atom uncertainty (eV) and the temperature (K)."""

    step: int
    energy: float
    sigma: float
    max_sigma_atom: float
    temperature: float


@dataclass
class QuickstartResult:
    """What :py:func:`run_quickstart` produced: the training run, the exported
    model and the molecular-dynamics reports."""

    training: "TrainResult"
    model_path: Path
    md: list[MDStep]


def quickstart_config(overrides: Sequence[str] = ()) -> "Config":
    """The bundled quickstart configuration (ethanol, joint energy + force NLL), with
    ``--set``-style overrides (``"training.epochs=2"``)."""
    from importlib import resources

    from ..config import load_config

    config_path = resources.files("shallow_ensemble") / "resources" / "quickstart.yaml"
    with resources.as_file(config_path) as path:
        return load_config(path, list(overrides))


def run_quickstart(
    output: PathLike = "quickstart-run",
    *,
    steps: int = 200,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    on_trained: Callable[["TrainResult"], None] | None = None,
    on_md_step: Callable[[MDStep], None] | None = None,
) -> QuickstartResult:
    """The whole workflow on bundled ethanol data: train (joint energy + force NLL)
    -> calibrate on validation -> metrics on a held-out test split -> export
    ``output/model.pt`` -> ASE molecular dynamics with the exported model.

    :param output: run folder (``train`` refuses one holding a finished run unless
        ``overwrite``)
    :param steps: MD steps
    :param overrides: ``--set``-style overrides of the quickstart configuration
    :param overwrite: replace a previous run in ``output``
    :param on_trained: called with the training result, before the export
    :param on_md_step: called with each MD report as it comes (see :py:func:`run_md`)
    """
    from ..export import export_model
    from ..training import train

    out = Path(output)
    config = quickstart_config(overrides)
    logger.info(
        "== 1. training on %s (%s) ==", config.data.train, config.training.strategy
    )
    result = train(config, out, overwrite=overwrite)
    if on_trained is not None:
        on_trained(result)
    logger.info("\n== 2. export ==")
    model_path = export_model(result.model, out / "model.pt")
    logger.info("wrote %s", model_path)
    logger.info("\n== 3. ASE molecular dynamics with %s ==", model_path)
    md = run_md(model_path, config.data.train, steps, on_step=on_md_step)
    return QuickstartResult(result, model_path, md)


def run_md(
    model_path: PathLike,
    structure: "PathLike | ase.Atoms",
    steps: int,
    *,
    temperature_K: float = 300.0,
    interval: int = 20,
    on_step: Callable[[MDStep], None] | None = None,
) -> list[MDStep]:
    """Langevin MD (0.5 fs steps, friction 0.02, centre of mass fixed, seeded) with
    an exported model through ASE's ``MetatomicCalculator``, reporting the energy,
    its uncertainty and the largest per-atom uncertainty every ``interval`` steps.

    :param model_path: exported model
    :param structure: starting structure, or an extended XYZ file (its first frame)
    :param steps: MD steps
    :param on_step: called with each report as it comes
    :return: the reports (step 0 included)
    """
    import ase
    import ase.io
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from metatomic_ase import MetatomicCalculator

    if isinstance(structure, ase.Atoms):
        atoms = structure.copy()
    else:
        atoms = ase.io.read(os.fspath(structure), index=0)
    calc = MetatomicCalculator(
        str(model_path), check_consistency=True, uncertainty_threshold=None
    )
    atoms.calc = calc
    _thermalize(atoms, temperature_K)
    atoms.set_constraint(FixCom())
    dyn = Langevin(
        atoms,
        0.5 * units.fs,
        temperature_K=temperature_K,
        friction=0.02,
        fixcm=False,
        rng=_rng(),
    )
    reports: list[MDStep] = []

    def report() -> None:
        sigma, sigma_atom = _uncertainties(calc, atoms)
        step = MDStep(
            step=dyn.nsteps,
            energy=float(atoms.get_potential_energy()),
            sigma=sigma,
            max_sigma_atom=sigma_atom,
            temperature=float(atoms.get_temperature()),
        )
        reports.append(step)
        if on_step is not None:
            on_step(step)

    dyn.attach(report, interval=interval)
    dyn.run(steps)
    return reports


def _thermalize(atoms: "ase.Atoms", temperature_K: float) -> None:
    try:  # ASE >= 3.29
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:
        from ase.md.velocitydistribution import (
            MaxwellBoltzmannDistribution as thermalize_momenta,
        )
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=_rng())


def _uncertainties(calc: Any, atoms: "ase.Atoms") -> tuple[float, float]:
    """The energy uncertainty of ``atoms`` and its largest per-atom one, eV."""
    from metatomic.torch import ModelOutput

    total = {"energy_uncertainty": ModelOutput(unit="eV", sample_kind="system")}
    per_atom = {"energy_uncertainty": ModelOutput(unit="eV", sample_kind="atom")}
    sigma = calc.run_model(atoms, total)["energy_uncertainty"].block().values
    sigma_i = calc.run_model(atoms, per_atom)["energy_uncertainty"].block().values
    return float(sigma.detach()), float(sigma_i.detach().max())


def _rng() -> Any:
    import numpy as np

    return np.random.default_rng(0)
