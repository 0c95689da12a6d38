"""Floors of the probabilistic losses and of the RLL oracle, in closed form.

tests/unit/test_losses.py checks the NLL variance floor below the floor (explicit
value) and tests/unit/calibration/test_metrics.py the RLL limits (oracle 100,
constant sigma = RMSE 0) and that a zero error keeps the RLL finite; here: the CRPS
std floors (below, above, default, per element, per atom), the NLL floors above the
floor and by default, the full-covariance ``eps`` and the exact RLL with a floored
oracle variance.
"""

import math

import pytest
import torch

from shallow_ensemble import losses
from shallow_ensemble.calibration import metrics


DTYPE = torch.float64


def _tensor(values):
    return torch.tensor(values, dtype=DTYPE)


def crps_closed_form(y: float, mu: float, sigma: float) -> float:
    """Gaussian CRPS with math.erf (no torch)."""
    z = (y - mu) / sigma
    cdf = 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return sigma * (z * (2.0 * cdf - 1.0) + 2.0 * pdf - 1.0 / math.sqrt(math.pi))


def test_default_floors_are_consistent():
    assert losses.DEFAULT_VARIANCE_FLOOR == 1e-6
    assert losses.DEFAULT_STD_FLOOR == pytest.approx(
        math.sqrt(losses.DEFAULT_VARIANCE_FLOOR), rel=1e-15
    )


def test_crps_std_below_the_floor_is_the_floor():
    value = losses.gaussian_crps(_tensor([0.3]), _tensor([0.0]), _tensor([1e-5]), 0.01)
    # z = 30: Phi = 1, phi = 0, so CRPS = sigma (z - 1/sqrt(pi)) = 0.3 - 0.01/sqrt(pi)
    assert value.item() == pytest.approx(0.3 - 0.01 / math.sqrt(math.pi), rel=1e-14)
    assert value.item() == pytest.approx(crps_closed_form(0.3, 0.0, 0.01), rel=1e-14)


def test_crps_std_above_the_floor_is_unchanged():
    value = losses.gaussian_crps(_tensor([0.3]), _tensor([0.1]), _tensor([0.5]), 0.01)
    assert value.item() == pytest.approx(crps_closed_form(0.3, 0.1, 0.5), rel=1e-14)


def test_crps_default_floor_and_per_element():
    y, mu = _tensor([0.002, -0.4]), _tensor([0.0, 0.1])
    std = _tensor([1e-7, 0.2])  # the first below the default floor 1e-3, not the second
    value = losses.gaussian_crps(y, mu, std)
    expected = 0.5 * (
        crps_closed_form(0.002, 0.0, 1e-3) + crps_closed_form(-0.4, 0.1, 0.2)
    )
    assert value.item() == pytest.approx(expected, rel=1e-13)
    # the floored element does not depend on its std any more
    std.requires_grad_(True)
    (grad,) = torch.autograd.grad(losses.gaussian_crps(y, mu, std), std)
    assert grad[0] == 0.0 and grad[1] != 0.0


def test_energy_crps_floor_is_per_atom():
    members = _tensor([[100.0, 100.0, 100.0]])  # collapsed: the floor takes over
    value = losses.energy_crps(members, _tensor([101.0]), torch.tensor([10]), 0.05)
    # per atom: y = 10.1, mu = 10, sigma = 0.05 (z = 2)
    assert value.item() == pytest.approx(crps_closed_form(10.1, 10.0, 0.05), rel=1e-12)


def test_force_crps_and_nll_of_a_collapsed_ensemble_use_the_default_floors():
    members = torch.zeros(4, 1, 3, dtype=DTYPE) + _tensor([0.1, -0.2, 0.0])
    target = _tensor([[0.1 + 0.003, -0.2, 0.0 - 0.001]])
    crps = losses.force_crps(members, target)
    floor = losses.DEFAULT_STD_FLOOR
    expected = (
        crps_closed_form(0.003, 0.0, floor)
        + crps_closed_form(0.0, 0.0, floor)
        + crps_closed_form(-0.001, 0.0, floor)
    ) / 3
    assert crps.item() == pytest.approx(expected, rel=1e-9)
    nll = losses.force_nll(members, target)
    var = losses.DEFAULT_VARIANCE_FLOOR
    errors2 = [0.003**2, 0.0, 0.001**2]
    expected = sum(0.5 * (math.log(var) + e2 / var) for e2 in errors2) / 3
    assert nll.item() == pytest.approx(expected, rel=1e-9)


def test_nll_variance_above_the_floor_is_unchanged():
    nll = losses.gaussian_nll(_tensor([0.5]), _tensor([0.1]), _tensor([0.04]), 0.01)
    assert nll.item() == pytest.approx(0.5 * (math.log(0.04) + 0.16 / 0.04), rel=1e-14)


def test_nll_default_variance_floor():
    nll = losses.gaussian_nll(_tensor([0.002]), _tensor([0.0]), _tensor([0.0]))
    assert nll.item() == pytest.approx(0.5 * (math.log(1e-6) + 4e-6 / 1e-6), rel=1e-14)


def test_full_force_nll_of_a_collapsed_ensemble_is_the_eps_gaussian():
    members = torch.zeros(3, 2, 3, dtype=DTYPE) + _tensor([1.0, 2.0, 3.0])
    target = _tensor([[1.0, 2.1, 3.0], [0.9, 2.0, 3.2]])
    eps = 0.01
    value = losses.force_nll_full(members, target, eps=eps)
    # covariance eps * I: 0.5 (|d|^2 / eps + 3 log eps) per atom
    d2 = [0.1**2, 0.1**2 + 0.2**2]
    expected = sum(0.5 * (x / eps + 3 * math.log(eps)) for x in d2) / 2
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_rll_with_a_floored_oracle_variance_closed_form():
    y_true = _tensor([0.0, 1.0, -3.0])
    mean = torch.zeros(3, dtype=DTYPE)
    std = _tensor([1.0, 1.0, 3.0])
    mse = 10.0 / 3.0
    floor = 1e-12 * mse  # the oracle variance of the zero error
    nll_model = 0.5 * ((0.0 + 0.0) + (0.0 + 1.0) + (math.log(9.0) + 1.0)) / 3
    nll_const = 0.5 * (math.log(mse) + 1.0)
    nll_oracle = 0.5 * ((math.log(floor) + 0.0) + (0.0 + 1.0) + (math.log(9) + 1)) / 3
    expected = 100.0 * (nll_model - nll_const) / (nll_oracle - nll_const)
    assert metrics.rll(y_true, mean, std) == pytest.approx(expected, rel=1e-12)
    # the floor is relative to the MSE: the RLL does not depend on the units
    for scale in (1e-6, 1e4):
        scaled = metrics.rll(scale * y_true, mean, scale * std)
        assert scaled == pytest.approx(expected, rel=1e-9)
