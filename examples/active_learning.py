"""Active learning with a shallow ensemble: train -> MD -> select -> label -> retrain.

The reference method is ASE's EMT potential for fcc copper, so the loop runs in a
minute on a laptop; replace `label` with your DFT code. Each round:

1. trains a shallow ensemble (joint energy + force NLL, calibrated) on the labelled
   structures and exports it;
2. runs Langevin MD at high temperature with the exported model, watched by
   `shallow_ensemble.md.UncertaintyMonitor`: frames more uncertain than anything in
   the training set are written as candidates, and the run stops if the largest
   per-atom force uncertainty gets far out of range (the model extrapolates);
3. picks the most uncertain, diverse candidates (`select_structures`, the library
   function of `shallow-ensemble select`), labels them with EMT and adds them to the
   training set.

The initial training set holds only slightly rattled cells; the test set is MD at
the same high temperature driven by EMT itself. The summary shows the force error
and the uncertainty on it going down:

    python examples/active_learning.py --outdir al-run
"""

import argparse
import json
import logging
from pathlib import Path

import ase
import ase.io
import numpy as np
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixCom
from ase.md.langevin import Langevin


try:  # ASE >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:
    from ase.md.velocitydistribution import (
        MaxwellBoltzmannDistribution as thermalize_momenta,
    )

import shallow_ensemble
from shallow_ensemble.config import Config, config_from_dict
from shallow_ensemble.data import read_structures
from shallow_ensemble.md import UncertaintyMonitor, run_until_uncertain
from shallow_ensemble.workflows import predict_structures
from shallow_ensemble.workflows.selection import (
    select_structures,
    structure_uncertainties,
)


logger = logging.getLogger("active_learning")


def cell(size: int = 2) -> ase.Atoms:
    """Cubic fcc Cu, ``size**3`` conventional cells (32 atoms for 2)."""
    return bulk("Cu", "fcc", a=3.61, cubic=True) * (size, size, size)


def label(frames: list[ase.Atoms]) -> list[ase.Atoms]:
    """Reference energies and forces (here EMT; your DFT code in real life)."""
    labelled = []
    for frame in frames:
        atoms = ase.Atoms(
            frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc
        )
        atoms.info.update(frame.info)
        atoms.calc = EMT()
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        labelled.append(atoms)
    return labelled


def rattled(n: int, stdev: float, rng: np.random.Generator) -> list[ase.Atoms]:
    """Cells with random displacements (and a +-1 % volume change)."""
    frames = []
    for _ in range(n):
        atoms = cell()
        atoms.set_cell(atoms.cell * (1 + rng.uniform(-0.01, 0.01)), scale_atoms=True)
        atoms.positions += rng.normal(scale=stdev, size=atoms.positions.shape)
        frames.append(atoms)
    return frames


def langevin(
    atoms: ase.Atoms, temperature: float, rng: np.random.Generator
) -> Langevin:
    """Langevin MD, 2 fs steps, centre of mass fixed, velocities drawn from ``rng``."""
    thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    atoms.set_constraint(FixCom())
    return Langevin(
        atoms,
        2 * units.fs,
        temperature_K=temperature,
        friction=0.02,
        fixcm=False,
        rng=rng,
    )


def emt_md(n: int, temperature: float, seed: int) -> list[ase.Atoms]:
    """``n`` frames, 10 steps apart after 100 steps, of EMT Langevin MD."""
    atoms = cell()
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    dyn = langevin(atoms, temperature, rng)
    dyn.run(100)
    frames = []
    for _ in range(n):
        dyn.run(10)
        frames.append(atoms.copy())
    return frames


