"""Ensemble predictions over a dataset, calibration fitting and evaluation."""

from dataclasses import dataclass

import torch

from ..model import EnsembleModel
from .metrics import mae, rmse, summary
from .recalibrate import fit_alpha, stretch_members


@dataclass
class EnsemblePredictions:
    """Member predictions and references for a set of structures (float64, CPU).

    :param energies: member energies ``(n_structures, M)``, eV
    :param energy_ref: reference energies ``(n_structures,)`` or ``None``
    :param n_atoms: ``(n_structures,)``
    :param atomic: per-atom member energies ``(n_atoms_total, M)``, eV
    :param forces: member forces ``(M, n_atoms_total, 3)``, eV/angstrom, or ``None``
    :param forces_ref: ``(n_atoms_total, 3)`` or ``None``
    """

    energies: torch.Tensor
    energy_ref: torch.Tensor | None
    n_atoms: torch.Tensor
    atomic: torch.Tensor
    forces: torch.Tensor | None
    forces_ref: torch.Tensor | None
    system_index: torch.Tensor

    @property
    def num_members(self) -> int:
        return self.energies.shape[1]

    def calibrated(
        self, alpha_energy: float, alpha_forces: float
    ) -> "EnsemblePredictions":
        """Members stretched around their mean by the calibration factors."""
        return EnsemblePredictions(
            energies=stretch_members(self.energies, alpha_energy, dim=1),
            energy_ref=self.energy_ref,
            n_atoms=self.n_atoms,
            atomic=stretch_members(self.atomic, alpha_energy, dim=1),
            forces=None
            if self.forces is None
            else stretch_members(self.forces, alpha_forces, dim=0),
            forces_ref=self.forces_ref,
            system_index=self.system_index,
        )


def predict_dataset(
    model: EnsembleModel, dataset, batch_size: int = 8, forces: bool = True
) -> EnsemblePredictions:
    """Uncalibrated member energies (and member forces) of every structure."""
    from ..data import iterate_batches

    parameter = next(model.parameters())
    energies, refs, n_atoms, atomic, member_forces, forces_ref, system_index = (
        [],
        [],
        [],
        [],
        [],
        [],
        [],
    )
    offset = 0
    for batch in iterate_batches(dataset, batch_size, shuffle=False):
        batch = batch.to(device=parameter.device, dtype=parameter.dtype)
        mode = "members" if forces else "none"
        if forces and model.num_members == 1:
            mode = "mean"
        prediction = model.predict(batch, forces=mode)
        energies.append(prediction.energies.detach().double().cpu())
        atomic.append(prediction.atomic.detach().double().cpu())
        n_atoms.append(batch.n_atoms.cpu())
        system_index.append(batch.system_index.cpu() + offset)
        offset += batch.n_systems
        if batch.energy is not None:
            refs.append(batch.energy.double().cpu())
        if forces:
            member_forces.append(prediction.forces.detach().double().cpu())
            if batch.forces is not None:
                forces_ref.append(batch.forces.double().cpu())
    n_batches = len(energies)
    return EnsemblePredictions(
        energies=torch.cat(energies),
        energy_ref=torch.cat(refs) if len(refs) == n_batches else None,
        n_atoms=torch.cat(n_atoms),
        atomic=torch.cat(atomic),
        forces=torch.cat(member_forces, dim=1) if forces else None,
        forces_ref=torch.cat(forces_ref)
        if forces and len(forces_ref) == n_batches
        else None,
        system_index=torch.cat(system_index),
    )


def _mean_std(members: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = members.mean(dim=dim)
    if members.shape[dim] < 2:
        return mean, torch.zeros_like(mean)
    return mean, members.std(dim=dim)


def fit_calibration(predictions: EnsemblePredictions) -> dict[str, float]:
    """NLL-optimal global factors for energies, forces and per-atom energies.

    ``alpha_atom`` assumes independent per-atom errors: it scales the per-atom member
    spreads so that their sum in quadrature matches the structure energy errors,
    :math:`\\alpha_{atom}^2 = \\langle \\Delta E^2 / \\sum_i \\sigma_i^2 \\rangle`.
    """
    if predictions.num_members < 2:
        return {"alpha_energy": 1.0, "alpha_forces": 1.0, "alpha_atom": 1.0}
    if predictions.energy_ref is None:
        raise ValueError("calibration needs reference energies")
    mean, std = _mean_std(predictions.energies, 1)
    alphas = {"alpha_energy": fit_alpha(predictions.energy_ref, mean, std)}
    if predictions.forces is not None and predictions.forces_ref is not None:
        f_mean, f_std = _mean_std(predictions.forces, 0)
        alphas["alpha_forces"] = fit_alpha(predictions.forces_ref, f_mean, f_std)
    else:
        alphas["alpha_forces"] = alphas["alpha_energy"]
    _, atom_std = _mean_std(predictions.atomic, 1)
    summed_var = torch.zeros_like(mean).index_add(
        0, predictions.system_index, atom_std**2
    )
    err2 = (predictions.energy_ref - mean) ** 2
    alphas["alpha_atom"] = float(
        torch.sqrt((err2 / summed_var.clamp(min=1e-30)).mean())
    )
    return alphas


def _report(y_true, mean, std) -> dict[str, float]:
    if bool((std > 0).all()):
        return summary(y_true, mean, std)
    # a deterministic model (or a collapsed ensemble) has no uncertainty to judge
    return {"rmse": rmse(y_true, mean), "mae": mae(y_true, mean), "n": y_true.numel()}


def evaluate_predictions(
    predictions: EnsemblePredictions,
) -> dict[str, dict[str, float]]:
    """Accuracy and calibration metrics (energies per structure, force components)."""
    report = {}
    if predictions.energy_ref is not None:
        mean, std = _mean_std(predictions.energies, 1)
        n_atoms = predictions.n_atoms
        report["energy"] = _report(predictions.energy_ref, mean, std)
        report["energy_per_atom"] = _report(
            predictions.energy_ref / n_atoms, mean / n_atoms, std / n_atoms
        )
    if predictions.forces is not None and predictions.forces_ref is not None:
        mean, std = _mean_std(predictions.forces, 0)
        report["forces"] = _report(predictions.forces_ref, mean, std)
    return report
