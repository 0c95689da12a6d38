"""Calibration fits and reports on ensemble predictions: components without spread,
collapsed ensembles, one-member models, non-finite predictions."""

import math

import pytest
import torch

from shallow_ensemble.calibration import metrics
from shallow_ensemble.calibration.predictions import (
    ZERO_SPREAD_RTOL,
    EnsemblePredictions,
    evaluate_predictions,
    fit_calibration,
    non_finite_structures,
    zero_spread,
)
from shallow_ensemble.errors import CalibrationError, ShallowEnsembleError


DTYPE = torch.float64
PROBABILISTIC = ("nll", "crps", "rll", "miscalibration_area", "alpha", "z_mean")


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=DTYPE)


def _predictions(forces: torch.Tensor, forces_ref: torch.Tensor):
    """Four structures of 2, 2, 1, 1 atoms and three members; structure 2 (a lone
    atom) has the same energy in every member.

    Energies (mean, std, error): (2, 1, 2), (2, 2, -2), (5, 0, 2), (0, 1, 0); the
    per-atom energies split each structure's members equally between its atoms.
    """
    atomic = _t(
        [
            [0.5, 1.0, 1.5],
            [0.5, 1.0, 1.5],
            [0.0, 1.0, 2.0],
            [0.0, 1.0, 2.0],
            [5.0, 5.0, 5.0],
            [-1.0, 0.0, 1.0],
        ]
    )
    system_index = torch.tensor([0, 0, 1, 1, 2, 3])
    energies = torch.zeros(4, 3, dtype=DTYPE).index_add(0, system_index, atomic)
    return EnsemblePredictions(
        energies=energies,
        energy_ref=_t([4.0, 0.0, 7.0, 0.0]),
        n_atoms=torch.tensor([2, 2, 1, 1]),
        atomic=atomic,
        forces=forces,
        forces_ref=forces_ref,
        system_index=system_index,
    )


def _forces():
    """Random member forces ``(3, 6, 3)``; the lone atom (index 4) has zero forces
    in every member and atom 5's x component differs between members by rounding
    noise only: 4 components without spread."""
    generator = torch.Generator().manual_seed(0)
    forces = torch.randn(3, 6, 3, dtype=DTYPE, generator=generator)
    forces[:, 4] = 0.0
    forces[:, 5, 0] = _t([1e-16, -1e-16, 0.0])
    forces_ref = torch.randn(6, 3, dtype=DTYPE, generator=generator)
    forces_ref[4] = _t([0.1, -0.2, 0.0])  # the reference need not be zero
    keep = torch.ones(6, 3, dtype=torch.bool)
    keep[4] = False
    keep[5, 0] = False
    return forces, forces_ref, keep


def test_zero_spread_mask_and_threshold():
    mean = _t([3.0, 4.0, 0.0, 1.0])
    std = _t([0.0, 1e-13, 1e-11, 2.0])
    zero, threshold = zero_spread(mean, std)
    # rms(mean) = sqrt(26/4) is larger than rms(std) = sqrt(4/4)
    assert threshold == pytest.approx(ZERO_SPREAD_RTOL * math.sqrt(6.5), rel=1e-15)
    assert zero.tolist() == [True, True, False, False]
    # a larger spread sets the scale when the values are small
    zero, threshold = zero_spread(torch.zeros(2, dtype=DTYPE), _t([0.0, 4.0]))
    assert threshold == pytest.approx(ZERO_SPREAD_RTOL * math.sqrt(8.0), rel=1e-15)
    assert zero.tolist() == [True, False]


def test_fit_calibration_leaves_out_zero_spread_components():
    forces, forces_ref, keep = _forces()
    alphas = fit_calibration(_predictions(forces, forces_ref))
    # z of the structures with a spread: 2, -1, 0
    assert alphas["alpha_energy"] == pytest.approx(math.sqrt(5.0 / 3.0), rel=1e-14)
    # summed per-atom variances 0.5, 2, 1: <err^2 / var> = (8 + 2 + 0) / 3
    assert alphas["alpha_atom"] == pytest.approx(math.sqrt(10.0 / 3.0), rel=1e-14)
    mean, std = forces.mean(dim=0), forces.std(dim=0)
    z = (forces_ref - mean)[keep] / std[keep]
    assert alphas["alpha_forces"] == pytest.approx(
        math.sqrt(float((z**2).mean())), rel=1e-14
    )


