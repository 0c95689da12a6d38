"""Ensemble predictions over a dataset, calibration fitting and evaluation."""

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CalibrationError
from ..kinds import ModelKind
from ..losses import voigt
from .metrics import mae, rmse, summary
from .noise_floor import NoiseFloors, floored_std, select_noise_floor
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
    :param numbers: atomic number of each atom ``(n_atoms_total,)`` or ``None``
    :param floors: the noise floors added to the ensemble spreads (none until
        :py:meth:`calibrated` sets them)
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
    numbers: torch.Tensor | None = None
    floors: NoiseFloors = field(default_factory=NoiseFloors)

    @property
    def num_members(self) -> int:
        return self.energies.shape[1]

    def calibrated(
        self,
        alpha_energy: float,
        alpha_forces: float,
        floors: NoiseFloors | None = None,
    ) -> "EnsemblePredictions":
        """Members stretched around their mean by the calibration factors (member
        stresses, gradients like the forces, by ``alpha_forces``, as in the
        exported model), with the noise ``floors`` (none by default) added to the
        spreads that :py:meth:`energy_mean_std` and :py:meth:`forces_mean_std`
        report."""
        return replace(
            self,
            energies=stretch_members(self.energies, alpha_energy, dim=1),
            atomic=stretch_members(self.atomic, alpha_energy, dim=1),
            forces=None
            if self.forces is None
            else stretch_members(self.forces, alpha_forces, dim=0),
            stress=None
            if self.stress is None
            else stretch_members(self.stress, alpha_forces, dim=0),
            floors=NoiseFloors() if floors is None else floors,
        )

    def energy_mean_std(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Structure energies: ensemble mean, uncertainty (the member spread with
        the floor model, :math:`\\sqrt{(s \\sigma)^2 + (N \\sigma_0)^2}`, see
        :py:class:`NoiseFloors`) and the member spread alone, each
        ``(n_structures,)``, eV."""
        mean, std = mean_std(self.energies, 1)
        floors, n_atoms = self.floors, self.n_atoms.to(torch.float64)
        return mean, floored_std(std, floors.energy_scale, floors.energy, n_atoms), std

    def forces_mean_std(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Force components: ensemble mean, uncertainty (member spread with the
        floor model and the element's force floor) and member spread alone, each
        ``(n_atoms, 3)``, eV/Å."""
        assert self.forces is not None, "these predictions have no forces"
        mean, std = mean_std(self.forces, 0)
        floors = self.floors
        floor: torch.Tensor | float = 0.0  # without floors, no atomic numbers needed
        if floors.forces:
            floor = floors.force_floor(self._numbers()).unsqueeze(-1)
        return mean, floored_std(std, floors.forces_scale, floor), std

    def _numbers(self) -> torch.Tensor:
        if self.numbers is None:
            raise CalibrationError(
                "per-element force calibration needs the atomic numbers of the atoms"
            )
        return self.numbers


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
    numbers = []
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
        numbers.append(batch.numbers.cpu())
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
        numbers=torch.cat(numbers),
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


NOISE_FLOOR_FOLDS = 5
"""Cross-validation folds of the validation structures (structure ``i`` in fold ``i
% 5``) that decide whether a noise floor is kept (:py:func:`fit_calibration`)."""


def uncalibrated() -> dict[str, Any]:
    """The calibration dictionary of a model that is not calibrated: factors of 1,
    no floors (the keys of :py:func:`fit_calibration`)."""
    return {
        "alpha_energy": 1.0,
        "alpha_forces": 1.0,
        "alpha_atom": 1.0,
        "sigma0_energy": 0.0,
        "sigma0_atom": 0.0,
        "sigma0_forces": {},
        "floor_scale_energy": 1.0,
        "floor_scale_atom": 1.0,
        "floor_scale_forces": 1.0,
    }


def fit_calibration(
    predictions: EnsemblePredictions, noise_floor: bool = False
) -> dict[str, Any]:
    r"""NLL-optimal global factors for energies, forces and per-atom energies, and
    optionally noise floors (:py:mod:`~shallow_ensemble.calibration.noise_floor`).

    The factors ``alpha_energy``, ``alpha_forces`` and ``alpha_atom`` stretch the
    members (:py:meth:`EnsemblePredictions.calibrated`); without a floor they are
    the NLL-optimal single factors on the components with an ensemble spread
    (:py:func:`zero_spread`). ``alpha_atom`` assumes independent per-atom errors: it
    scales the per-atom member spreads so that their sum in quadrature matches the
    structure energy errors, :math:`\alpha_{atom}^2 = \langle \Delta E^2 / \sum_i
    \sigma_i^2 \rangle`.

    With ``noise_floor``, each uncertainty may also get a floor, a model fitted on all
    components, :math:`\sigma^2 = (\alpha \sigma_{ens})^2 + \sigma_0^2`: the energy
    per atom (``sigma0_energy``, eV/atom), the per-atom energy uncertainty
    (``sigma0_atom``, eV; a structure's variance is the sum over its atoms) and the
    force components of each element (``sigma0_forces``, eV/Å by element symbol; one
    floor per element, or the same floor for all, whichever predicts held-out
    structures better). A floor is kept only if it lowers the NLL of held-out
    structures (:py:func:`~shallow_ensemble.calibration.noise_floor.select_noise_floor`,
    :py:data:`NOISE_FLOOR_FOLDS` folds). Where a floor is kept, the members (which
    cannot carry it) are stretched by the NLL-optimal factor on the components whose
    uncertainty the ensemble term rules (:math:`\alpha \sigma_{ens} \ge \sigma_0`),
    and ``floor_scale_*`` is the floor model's factor over that one; the factor alone
    is driven by the few components whose spread is far below their error (forces
    that vanish by symmetry) and would stretch every other member spread, by up to
    10^3 on tantalum. The per-atom uncertainty has no members: ``alpha_atom`` is the
    floor model's factor. A one-member model gets factors of 1 and no floors.

    :return: the keys of :py:func:`uncalibrated`
    :raises CalibrationError: without reference energies, with non-finite
        predictions, or if the members of an ensemble all predict the same energies
        (or forces): the ensemble has collapsed
    """
    fit = uncalibrated()
    if predictions.num_members < 2:
        return fit
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
    reference = predictions.energy_ref
    fit["alpha_energy"] = fit_alpha(reference[keep], mean[keep], std[keep])
    folds = torch.arange(len(mean)) % NOISE_FLOOR_FOLDS
    n_atoms = predictions.n_atoms.to(torch.float64)
    if noise_floor:
        std_fit = torch.where(zero, torch.zeros_like(std), std)
        alpha, (floor,) = select_noise_floor(
            reference, mean, std_fit, folds, weight=n_atoms
        )
        if floor > 0:
            fit["sigma0_energy"] = floor
            members = _members_factor(
                reference, mean, std_fit, floor * n_atoms, alpha, fit["alpha_energy"]
            )
            fit["alpha_energy"] = members
            fit["floor_scale_energy"] = alpha / members
    if predictions.forces is not None and predictions.forces_ref is not None:
        f_mean, f_std = mean_std(predictions.forces, 0)
        f_zero, _ = zero_spread(f_mean, f_std)
        if bool(f_zero.all()):
            raise _collapsed("force", predictions.num_members, f_std, "eV/Å")
        f_keep = ~f_zero
        fit["alpha_forces"] = fit_alpha(
            predictions.forces_ref[f_keep], f_mean[f_keep], f_std[f_keep]
        )
        if noise_floor:
            f_std_fit = torch.where(f_zero, torch.zeros_like(f_std), f_std)
            alpha, floors = _fit_force_floors(
                predictions, f_mean, f_std_fit, folds[predictions.system_index]
            )
            if any(value > 0 for value in floors.values()):
                fit["sigma0_forces"] = floors
                atom_floor = noise_floors(fit).force_floor(predictions._numbers())
                members = _members_factor(
                    predictions.forces_ref,
                    f_mean,
                    f_std_fit,
                    atom_floor.to(f_std).unsqueeze(-1).expand_as(f_std),
                    alpha,
                    fit["alpha_forces"],
                )
                fit["alpha_forces"] = members
                fit["floor_scale_forces"] = alpha / members
    else:
        fit["alpha_forces"] = fit["alpha_energy"]
    _, atom_std = mean_std(predictions.atomic, 1)
    summed_var = torch.zeros_like(mean).index_add(
        0, predictions.system_index, atom_std**2
    )
    # a structure with an energy spread has atoms with a spread: summed_var > 0
    keep = keep & (summed_var > 0)
    err2 = (reference - mean)[keep] ** 2
    fit["alpha_atom"] = float(torch.sqrt((err2 / summed_var[keep]).mean()))
    if noise_floor:
        summed_std = torch.where(keep, summed_var.sqrt(), torch.zeros_like(std))
        alpha, (floor,) = select_noise_floor(
            reference, mean, summed_std, folds, weight=n_atoms.sqrt()
        )
        if floor > 0:
            fit["sigma0_atom"] = floor
            fit["alpha_atom"] = alpha
    return fit


def _members_factor(
    reference: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    floor: torch.Tensor,
    alpha: float,
    alone: float,
) -> float:
    """The stretch of the members where a floor model ``sigma^2 = (alpha std)^2 +
    floor^2`` is kept: the NLL-optimal factor on the components whose uncertainty the
    ensemble term rules (``alpha * std >= floor``, and a spread), the factor alone
    ``alone`` if there are none. Components whose spread is far below their error
    (forces that vanish by symmetry) would otherwise drive it up and stretch every
    other member spread; the members cannot carry the floor."""
    ensemble = (alpha * std >= floor) & (std > 0)
    if not bool(ensemble.any()):
        return alone
    return fit_alpha(reference[ensemble], mean[ensemble], std[ensemble])


def _fit_force_floors(
    predictions: EnsemblePredictions,
    mean: torch.Tensor,
    std: torch.Tensor,
    folds: torch.Tensor,
) -> tuple[float, dict[str, float]]:
    """The factor of the force floor model and one floor per element (by symbol);
    ``folds``: the cross-validation fold of each atom."""
    from ase.data import chemical_symbols

    assert predictions.forces_ref is not None, "checked by the caller"
    numbers = predictions._numbers()
    elements = sorted({int(z) for z in numbers})
    group = torch.tensor([elements.index(int(z)) for z in numbers], dtype=torch.long)
    alpha, floors = select_noise_floor(
        predictions.forces_ref,
        mean,
        std,
        folds.unsqueeze(-1).expand(-1, 3),
        groups=group.unsqueeze(-1).expand(-1, 3),
        n_groups=len(elements),
    )
    symbols = [chemical_symbols[z] for z in elements]
    return alpha, dict(zip(symbols, floors, strict=True))


def noise_floors(calibration: dict[str, Any]) -> NoiseFloors:
    """The :py:class:`NoiseFloors` of a calibration dictionary
    (:py:func:`fit_calibration`; older ones without floors give none)."""
    from ase.data import atomic_numbers

    return NoiseFloors(
        energy=float(calibration.get("sigma0_energy", 0.0)),
        atom=float(calibration.get("sigma0_atom", 0.0)),
        forces={
            atomic_numbers[symbol]: float(value)
            for symbol, value in calibration.get("sigma0_forces", {}).items()
            if value > 0
        },
        energy_scale=float(calibration.get("floor_scale_energy", 1.0)),
        atom_scale=float(calibration.get("floor_scale_atom", 1.0)),
        forces_scale=float(calibration.get("floor_scale_forces", 1.0)),
    )


def _report(
    y_true: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    num_members: int,
    spread: torch.Tensor | None = None,
) -> dict[str, float]:
    """Metrics of one quantity; ``std`` is the uncertainty (with any noise floor),
    ``spread`` the member spread alone (default: ``std``), which decides the
    components without spread."""
    report = {"rmse": rmse(y_true, mean), "mae": mae(y_true, mean), "n": y_true.numel()}
    if num_members < 2:
        # a deterministic model has no uncertainty to judge
        return report
    zero, threshold = zero_spread(mean, std if spread is None else spread)
    # a noise floor gives the components without spread an uncertainty
    keep = std > threshold
    if bool(keep.any()):
        scores = summary(y_true[keep], mean[keep], std[keep])
        report = {**scores, **report}  # RMSE, MAE and n of all the components
    report["n_zero_spread"] = int(zero.sum())
    report["zero_spread_threshold"] = threshold
    report["n_scored"] = int(keep.sum())
    return report


def evaluate_predictions(
    predictions: EnsemblePredictions,
) -> dict[str, Any]:
    """Accuracy and calibration metrics (energies per structure, force components,
    force components by element, and the six stress components of the structures
    with a reference stress, eV/Å³).

    RMSE, MAE and ``n`` use every component. The uncertainties include the noise
    floors of ``predictions.floors``. For an ensemble, components without spread
    (:py:func:`zero_spread`; ``n_zero_spread`` counts them and
    ``zero_spread_threshold`` is the threshold used, in the quantity's units) are left
    out of the probabilistic metrics (NLL, CRPS, RLL, miscalibration area, alpha, z
    statistics) unless a noise floor gives them an uncertainty (``n_scored`` counts
    the components in those metrics). If no component has
    an uncertainty (a collapsed ensemble) only RMSE and MAE are reported; a
    one-member model reports RMSE, MAE and ``n`` only. ``forces_by_element`` maps
    element symbols to the same metrics for the force components of that element's
    atoms.
    """
    report: dict[str, Any] = {}
    members = predictions.num_members
    if predictions.energy_ref is not None:
        mean, std, spread = predictions.energy_mean_std()
        n_atoms = predictions.n_atoms
        report["energy"] = _report(predictions.energy_ref, mean, std, members, spread)
        report["energy_per_atom"] = _report(
            predictions.energy_ref / n_atoms,
            mean / n_atoms,
            std / n_atoms,
            members,
            spread / n_atoms,
        )
    if predictions.forces is not None and predictions.forces_ref is not None:
        mean, std, spread = predictions.forces_mean_std()
        reference = predictions.forces_ref
        report["forces"] = _report(reference, mean, std, members, spread)
        if predictions.numbers is not None:
            from ase.data import chemical_symbols

            numbers = predictions.numbers
            report["forces_by_element"] = {
                chemical_symbols[z]: _report(
                    reference[numbers == z],
                    mean[numbers == z],
                    std[numbers == z],
                    members,
                    spread[numbers == z],
                )
                for z in sorted({int(z) for z in numbers})
            }
    if predictions.stress is not None and predictions.stress_ref is not None:
        mask = predictions.stress_mask
        assert mask is not None, "a reference stress comes with its mask"
        members_voigt = voigt(predictions.stress[:, mask])
        mean, std = mean_std(members_voigt, 0)
        reference = voigt(predictions.stress_ref[mask])
        report["stress"] = _report(reference, mean, std, members)
    return report
