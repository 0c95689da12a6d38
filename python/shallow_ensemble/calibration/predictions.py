"""Ensemble predictions over a dataset, calibration fitting and evaluation."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import CalibrationError
from ..kinds import ModelKind
from ..losses import voigt
from .metrics import mae, rmse, summary
from .recalibrate import fit_alpha, stretch_members


if TYPE_CHECKING:
    from ..data import Batch, Graph, GraphDataset


@dataclass
class EnsemblePredictions:
    """Member predictions and references for a set of structures (float64, CPU).

    :param energies: member energies ``(n_structures, M)``, eV
    :param energy_ref: reference energies ``(n_structures,)`` or ``None``
    :param n_atoms: ``(n_structures,)``
    :param atomic: per-atom member energies ``(n_atoms_total, M)``, eV
    :param forces: member forces ``(M, n_atoms_total, 3)``, eV/angstrom, or ``None``
    :param forces_ref: ``(n_atoms_total, 3)`` or ``None``
    :param stress: member stresses ``(M, n_structures, 3, 3)``, eV/Å³, or ``None``
    :param stress_ref: reference stresses ``(n_structures, 3, 3)`` (zeros where
        ``stress_mask`` is ``False``) or ``None``
    :param stress_mask: which structures have a reference stress, ``(n_structures,)``
    """

    energies: torch.Tensor
    energy_ref: torch.Tensor | None
    n_atoms: torch.Tensor
    atomic: torch.Tensor
    forces: torch.Tensor | None
    forces_ref: torch.Tensor | None
    system_index: torch.Tensor
    stress: torch.Tensor | None = None
    stress_ref: torch.Tensor | None = None
    stress_mask: torch.Tensor | None = None

    @property
    def num_members(self) -> int:
        return self.energies.shape[1]

    def calibrated(
        self, alpha_energy: float, alpha_forces: float
    ) -> "EnsemblePredictions":
        """Members stretched around their mean by the calibration factors (member
        stresses, gradients like the forces, by ``alpha_forces``, as in the
        exported model)."""
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
            stress=None
            if self.stress is None
            else stretch_members(self.stress, alpha_forces, dim=0),
            stress_ref=self.stress_ref,
            stress_mask=self.stress_mask,
        )


def predict_dataset(
    model: ModelKind,
    dataset: "GraphDataset | Sequence[Graph]",
    batch_size: int = 8,
    forces: bool = True,
) -> EnsemblePredictions:
    """Uncalibrated member energies (and member forces) of every structure, and the
    member stresses of the structures with a reference stress (if the model kind
    predicts stresses)."""
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
    stresses: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    offset = 0
    for batch in iterate_batches(dataset, batch_size, shuffle=False):
        batch = batch.to(device=parameter.device, dtype=parameter.dtype)
        mode = "members" if forces else "none"
        if forces and model.num_members == 1:
            mode = "mean"
        with_stress = forces and model.predicts_stress and batch.stress is not None
        prediction = model.predict(batch, forces=mode, stress=with_stress)
        n_members = 1 if prediction.forces is None else prediction.forces.shape[0]
        stresses.append(_batch_stress(prediction.stress, batch, n_members))
        energies.append(prediction.energies.detach().double().cpu())
        atomic.append(prediction.atomic.detach().double().cpu())
        n_atoms.append(batch.n_atoms.cpu())
        system_index.append(batch.system_index.cpu() + offset)
        offset += batch.n_systems
        if batch.energy is not None:
            refs.append(batch.energy.double().cpu())
        if forces:
            assert prediction.forces is not None, "forces were asked for"
            member_forces.append(prediction.forces.detach().double().cpu())
            if batch.forces is not None:
                forces_ref.append(batch.forces.double().cpu())
    n_batches = len(energies)
    stress_mask = torch.cat([mask for _, _, mask in stresses])
    has_stress = bool(stress_mask.any())
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
        stress=torch.cat([s for s, _, _ in stresses], dim=1) if has_stress else None,
        stress_ref=torch.cat([r for _, r, _ in stresses]) if has_stress else None,
        stress_mask=stress_mask if has_stress else None,
    )


def _batch_stress(
    stress: torch.Tensor | None, batch: "Batch", n_members: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Member stresses ``(n_members, n_systems, 3, 3)``, references and mask of a
    batch (zeros, ``False`` where the batch has no reference stress or the model
    none), float64 on the CPU."""
    n = batch.n_systems
    if stress is None or batch.stress is None or batch.stress_mask is None:
        zeros = torch.zeros((n, 3, 3), dtype=torch.float64)
        return (
            zeros.expand(n_members, -1, -1, -1),
            zeros,
            torch.zeros(n, dtype=torch.bool),
        )
    return (
        stress.detach().double().cpu(),
        batch.stress.double().cpu(),
        batch.stress_mask.cpu(),
    )