def test_evaluate_predictions_reports_and_leaves_out_zero_spread():
    forces, forces_ref, keep = _forces()
    report = evaluate_predictions(_predictions(forces, forces_ref))

    energy = report["energy"]
    # RMSE and MAE of all four structures (errors 2, -2, 2, 0)
    assert energy["rmse"] == pytest.approx(math.sqrt(3.0), rel=1e-15)
    assert energy["mae"] == pytest.approx(1.5, rel=1e-15)
    assert energy["n"] == 4
    assert energy["n_zero_spread"] == 1
    # the probabilistic metrics of the other three: z = 2, -1, 0; std = 1, 2, 1
    assert energy["alpha"] == pytest.approx(math.sqrt(5.0 / 3.0), rel=1e-14)
    expected_nll = 0.5 * (math.log(2 * math.pi) + (5.0 + math.log(4.0)) / 3.0)
    assert energy["nll"] == pytest.approx(expected_nll, rel=1e-14)
    assert energy["z_mean"] == pytest.approx(1.0 / 3.0, rel=1e-14)
    kept = (_t([4.0, 0.0, 0.0]), _t([2.0, 2.0, 0.0]), _t([1.0, 2.0, 1.0]))
    assert energy["crps"] == pytest.approx(metrics.crps(*kept), rel=1e-14)
    assert energy["rll"] == pytest.approx(metrics.rll(*kept), rel=1e-14)
    area = metrics.miscalibration_area(*kept)
    assert energy["miscalibration_area"] == pytest.approx(area, rel=1e-14)
    # rms of the means (2, 2, 5, 0) is larger than that of the stds (1, 2, 0, 1)
    assert energy["zero_spread_threshold"] == pytest.approx(
        ZERO_SPREAD_RTOL * math.sqrt(33.0 / 4.0), rel=1e-15
    )

    per_atom = report["energy_per_atom"]
    assert per_atom["n_zero_spread"] == 1
    assert per_atom["mae"] == pytest.approx((1.0 + 1.0 + 2.0 + 0.0) / 4.0, rel=1e-15)
    # z does not change when energies are divided by the number of atoms
    assert per_atom["alpha"] == pytest.approx(math.sqrt(5.0 / 3.0), rel=1e-14)

    f = report["forces"]
    mean, std = forces.mean(dim=0), forces.std(dim=0)
    assert f["n"] == 18
    assert f["n_zero_spread"] == 4
    assert f["rmse"] == pytest.approx(metrics.rmse(forces_ref, mean), rel=1e-15)
    assert f["mae"] == pytest.approx(metrics.mae(forces_ref, mean), rel=1e-15)
    kept = (forces_ref[keep], mean[keep], std[keep])
    summary = metrics.summary(*kept)
    for key in PROBABILISTIC:
        assert f[key] == pytest.approx(summary[key], rel=1e-14), key
    z = (kept[0] - kept[1]) / kept[2]
    assert f["alpha"] == pytest.approx(math.sqrt(float((z**2).mean())), rel=1e-14)


def test_calibrated_predictions_keep_zero_spread():
    forces, forces_ref, _ = _forces()
    predictions = _predictions(forces, forces_ref)
    alphas = fit_calibration(predictions)
    calibrated = predictions.calibrated(alphas["alpha_energy"], alphas["alpha_forces"])
    report = evaluate_predictions(calibrated)
    # recalibrated on the same data: alpha becomes 1 on the components with spread
    assert report["energy"]["alpha"] == pytest.approx(1.0, rel=1e-12)
    assert report["forces"]["alpha"] == pytest.approx(1.0, rel=1e-12)
    assert report["energy"]["n_zero_spread"] == 1
    assert report["forces"]["n_zero_spread"] == 4


