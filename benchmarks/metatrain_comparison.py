"""Extending a metatrain PET: our Laplace (+ fine-tune) ensembles vs metatrain's LLPR.

On one data split (written to ``OUTPUT/{train,valid,test}.xyz``), trains a small PET
with ``mtt train``, then builds four ensembles of the same model:

- ``ours: laplace``: wrap + last-layer Laplace heads + calibration (no epoch);
- ``ours: laplace + finetune``: the same, then a short energy + force NLL fine-tune
  (heads only or full model) and calibration;
- ``mtt llpr``: metatrain's ``llpr`` architecture, covariance and calibration only;
- ``mtt llpr + ensemble training``: the same with its ensemble-weight training.

Every ensemble is evaluated the same way, from its exported ``.pt`` file on the test
structures: energies and member forces (autograd of each member's energy), test RMSE
and RLL (``shallow_ensemble.calibration.metrics``) as exported ("raw") and after
stretching the members by an NLL-optimal factor fitted on the validation set ("cal",
what our export already contains). Costs are wall times of each step (for metatrain,
of the whole ``mtt train`` command, which also evaluates the sets at its end).

    python benchmarks/metatrain_comparison.py --output runs/mtt-comparison \\
        --json mtt.json --markdown mtt.md

Prints one summary line.
"""

import argparse
import json
import subprocess
import time
from pathlib import Path

import ase.io
import numpy as np
import torch
import yaml

from shallow_ensemble.calibration import metrics
from shallow_ensemble.config import config_from_dict
from shallow_ensemble.export import export_model
from shallow_ensemble.training import load_model, run_protocol


ETHANOL = Path(__file__).parents[1] / "python/shallow_ensemble/resources/ethanol.xyz"


def write_split(data: Path, output: Path, seed: int) -> dict[str, Path]:
    frames = ase.io.read(str(data), ":")
    order = np.random.default_rng(seed).permutation(len(frames))
    n_valid = n_test = int(round(0.15 * len(frames)))
    parts = {
        "test": order[:n_test],
        "valid": order[n_test : n_test + n_valid],
        "train": order[n_test + n_valid :],
    }
    paths = {}
    for name, indices in parts.items():
        paths[name] = output / f"{name}.xyz"
        ase.io.write(str(paths[name]), [frames[i] for i in indices])
    return paths


def dataset_section(path: Path) -> dict:
    return {
        "systems": {"read_from": str(path), "length_unit": "angstrom"},
        "targets": {
            "energy": {"key": "energy", "unit": "eV", "forces": {"key": "forces"}}
        },
    }


