"""Evaluating a checkpoint or an exported model on reference data."""

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ShallowEnsembleError
from ._models import PathLike, is_torchscript, load_model


if TYPE_CHECKING:
    from ..calibration.predictions import EnsemblePredictions
    from ..data import Structure


logger = logging.getLogger(__name__)


class EvaluateError(ShallowEnsembleError, ValueError):
    """A model cannot be evaluated as asked: its predictions are not finite, or
    plots are asked for without matplotlib."""


@dataclass
class EvaluationResult:
    """What :py:func:`evaluate_model` found.

    :param model: the model's path, as given
    :param data: the data's path, as given
    :param n_structures: number of structures evaluated
    :param report: quantity (``energy``, ``energy_per_atom``, ``forces``) -> metric
        -> value, see
        :py:func:`~shallow_ensemble.calibration.predictions.evaluate_predictions`
    :param predictions: calibrated member predictions and the references
    """

    model: str
    data: str
    n_structures: int
    report: dict[str, dict[str, float]]
    predictions: "EnsemblePredictions" = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        """The content of the JSON report: model, data, ``n_structures`` and one
        entry per quantity."""
        return {
            "model": self.model,
            "data": self.data,
            "n_structures": self.n_structures,
            **self.report,
        }

    def write_json(self, path: PathLike) -> Path:
        """Write :py:meth:`as_dict` as strict JSON (undefined metrics, e.g. the RLL
        of a single structure, are ``null``), atomically; return the path."""
        from ..training.rundir import write_json

        write_json(Path(path), self.as_dict())
        return Path(path)

    def write_plots(self, folder: PathLike) -> list[tuple[Path, str]]:
        """Parity/calibration PNGs in ``folder``, see :py:func:`write_plots`."""
        return write_plots(self.predictions, folder)


def evaluate_model(
    model_path: PathLike,
    data_path: PathLike,
    *,
    energy_key: str = "energy",
    forces_key: str = "forces",
    forces: bool = True,
    batch_size: int = 8,
    extensions: PathLike | None = None,
) -> EvaluationResult:
    """Accuracy and calibration metrics of a model on an extended XYZ file.

    RMSE, MAE, Gaussian NLL, CRPS, RLL, miscalibration area and alpha for energies
    (per structure and per atom) and force components, with the model's calibration
    applied.

    :param model_path: a checkpoint (``model.ckpt`` from ``train``) or an exported
        model (``model.pt`` from ``export``); the kind is read from the file
    :param data_path: extended XYZ file with reference energies (and forces)
    :param energy_key: energy key in the file
    :param forces_key: forces key in the file
    :param forces: evaluate forces too (the file must hold them)
    :param batch_size: structures per batch (checkpoints only)
    :param extensions: extensions folder of an exported model (default:
        ``extensions`` beside it, if it exists)
    :raises FileNotFoundError: if the model file does not exist
    :raises DataError: for invalid data, or atomic types the model does not know
    :raises EvaluateError: if a prediction is NaN or infinite (naming the structures)
    """
    from ..calibration.predictions import evaluate_predictions
    from ..data import read_structures

    is_torchscript(model_path)  # a missing model fails before the data is read
    structures = read_structures(
        data_path,
        energy_key=energy_key,
        forces_key=forces_key,
        require_forces=forces,
    )
    predictions = predict_structures(
        model_path,
        structures,
        forces=forces,
        batch_size=batch_size,
        extensions=extensions,
    )
    check_finite(predictions, structures)
    return EvaluationResult(
        model=str(model_path),
        data=str(data_path),
        n_structures=len(structures),
        report=evaluate_predictions(predictions),
        predictions=predictions,
    )