def _collapsed(num_members: int = 4):
    """Members equal up to float64 rounding (one ulp apart)."""
    generator = torch.Generator().manual_seed(1)
    atomic = torch.randn(6, 1, dtype=DTYPE, generator=generator) - 100.0
    atomic = atomic.repeat(1, num_members)
    if num_members > 1:
        atomic[:, 1] = torch.nextafter(atomic[:, 1], torch.zeros((), dtype=DTYPE))
    system_index = torch.tensor([0, 0, 0, 1, 1, 2])
    energies = torch.zeros(3, num_members, dtype=DTYPE).index_add(
        0, system_index, atomic
    )
    forces = torch.randn(1, 6, 3, dtype=DTYPE, generator=generator)
    return EnsemblePredictions(
        energies=energies,
        energy_ref=energies[:, 0] + _t([0.1, -0.2, 0.3]),
        n_atoms=torch.tensor([3, 2, 1]),
        atomic=atomic,
        forces=forces.repeat(num_members, 1, 1),
        forces_ref=forces[0] + 0.1,
        system_index=system_index,
    )


def test_collapsed_ensemble_cannot_be_calibrated():
    predictions = _collapsed()
    assert float(predictions.energies.std(dim=1).max()) > 0  # rounding noise
    with pytest.raises(CalibrationError) as caught:
        fit_calibration(predictions)
    message = str(caught.value)
    for fragment in (
        "4 ensemble members predict the same energy for each of the 3 validation "
        "structures",
        "largest spread",
        "collapsed",
        "training.random_heads_std",
        "float64",
        "calibration.enabled: false",
    ):
        assert fragment in message
    assert isinstance(caught.value, ShallowEnsembleError)


def test_collapsed_forces_cannot_be_calibrated():
    predictions = _collapsed()
    predictions.energies[:, 0] += _t([0.1, 0.2, 0.3])  # the energies have a spread
    predictions.atomic[[0, 3, 5], 0] += _t([0.1, 0.2, 0.3])
    with pytest.raises(CalibrationError, match="same force for each of the 18 "):
        fit_calibration(predictions)


def test_collapsed_ensemble_is_evaluated_without_uncertainty_metrics():
    predictions = _collapsed()
    report = evaluate_predictions(predictions)
    for name, n in (("energy", 3), ("energy_per_atom", 3), ("forces", 18)):
        values = report[name]
        assert values["n"] == values["n_zero_spread"] == n
        assert not set(PROBABILISTIC) & set(values), name
    assert report["energy"]["rmse"] == pytest.approx(
        math.sqrt((0.01 + 0.04 + 0.09) / 3.0), rel=1e-9
    )
    assert report["forces"]["mae"] == pytest.approx(0.1, rel=1e-9)


def test_one_member_model_keeps_factors_of_one():
    predictions = _collapsed(num_members=1)
    assert fit_calibration(predictions) == {
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
    report = evaluate_predictions(predictions)
    for values in report.values():
        assert set(values) == {"rmse", "mae", "n"}


def test_calibration_needs_reference_energies():
    forces, forces_ref, _ = _forces()
    predictions = _predictions(forces, forces_ref)
    predictions.energy_ref = None
    with pytest.raises(CalibrationError, match="calibration needs reference energies"):
        fit_calibration(predictions)


def test_non_finite_structures():
    forces, forces_ref, _ = _forces()
    predictions = _predictions(forces, forces_ref)
    assert non_finite_structures(predictions) == []
    predictions.energies[1, 2] = math.nan
    predictions.forces[0, 4, 1] = math.inf  # structure 2
    assert non_finite_structures(predictions) == [1, 2]
    predictions.atomic[0, 0] = -math.inf  # structure 0
    assert non_finite_structures(predictions) == [0, 1, 2]
    with pytest.raises(CalibrationError, match="3 of 4 validation structures"):
        fit_calibration(predictions)