def config(folder: Path, args: argparse.Namespace) -> Config:
    return config_from_dict(
        {
            "data": {
                "train": str(folder / "train.xyz"),
                "valid": str(folder.parent / "valid.xyz"),
            },
            "model": {
                "num_members": args.members,
                "cutoff": 4.0,
                "max_radial": 4,
                "max_angular": 3,
                "hidden_sizes": [16, 16],
            },
            "training": {
                "strategy": "energy_force_nll",
                "epochs": args.epochs,
                "warmup_epochs": max(1, args.epochs // 4),
                "batch_size": 4,
                "learning_rate": 1e-2,
                "dtype": "float64",
                "seed": args.seed,
            },
        }
    )


def test_metrics(model: Path, test_file: Path) -> dict[str, float]:
    """Force RMSE against the reference, and mean predicted uncertainties, on the
    test frames."""
    evaluation = shallow_ensemble.evaluate_model(model, test_file)
    sigmas = structure_uncertainties(evaluation.predictions)
    return {
        "force_rmse": evaluation.report["forces"]["rmse"],
        "energy_per_atom_rmse": evaluation.report["energy_per_atom"]["rmse"],
        "mean_max_force_sigma": float(np.mean(sigmas["max_force"])),
        "mean_energy_per_atom_sigma": float(np.mean(sigmas["energy_per_atom"])),
    }


def explore(model: Path, folder: Path, args: argparse.Namespace, seed: int) -> Path:
    """ML-driven Langevin MD; returns the file of candidate frames."""
    from metatomic_ase import MetatomicCalculator

    train_file = folder / "train.xyz"
    structures = read_structures(train_file)
    seen = structure_uncertainties(predict_structures(model, structures))
    largest = float(np.max(seen["max_force"]))

    atoms = cell()
    atoms.calc = MetatomicCalculator(str(model), uncertainty_threshold=None)
    rng = np.random.default_rng(seed)
    dyn = langevin(atoms, args.temperature, rng)
    # candidates: frames more uncertain than any training structure
    candidates = folder / "candidates.xyz"
    collect = UncertaintyMonitor(
        dyn, force_threshold=largest, snapshots=candidates, stop=False
    )
    dyn.attach(collect, interval=args.md_interval)
    # safety: stop where the model is far out of its range
    guard = UncertaintyMonitor(
        dyn, force_threshold=args.stop_factor * largest, log=folder / "md.csv"
    )
    stopped = run_until_uncertain(dyn, args.md_steps, guard, args.md_interval)
    n_candidates = len(ase.io.read(candidates, ":")) if candidates.exists() else 0
    logger.info(
        "MD: %s, %d candidates above %.3g eV/A",
        f"stopped at step {stopped.step}" if stopped else f"{args.md_steps} steps",
        n_candidates,
        largest,
    )
    return candidates


def run(args: argparse.Namespace) -> dict:
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    train_frames = label(rattled(args.initial, 0.05, rng))
    ase.io.write(
        out / "valid.xyz", label(rattled(max(2, args.initial // 4), 0.05, rng))
    )
    test_file = out / "test.xyz"
    ase.io.write(test_file, label(emt_md(args.test, args.temperature, args.seed + 1)))

    rounds = []
    for r in range(args.rounds + 1):
        folder = out / f"round-{r}"
        folder.mkdir(exist_ok=True)
        ase.io.write(folder / "train.xyz", train_frames)
        result = shallow_ensemble.train(
            config(folder, args), folder / "run", overwrite=True, progress=False
        )
        model = shallow_ensemble.export_model(result.model, folder / "model.pt")
        metrics = {"n_train": len(train_frames), **test_metrics(model, test_file)}
        rounds.append(metrics)
        logger.info("round %d: %s", r, json.dumps(metrics))
        if r == args.rounds:
            break
        candidates = explore(model, folder, args, seed=args.seed + 10 + r)
        if not candidates.exists():
            logger.info("no candidate above the training uncertainty: done")
            break
        n_candidates = len(ase.io.read(candidates, ":"))
        picked = select_structures(
            model, candidates, min(args.select, n_candidates), diversity=True
        )
        picked.write(folder / "selected.xyz")
        train_frames = train_frames + label(picked.frames)

    summary = {"rounds": rounds}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outdir", default="al-run", help="output folder")
    p.add_argument("--rounds", type=int, default=2, help="MD/select/retrain rounds")
    p.add_argument("--initial", type=int, default=16, help="initial rattled cells")
    p.add_argument("--test", type=int, default=10, help="EMT MD test frames")
    p.add_argument("--members", type=int, default=8, help="ensemble members")
    p.add_argument("--epochs", type=int, default=60, help="epochs per training")
    p.add_argument("--temperature", type=float, default=1500.0, help="MD, K")
    p.add_argument("--md-steps", type=int, default=400, help="MD steps per round")
    p.add_argument("--md-interval", type=int, default=5, help="steps between checks")
    p.add_argument(
        "--stop-factor",
        type=float,
        default=20.0,
        help="stop the MD above this times the training set's largest uncertainty",
    )
    p.add_argument("--select", type=int, default=16, help="structures per round")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    summary = main()
    first, last = summary["rounds"][0], summary["rounds"][-1]
    print(
        f"force RMSE on EMT MD frames: {first['force_rmse']:.4f} -> "
        f"{last['force_rmse']:.4f} eV/A; mean largest force uncertainty "
        f"{first['mean_max_force_sigma']:.4f} -> {last['mean_max_force_sigma']:.4f}"
    )