def mean_std(members: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ensemble mean and (unbiased) std over ``dim``; a zero std for one member."""
    mean = members.mean(dim=dim)
    if members.shape[dim] < 2:
        return mean, torch.zeros_like(mean)
    return mean, members.std(dim=dim)


ZERO_SPREAD_RTOL = 1e-12
r"""Relative threshold below which an ensemble spread counts as zero.

See :py:func:`zero_spread`: :math:`10^{-12}` leaves a margin of about :math:`10^4`
above the float64 rounding (:math:`2.2 \times 10^{-16}`) of sums of many terms."""


def zero_spread(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, float]:
    r"""Which components have no ensemble spread, e.g. the forces on an atom without
    neighbours, or components fixed by symmetry.

    A component has zero spread when its ensemble std is at most
    :py:data:`ZERO_SPREAD_RTOL` times the larger of the root mean squares of ``mean``
    and of ``std`` over all the components given (one quantity: all the structure
    energies, or all the force components):
    :math:`\sigma_i \le 10^{-12} \max(\mathrm{rms}(\mu), \mathrm{rms}(\sigma))`.
    Such a spread is float64 rounding noise, not an uncertainty; an exact zero always
    counts. These components have no place in a likelihood (:math:`z = e/\sigma` is
    infinite), so the calibration and the probabilistic metrics leave them out.

    :param mean: ensemble means, any shape, in the target's units
    :param std: ensemble standard deviations, same shape and units, ``>= 0``
    :return: a boolean mask of ``std``'s shape (``True``: zero spread) and the
        threshold, in the target's units
    """
    mean = mean.detach().to(torch.float64)
    std = std.detach().to(torch.float64)
    if std.numel() == 0:
        return torch.zeros_like(std, dtype=torch.bool), 0.0
    scale = max(
        float(torch.sqrt(torch.mean(mean**2))), float(torch.sqrt(torch.mean(std**2)))
    )
    threshold = ZERO_SPREAD_RTOL * scale
    return std <= threshold, threshold


def non_finite_structures(predictions: EnsemblePredictions) -> list[int]:
    """Indices of the structures with a NaN or infinite member energy, per-atom energy
    or force (in increasing order)."""
    bad = ~torch.isfinite(predictions.energies).all(dim=1)
    atoms_bad = ~torch.isfinite(predictions.atomic).all(dim=1)
    if predictions.forces is not None:
        atoms_bad = atoms_bad | ~torch.isfinite(predictions.forces).all(dim=0).all(-1)
    n_bad_atoms = torch.zeros(bad.shape, dtype=torch.long).index_add(
        0, predictions.system_index, atoms_bad.to(torch.long)
    )
    bad = bad | (n_bad_atoms > 0)
    return [int(i) for i in torch.nonzero(bad).flatten()]


def _collapsed(
    what: str, num_members: int, std: torch.Tensor, unit: str
) -> CalibrationError:
    return CalibrationError(
        f"cannot calibrate the uncertainties: the {num_members} ensemble members "
        f"predict the same {what} for each of the {std.numel()} validation "
        f"{'structures' if what == 'energy' else 'force components'} (largest "
        f"spread {float(std.max()):.3g} {unit}): the ensemble has collapsed. Make "
        "the members differ (e.g. a larger `training.random_heads_std`, "
        "`training.dtype: float64`, more `model.num_members`) or turn the "
        "calibration off with `calibration.enabled: false`"
    )


def fit_calibration(predictions: EnsemblePredictions) -> dict[str, float]:
    r"""NLL-optimal global factors for energies, forces and per-atom energies.

    ``alpha_atom`` assumes independent per-atom errors: it scales the per-atom member
    spreads so that their sum in quadrature matches the structure energy errors,
    :math:`\alpha_{atom}^2 = \langle \Delta E^2 / \sum_i \sigma_i^2 \rangle`.

    Components without ensemble spread (:py:func:`zero_spread`) are left out of the
    fits; a one-member model gets factors of 1.

    :raises CalibrationError: without reference energies, with non-finite
        predictions, or if the members of an ensemble all predict the same energies
        (or forces): the ensemble has collapsed
    """
    if predictions.num_members < 2:
        return {"alpha_energy": 1.0, "alpha_forces": 1.0, "alpha_atom": 1.0}
    if predictions.energy_ref is None:
        raise CalibrationError(
            "calibration needs reference energies: give the validation structures "
            "energies, or turn the calibration off with `calibration.enabled: false`"
        )
    bad = non_finite_structures(predictions)
    if bad:
        raise CalibrationError(
            f"cannot calibrate the uncertainties: the predictions for {len(bad)} of "
            f"{predictions.energies.shape[0]} validation structures are not finite "
            f"(NaN or inf; structure indices {bad[:10]}); check the model and these "
            "structures (e.g. atoms on top of each other)"
        )
    mean, std = mean_std(predictions.energies, 1)
    zero, _ = zero_spread(mean, std)
    if bool(zero.all()):
        raise _collapsed("energy", predictions.num_members, std, "eV")
    keep = ~zero
    alphas = {
        "alpha_energy": fit_alpha(predictions.energy_ref[keep], mean[keep], std[keep])
    }
    if predictions.forces is not None and predictions.forces_ref is not None:
        f_mean, f_std = mean_std(predictions.forces, 0)
        f_zero, _ = zero_spread(f_mean, f_std)
        if bool(f_zero.all()):
            raise _collapsed("force", predictions.num_members, f_std, "eV/Å")
        f_keep = ~f_zero
        alphas["alpha_forces"] = fit_alpha(
            predictions.forces_ref[f_keep], f_mean[f_keep], f_std[f_keep]
        )
    else:
        alphas["alpha_forces"] = alphas["alpha_energy"]
    _, atom_std = mean_std(predictions.atomic, 1)
    summed_var = torch.zeros_like(mean).index_add(
        0, predictions.system_index, atom_std**2
    )
    # a structure with an energy spread has atoms with a spread: summed_var > 0
    keep = keep & (summed_var > 0)
    err2 = (predictions.energy_ref - mean)[keep] ** 2
    alphas["alpha_atom"] = float(torch.sqrt((err2 / summed_var[keep]).mean()))
    return alphas


def _report(
    y_true: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, num_members: int
) -> dict[str, float]:
    report = {"rmse": rmse(y_true, mean), "mae": mae(y_true, mean), "n": y_true.numel()}
    if num_members < 2:
        # a deterministic model has no uncertainty to judge
        return report
    zero, threshold = zero_spread(mean, std)
    keep = ~zero
    if bool(keep.any()):
        scores = summary(y_true[keep], mean[keep], std[keep])
        report = {**scores, **report}  # RMSE, MAE and n of all the components
    report["n_zero_spread"] = int(zero.sum())
    report["zero_spread_threshold"] = threshold
    return report


def evaluate_predictions(
    predictions: EnsemblePredictions,
) -> dict[str, dict[str, float]]:
    """Accuracy and calibration metrics (energies per structure, force components,
    and the six stress components of the structures with a reference stress, eV/Å³).

    RMSE, MAE and ``n`` use every component. For an ensemble, components without
    spread (:py:func:`zero_spread`) are left out of the probabilistic metrics (NLL,
    CRPS, RLL, miscalibration area, alpha, z statistics); ``n_zero_spread`` counts
    them and ``zero_spread_threshold`` is the threshold used (in the quantity's
    units). If every component has zero spread (a collapsed ensemble) only RMSE and
    MAE are reported; a one-member model reports RMSE, MAE and ``n`` only.
    """
    report = {}
    members = predictions.num_members
    if predictions.energy_ref is not None:
        mean, std = mean_std(predictions.energies, 1)
        n_atoms = predictions.n_atoms
        report["energy"] = _report(predictions.energy_ref, mean, std, members)
        report["energy_per_atom"] = _report(
            predictions.energy_ref / n_atoms, mean / n_atoms, std / n_atoms, members
        )
    if predictions.forces is not None and predictions.forces_ref is not None:
        mean, std = mean_std(predictions.forces, 0)
        report["forces"] = _report(predictions.forces_ref, mean, std, members)
    if predictions.stress is not None and predictions.stress_ref is not None:
        mask = predictions.stress_mask
        assert mask is not None, "a reference stress comes with its mask"
        members_voigt = voigt(predictions.stress[:, mask])
        mean, std = mean_std(members_voigt, 0)
        reference = voigt(predictions.stress_ref[mask])
        report["stress"] = _report(reference, mean, std, members)
    return report