def mtt_train(options: dict, folder: Path, name: str) -> float:
    """``mtt train`` in ``folder``; returns its wall time (reused if done)."""
    folder.mkdir(parents=True, exist_ok=True)
    timing = folder / "seconds.json"
    if (folder / f"{name}.pt").exists() and timing.exists():
        return json.loads(timing.read_text())["seconds"]
    with open(folder / "options.yaml", "w") as fd:
        yaml.safe_dump(options, fd)
    start = time.perf_counter()
    with open(folder / "mtt.log", "w") as log:
        subprocess.run(
            ["mtt", "train", "options.yaml", "-o", f"{name}.pt"],
            cwd=folder,
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    seconds = time.perf_counter() - start
    timing.write_text(json.dumps({"seconds": seconds}))
    return seconds


def ensemble_predictions(path: Path, frames, ensemble_output: str):
    """Member energies ``(n, M)``, member forces ``(M, n_atoms, 3)`` of a model."""
    from metatomic.torch import (
        ModelEvaluationOptions,
        ModelOutput,
        load_atomistic_model,
        systems_to_torch,
    )
    from vesin.metatomic import neighbor_lists_for_model

    model = load_atomistic_model(str(path))
    dtype = getattr(torch, model.capabilities().dtype)
    calculators = neighbor_lists_for_model("angstrom", model)
    options = ModelEvaluationOptions(
        length_unit="angstrom",
        outputs={ensemble_output: ModelOutput(unit="eV", sample_kind="system")},
    )
    energies, forces = [], []
    for atoms in frames:
        system = systems_to_torch(atoms, dtype=dtype, positions_requires_grad=True)
        for calculator in calculators:
            calculator.add_neighbor_list([system])
        members = model([system], options, check_consistency=False)[ensemble_output]
        members = members.block().values[0]
        grads = [
            torch.autograd.grad(e, system.positions, retain_graph=True)[0]
            for e in members
        ]
        energies.append(members.detach().double())
        forces.append(-torch.stack(grads).double())
    return torch.stack(energies), torch.cat(forces, dim=1)


def references(frames):
    energy = torch.tensor([a.get_potential_energy() for a in frames])
    forces = torch.tensor(np.concatenate([a.get_forces() for a in frames]))
    return energy, forces


def stretch(members: torch.Tensor, alpha: float, dim: int) -> torch.Tensor:
    mean = members.mean(dim=dim, keepdim=True)
    return mean + alpha * (members - mean)


def evaluate(path: Path, output: str, valid, test) -> dict:
    """Test metrics as exported and after an NLL-optimal validation alpha."""
    e_v, f_v = ensemble_predictions(path, valid, output)
    e_t, f_t = ensemble_predictions(path, test, output)
    (ev_ref, fv_ref), (et_ref, ft_ref) = references(valid), references(test)
    alpha_e = metrics.alpha(ev_ref, e_v.mean(1), e_v.std(1))
    alpha_f = metrics.alpha(fv_ref, f_v.mean(0), f_v.std(0))
    report = {
        "energy_rmse": metrics.rmse(et_ref, e_t.mean(1)),
        "forces_rmse": metrics.rmse(ft_ref, f_t.mean(0)),
        "valid_alpha_energy": alpha_e,
        "valid_alpha_forces": alpha_f,
    }
    for tag, (energies, forces) in {
        "raw": (e_t, f_t),
        "cal": (stretch(e_t, alpha_e, 1), stretch(f_t, alpha_f, 0)),
    }.items():
        report[f"energy_rll_{tag}"] = metrics.rll(
            et_ref, energies.mean(1), energies.std(1)
        )
        report[f"forces_rll_{tag}"] = metrics.rll(ft_ref, forces.mean(0), forces.std(0))
        report[f"forces_nll_{tag}"] = metrics.gaussian_nll(
            ft_ref, forces.mean(0), forces.std(0)
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ETHANOL))
    parser.add_argument("--output", default="runs/mtt-comparison")
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--pet-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--finetune-target", default="full")
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument(
        "--regularizer", default="auto", help="laplace.regularizer (auto, fit, value)"
    )
    parser.add_argument(
        "--forces-loss",
        default="gaussian_nll_ensemble",
        help="training.forces_loss of the fine-tune",
    )
    parser.add_argument(
        "--energy-loss",
        default="gaussian_nll_ensemble",
        help="training.energy_loss of the fine-tune",
    )
    parser.add_argument(
        "--pin-mean",
        action="store_true",
        help="training.pin_mean: keep the PET's energies as the ensemble mean",
    )
    parser.add_argument("--llpr-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()

    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = write_split(Path(args.data), out, args.seed)
    sets = {
        "training_set": dataset_section(paths["train"]),
        "validation_set": dataset_section(paths["valid"]),
        "test_set": dataset_section(paths["test"]),
    }
    pet_options = {
        "seed": args.seed,
        "architecture": {
            "name": "pet",
            "model": {
                "cutoff": 4.5,
                "d_pet": 32,
                "d_head": 32,
                "d_node": 64,
                "d_feedforward": 64,
                "num_heads": 2,
                "num_attention_layers": 1,
                "num_gnn_layers": 1,
            },
            "training": {
                "batch_size": 8,
                "num_epochs": args.pet_epochs,
                "learning_rate": 3e-3,
                "checkpoint_interval": 1000,
            },
        },
        **sets,
    }
    rows = {}
    pet_seconds = mtt_train(pet_options, out / "pet", "pet")
    valid = ase.io.read(str(paths["valid"]), ":")
    test = ase.io.read(str(paths["test"]), ":")

    for label, epochs in (
        ("mtt llpr", None),
        ("mtt llpr + ensemble training", args.llpr_epochs),
    ):
        folder = out / ("llpr" if epochs is None else "llpr-trained")
        options = {
            "seed": args.seed,
            "architecture": {
                "name": "llpr",
                "model": {"num_ensemble_members": {"energy": args.members}},
                "training": {
                    "model_checkpoint": str(out / "pet" / "pet.ckpt"),
                    "batch_size": 8,
                    "num_epochs": epochs,
                },
            },
            **sets,
        }
        seconds = mtt_train(options, folder, "llpr")
        rows[label] = {
            "seconds": seconds,
            **evaluate(folder / "llpr.pt", "energy_ensemble", valid, test),
        }

    config = config_from_dict(
        {
            "data": {"train": str(paths["train"]), "valid": str(paths["valid"])},
            "model": {
                "from_metatomic": str(out / "pet" / "pet.pt"),
                "num_members": args.members,
            },
            "training": {
                "strategy": "protocol",
                "batch_size": 8,
                "forces_loss": args.forces_loss,
                "energy_loss": args.energy_loss,
                "pin_mean": args.pin_mean,
            },
            "laplace": {"regularizer": args.regularizer},
            "protocol": {
                "finetune_epochs": args.finetune_epochs,
                "finetune_target": args.finetune_target,
                "finetune_learning_rate": args.finetune_lr,
            },
        }
    )
    start = time.perf_counter()
    losses = "" if args.forces_loss == "gaussian_nll_ensemble" else "-crps"
    if args.energy_loss != "gaussian_nll_ensemble":
        losses += "-energy-crps"
    if args.pin_mean:
        losses += "-pinned"
    variant = ""
    if args.forces_loss != "gaussian_nll_ensemble":
        variant += f", {args.forces_loss}"
    variant += ", mean pinned" if args.pin_mean else ""
    ours = out / f"ours-{args.finetune_target}-{args.finetune_lr:g}{losses}"
    result = run_protocol(config, ours, overwrite=True, progress=False)
    total = time.perf_counter() - start
    stages = result.info["stages"]
    for label, checkpoint, seconds in (
        (
            "ours: laplace",
            ours / "2-laplace" / "model.ckpt",
            stages["from_metatomic"]["seconds"] + stages["laplace"]["seconds"],
        ),
        (
            f"ours: laplace + finetune ({args.finetune_target}, "
            f"{args.finetune_epochs} epochs, lr {args.finetune_lr:g}{variant})",
            result.checkpoint,
            total,
        ),
    ):
        path = checkpoint.parent / "extended.pt"
        export_model(load_model(checkpoint), path, dtype="float32")
        rows[label] = {
            "seconds": seconds,
            **evaluate(path, "energy_ensemble", valid, test),
        }

    summary = {"pet_train_seconds": pet_seconds, "members": args.members, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    lines = [
        "| ensemble | time [s] | E RMSE [eV] | F RMSE [eV/Å] | E RLL raw / cal "
        "| F RLL raw / cal | F NLL raw / cal | valid alpha_E | valid alpha_F |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['seconds']:.0f} | {r['energy_rmse']:.3f} | "
            f"{r['forces_rmse']:.3f} | {r['energy_rll_raw']:.1f} / "
            f"{r['energy_rll_cal']:.1f} | {r['forces_rll_raw']:.1f} / "
            f"{r['forces_rll_cal']:.1f} | {r['forces_nll_raw']:.3f} / "
            f"{r['forces_nll_cal']:.3f} | {r['valid_alpha_energy']:.2f} | "
            f"{r['valid_alpha_forces']:.2f} |"
        )
    table = "\n".join(lines)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print(table)
    best = max(rows, key=lambda k: rows[k]["forces_rll_cal"])
    print(
        f"metatrain_comparison: PET {pet_seconds:.0f} s; best calibrated force RLL "
        f"{rows[best]['forces_rll_cal']:.1f} ({best})"
    )


if __name__ == "__main__":
    main()
