"""``shallow-ensemble evaluate MODEL DATA.xyz [--json out.json] [--plots DIR]``."""

import argparse
import json
from pathlib import Path

from ._common import format_metrics


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="accuracy and calibration metrics of a model on a dataset",
        description="Evaluate a checkpoint (.ckpt) or an exported model (.pt) on an "
        "extended XYZ file: RMSE, MAE, NLL, RLL, miscalibration area and alpha for "
        "energies (per structure) and force components, with optional plots.",
    )
    parser.add_argument(
        "model", help="model.ckpt from `train` or model.pt from `export`"
    )
    parser.add_argument("data", help="extended XYZ file with reference energies/forces")
    parser.add_argument("--json", help="write the metrics to this JSON file")
    parser.add_argument("--plots", help="write parity/calibration PNGs to this folder")
    parser.add_argument("--energy-key", default="energy", help="energy key in the file")
    parser.add_argument("--forces-key", default="forces", help="forces key in the file")
    parser.add_argument("--no-forces", action="store_true", help="skip forces")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="structures per batch"
    )
    parser.add_argument(
        "--extensions",
        help="extensions folder of an exported model (default: "
        "'extensions' next to it)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (an exported model) rather than a
    ``torch.save`` file (a checkpoint), without loading it."""
    import zipfile

    if not Path(path).is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist")
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def predict(args: argparse.Namespace, structures):
    """Calibrated member predictions from a checkpoint or an exported model."""
    import torch

    forces = not args.no_forces
    if not is_torchscript(args.model):
        from ..calibration.predictions import predict_dataset
        from ..data import GraphDataset, check_atomic_types
        from ..training import load_model

        model = load_model(args.model)
        check_atomic_types(structures, model.atomic_types)
        dataset = GraphDataset(structures, model.backbone.cutoff)
        raw = predict_dataset(model, dataset, args.batch_size, forces=forces)
        return raw.calibrated(float(model.alpha_energy), float(model.alpha_forces))

    import ase

    from ..data import check_atomic_types
    from ..export.predict import load_exported, predict_frames

    model = load_exported(args.model, args.extensions)
    check_atomic_types(structures, list(model.capabilities().atomic_types))
    frames = [
        ase.Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
        for s in structures
    ]
    energy_ref = torch.tensor([s.energy for s in structures], dtype=torch.float64)
    forces_ref = (
        torch.cat([torch.tensor(s.forces, dtype=torch.float64) for s in structures])
        if forces
        else None
    )
    return predict_frames(model, frames, forces, energy_ref, forces_ref)


def run(args: argparse.Namespace) -> int:
    from ..calibration.predictions import evaluate_predictions
    from ..data import read_structures

    structures = read_structures(
        args.data,
        energy_key=args.energy_key,
        forces_key=args.forces_key,
        require_forces=not args.no_forces,
    )
    predictions = predict(args, structures)
    report = evaluate_predictions(predictions)
    print(format_metrics(report, title=f"{args.model} on {args.data}:"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fd:
            json.dump(
                {
                    "model": str(args.model),
                    "data": str(args.data),
                    "n_structures": len(structures),
                    **report,
                },
                fd,
                indent=2,
            )
        print(f"wrote {args.json}")
    if args.plots:
        write_plots(predictions, args.plots)
        print(f"wrote plots to {args.plots}")
    return 0


def write_plots(predictions, folder: str) -> None:
    from ..calibration.plots import save_report

    folder_path = Path(folder)
    folder_path.mkdir(parents=True, exist_ok=True)
    if predictions.num_members < 2:
        return
    e_mean = predictions.energies.mean(dim=1)
    e_std = predictions.energies.std(dim=1)
    if predictions.energy_ref is not None:
        save_report(
            str(folder_path / "energy.png"),
            "energy",
            predictions.energy_ref,
            e_mean,
            e_std,
            "eV",
        )
    if predictions.forces is not None and predictions.forces_ref is not None:
        save_report(
            str(folder_path / "forces.png"),
            "forces",
            predictions.forces_ref,
            predictions.forces.mean(dim=0),
            predictions.forces.std(dim=0),
            "eV/Å",
        )