def predict_structures(
    model_path: PathLike,
    structures: Sequence["Structure"],
    *,
    forces: bool = True,
    batch_size: int = 8,
    extensions: PathLike | None = None,
) -> "EnsemblePredictions":
    """Calibrated member predictions of a checkpoint or an exported model.

    The atomic types of ``structures`` are checked against the model's first
    (:py:func:`~shallow_ensemble.data.check_atomic_types`).
    """
    if is_torchscript(model_path):
        return _predict_exported(model_path, structures, forces, extensions)
    from ..calibration.predictions import predict_dataset
    from ..data import GraphDataset, check_atomic_types

    model = load_model(model_path)
    check_atomic_types(structures, model.atomic_types)
    dataset = GraphDataset(list(structures), model.cutoff)
    raw = predict_dataset(model, dataset, batch_size, forces=forces)
    return raw.calibrated(
        float(model.alpha_energy), float(model.alpha_forces), model.noise_floors()
    )


def _predict_exported(
    model_path: PathLike,
    structures: Sequence["Structure"],
    forces: bool,
    extensions: PathLike | None,
) -> "EnsemblePredictions":
    import ase
    import torch

    from ..data import check_atomic_types
    from ..export.predict import load_exported, predict_frames

    model = load_exported(
        Path(model_path), None if extensions is None else Path(extensions)
    )
    check_atomic_types(structures, list(model.capabilities().atomic_types))
    frames = [
        ase.Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
        for s in structures
    ]
    # references only where every structure has them (candidates for `select`
    # have none), as for checkpoints (predict_dataset)
    energies = [s.energy for s in structures]
    energy_ref = (
        torch.tensor(energies, dtype=torch.float64)
        if all(e is not None for e in energies)
        else None
    )
    forces_ref = (
        torch.cat([torch.tensor(s.forces, dtype=torch.float64) for s in structures])
        if forces and all(s.forces is not None for s in structures)
        else None
    )
    stress_mask = torch.tensor([s.stress is not None for s in structures])
    stress_ref = torch.stack(
        [
            torch.zeros((3, 3), dtype=torch.float64)
            if s.stress is None
            else torch.tensor(s.stress, dtype=torch.float64)
            for s in structures
        ]
    )
    return predict_frames(
        model, frames, forces, energy_ref, forces_ref, stress_ref, stress_mask
    )


def check_finite(
    predictions: "EnsemblePredictions", structures: Sequence["Structure"]
) -> None:
    """Raise :py:class:`EvaluateError`, naming the structures, if any prediction is
    NaN or infinite."""
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


def check_evaluation_outputs(
    json_path: PathLike | None = None, plots: PathLike | None = None
) -> None:
    """Fail before any work if the JSON report or the plots folder cannot be
    written (or the plots cannot be drawn); nothing is created here.

    The messages name the command's options (``--json``, ``--plots``).

    :raises OutputError: for a path that cannot be written
    :raises EvaluateError: for plots without matplotlib
    """
    if json_path is not None:
        _check_json_path(str(json_path))
    if plots is not None:
        _check_plots_folder(str(plots))
    if json_path is not None and plots is not None:
        from ..training.rundir import OutputError

        if Path(plots).resolve() == Path(json_path).resolve():
            raise OutputError(
                f"--json and --plots name the same path, {json_path}: give the "
                "plots their own folder"
            )


def _check_json_path(path: str) -> None:
    from ..training.rundir import OutputError

    target = Path(path)
    if target.is_dir():
        raise OutputError(
            f"--json {path} is an existing folder: name a file, e.g. "
            f"{target / 'metrics.json'}"
        )
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputError(f"--json {path} is not writable; choose another path")
    _writable_folder(target.parent, "--json", path)


def _check_plots_folder(path: str) -> None:
    from ..training.rundir import OutputError

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(
            f"--plots {path} is an existing file: name a folder for the PNGs"
        )
    _writable_folder(target, "--plots", path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EvaluateError(
            "--plots needs matplotlib: pip install shallow-ensemble[plots], or "
            "leave out --plots"
        ) from None


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


def write_plots(
    predictions: "EnsemblePredictions", folder: PathLike
) -> list[tuple[Path, str]]:
    """One PNG per quantity with references (``energy.png``, ``forces.png``);
    returns ``(path, what was drawn)``.

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


# ------------------------------------------------------------ quickstart --
