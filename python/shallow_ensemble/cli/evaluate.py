"""``shallow-ensemble evaluate MODEL DATA.xyz [--json out.json] [--plots DIR]``."""

import argparse
import os
from pathlib import Path

from ..errors import ShallowEnsembleError
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


class EvaluateError(ShallowEnsembleError, ValueError):
    """``evaluate`` cannot do what it is asked: the model's predictions are not
    finite, or plots are asked for without matplotlib."""


def _writable_folder(folder: Path, option: str, path: str) -> None:
    """The nearest existing ancestor of ``folder`` (or itself) is a writable folder."""
    from ..training.rundir import OutputError

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(
            f"{option} {path} cannot be written: '{existing}' is a file, not a "
            "folder; choose another path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(
            f"{option} {path} cannot be written: the folder '{existing}' is not "
            "writable; choose another path"
        )


def check_outputs(args: argparse.Namespace) -> None:
    """Fail before any work if ``--json`` or ``--plots`` cannot be written (or the
    plots cannot be drawn); nothing is created here."""
    from ..training.rundir import OutputError

    if args.json:
        target = Path(args.json)
        if target.is_dir():
            raise OutputError(
                f"--json {args.json} is an existing folder: name a file, e.g. "
                f"{target / 'metrics.json'}"
            )
        if target.exists() and not os.access(target, os.W_OK):
            raise OutputError(
                f"--json {args.json} is not writable; choose another path"
            )
        _writable_folder(target.parent, "--json", args.json)
    if args.plots:
        target = Path(args.plots)
        if target.exists() and not target.is_dir():
            raise OutputError(
                f"--plots {args.plots} is an existing file: name a folder for the PNGs"
            )
        _writable_folder(target, "--plots", args.plots)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise EvaluateError(
                "--plots needs matplotlib: pip install shallow-ensemble[plots], or "
                "leave out --plots"
            ) from None
    if args.json and args.plots:
        if Path(args.plots).resolve() == Path(args.json).resolve():
            raise OutputError(
                f"--json and --plots name the same path, {args.json}: give the "
                "plots their own folder"
            )


def check_finite(predictions, structures) -> None:
    """Raise, naming the structures, if any prediction is NaN or infinite."""
    from ..calibration.predictions import non_finite_structures

    bad = non_finite_structures(predictions)
    if not bad:
        return
    names = ", ".join(structures[i].source for i in bad[:10])
    if len(bad) > 10:
        names += f" and {len(bad) - 10} more"
    raise EvaluateError(
        f"the model's predictions are not finite (NaN or inf) for {len(bad)} of "
        f"{len(structures)} structures: {names}; check these structures (e.g. atoms "
        "on top of each other) and the model's weights"
    )


def run(args: argparse.Namespace) -> int:
    from ..calibration.predictions import evaluate_predictions
    from ..data import read_structures

    check_outputs(args)
    structures = read_structures(
        args.data,
        energy_key=args.energy_key,
        forces_key=args.forces_key,
        require_forces=not args.no_forces,
    )
    predictions = predict(args, structures)
    check_finite(predictions, structures)
    report = evaluate_predictions(predictions)
    print(format_metrics(report, title=f"{args.model} on {args.data}:"))
    if args.json:
        from ..training.rundir import write_json

        # strict JSON: undefined metrics (e.g. the RLL of one structure) are null
        write_json(
            args.json,
            {
                "model": str(args.model),
                "data": str(args.data),
                "n_structures": len(structures),
                **report,
            },
        )
        print(f"wrote {args.json}")
    if args.plots:
        for path, drawn in write_plots(predictions, args.plots):
            print(f"wrote {path} ({drawn})")
    return 0


def write_plots(predictions, folder: str) -> list[tuple[Path, str]]:
    """One PNG per quantity with references; returns ``(path, what was drawn)``.

    A one-member model gets parity plots only; components without ensemble spread
    are left out of the uncertainty panels (see
    :py:func:`~shallow_ensemble.calibration.plots.save_report`).
    """
    from ..calibration.plots import save_report
    from ..calibration.predictions import mean_std

    folder_path = Path(folder)
    folder_path.mkdir(parents=True, exist_ok=True)
    single = predictions.num_members < 2
    quantities = []
    if predictions.energy_ref is not None:
        mean, std = mean_std(predictions.energies, 1)
        quantities.append(("energy", predictions.energy_ref, mean, std, "eV"))
    if predictions.forces is not None and predictions.forces_ref is not None:
        mean, std = mean_std(predictions.forces, 0)
        quantities.append(("forces", predictions.forces_ref, mean, std, "eV/Å"))
    written = []
    for name, reference, mean, std, unit in quantities:
        path = folder_path / f"{name}.png"
        drawn = save_report(path, name, reference, mean, None if single else std, unit)
        written.append((path, drawn))
    return written
