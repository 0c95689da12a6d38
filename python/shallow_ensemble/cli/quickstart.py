"""``shallow-ensemble quickstart``: the whole workflow on bundled ethanol data.

Train (joint energy + force NLL) -> calibrate on validation -> metrics on a held-out
test split -> export a metatomic model -> ASE molecular dynamics with the exported
model, printing the energy and its uncertainty as it goes.
"""

import argparse
from importlib import resources
from pathlib import Path

import numpy as np

from ._common import format_metrics


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="train, calibrate, export and run MD on bundled ethanol data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-o", "--output", default="quickstart-run", help="output folder"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous run in the output folder",
    )
    parser.add_argument("--steps", type=int, default=200, help="MD steps")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value of the quickstart configuration",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..export import export_model
    from ..training import train

    out = Path(args.output)
    config_path = resources.files("shallow_ensemble") / "resources" / "quickstart.yaml"
    with resources.as_file(config_path) as path:
        config = load_config(path, args.overrides)
    print(f"== 1. training on {config.data.train} ({config.training.strategy}) ==")
    result = train(config, out, overwrite=args.overwrite)
    print(f"trained {len(result.history)} epochs in {result.train_seconds:.1f} s")
    print(
        "calibration: "
        + ", ".join(f"{k} = {v:.3f}" for k, v in result.calibration.items())
    )
    for name in ("valid_uncalibrated", "valid_calibrated", "test"):
        if name in result.metrics:
            print(
                format_metrics(
                    result.metrics[name], title=f"\n{name.replace('_', ' ')}:"
                )
            )

    print("\n== 2. export ==")
    model_path = export_model(result.model, out / "model.pt")
    print(f"wrote {model_path}")

    print(f"\n== 3. ASE molecular dynamics with {model_path} ==")
    run_md(model_path, config.data.train, args.steps)
    return 0


def run_md(model_path: Path, xyz: str, steps: int) -> None:
    """Langevin MD at 300 K, printing energy, its uncertainty and the largest per-atom
    uncertainty every 20 steps."""
    import ase.io
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin

    try:  # ASE >= 3.29
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:
        from ase.md.velocitydistribution import (
            MaxwellBoltzmannDistribution as thermalize_momenta,
        )
    from metatomic.torch import ModelOutput
    from metatomic_ase import MetatomicCalculator

    atoms = ase.io.read(xyz, index=0)
    calc = MetatomicCalculator(
        str(model_path),
        check_consistency=True,
        uncertainty_threshold=None,
    )
    atoms.calc = calc
    thermalize_momenta(atoms, temperature_K=300, rng=_rng())
    atoms.set_constraint(FixCom())
    dyn = Langevin(
        atoms, 0.5 * units.fs, temperature_K=300, friction=0.02, fixcm=False, rng=_rng()
    )
    request = {
        "energy_uncertainty": ModelOutput(unit="eV", sample_kind="system"),
    }
    per_atom = {"energy_uncertainty": ModelOutput(unit="eV", sample_kind="atom")}
    print(
        f"{'step':>6}{'E_pot [eV]':>16}{'sigma_E [eV]':>15}"
        f"{'max sigma_i':>14}{'T [K]':>9}"
    )

    def report() -> None:
        sigma = calc.run_model(atoms, request)["energy_uncertainty"].block().values
        sigma_i = calc.run_model(atoms, per_atom)["energy_uncertainty"].block().values
        sigma, sigma_i = sigma.detach(), sigma_i.detach()
        print(
            f"{dyn.nsteps:>6}{atoms.get_potential_energy():>16.4f}"
            f"{float(sigma):>15.4f}{float(sigma_i.max()):>14.4f}"
            f"{atoms.get_temperature():>9.1f}"
        )

    dyn.attach(report, interval=20)
    dyn.run(steps)


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)
