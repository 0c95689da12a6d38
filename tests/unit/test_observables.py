"""Observable reweighting per member, against closed forms (Gaussian samples)."""

import numpy as np
import pytest
import torch
from ase.units import kB

from shallow_ensemble.observables import (
    cumulant_averages,
    effective_sample_size,
    log_weights,
    reweight_observable,
    reweighted_averages,
)


TEMPERATURE = 300.0
BETA = 1.0 / (kB * TEMPERATURE)
KAPPA = 2.0  # eV / A^2, spring constant of the sampling potential V = KAPPA x^2 / 2


@pytest.fixture(scope="module")
def harmonic_samples():
    """Exact Boltzmann samples of V = KAPPA x^2 / 2 at TEMPERATURE (x in A)."""
    rng = np.random.default_rng(42)
    x = rng.normal(0.0, np.sqrt(1.0 / (BETA * KAPPA)), size=400_000)
    return x - x.mean()  # remove the sampling noise of the first moment


def test_linear_tilt_shifts_the_gaussian_mean(harmonic_samples):
    """V_k = V + c_k x samples N(-c_k / KAPPA, 1 / (beta KAPPA)): both methods."""
    x = harmonic_samples
    tilts = np.array([-0.02, -0.01, 0.0, 0.01, 0.03])  # eV / A
    mean_v = 0.5 * KAPPA * x**2
    members = mean_v[:, None] + tilts[None, :] * x[:, None]
    expected = -tilts / KAPPA
    # statistical error of a reweighted mean: about sigma beta c sigma / sqrt(n),
    # below 1e-4 A here (the shifts are 5e-3 to 1.5e-2 A)
    exact = reweighted_averages(x, members, TEMPERATURE, mean_v)
    np.testing.assert_allclose(exact, expected, atol=1e-4)
    # for a Gaussian and a linear perturbation the first cumulant is exact
    cumulant = cumulant_averages(x, members, TEMPERATURE, mean_v)
    np.testing.assert_allclose(cumulant, expected, atol=1e-4)
    # the second moment: variance + shifted mean squared (exact only)
    second = reweighted_averages(x**2, members, TEMPERATURE, mean_v)
    np.testing.assert_allclose(
        second, 1.0 / (BETA * KAPPA) + expected**2, rtol=1e-2, atol=1e-6
    )


def test_curvature_change_exact_and_first_order(harmonic_samples):
    """V_k = V + d_k x^2 / 2: <x^2>_k = 1 / (beta (KAPPA + d_k)); the cumulant form
    is its first-order expansion, 1 / (beta KAPPA) (1 - d_k / KAPPA)."""
    x = harmonic_samples
    deltas = np.array([-0.4, -0.1, 0.1, 0.4])  # eV / A^2
    mean_v = 0.5 * KAPPA * x**2
    members = mean_v[:, None] + 0.5 * deltas[None, :] * x[:, None] ** 2
    # sampling error of <x^2>: about 3e-3 relative
    exact = reweighted_averages(x**2, members, TEMPERATURE, mean_v)
    np.testing.assert_allclose(exact, 1.0 / (BETA * (KAPPA + deltas)), rtol=6e-3)
    cumulant = cumulant_averages(x**2, members, TEMPERATURE, mean_v)
    np.testing.assert_allclose(
        cumulant, (1.0 - deltas / KAPPA) / (BETA * KAPPA), rtol=6e-3
    )
    # ... and only first order: off by (d / KAPPA)^2 = 4 % for the largest change
    assert abs(cumulant[-1] / exact[-1] - 1) > 0.03


def test_exact_equals_cumulant_to_first_order():
    """With dV = eps * g, exact - cumulant = O(eps^2): halving eps quarters it."""
    rng = np.random.default_rng(0)
    n_frames, n_members = 500, 6
    observable = rng.normal(size=(n_frames, 3))
    gaps = rng.normal(size=(n_frames, n_members)) + 0.5 * observable[:, :1]
    mean_v = rng.normal(size=n_frames)

    def difference(eps):
        members = mean_v[:, None] + eps * gaps / BETA
        exact = reweighted_averages(observable, members, TEMPERATURE, mean_v)
        first = cumulant_averages(observable, members, TEMPERATURE, mean_v)
        return np.abs(exact - first).max(), np.abs(first - observable.mean(0)).max()

    big, shift_big = difference(1e-2)
    small, shift_small = difference(5e-3)
    assert shift_small == pytest.approx(shift_big / 2, rel=1e-12)  # linear in eps
    assert small == pytest.approx(big / 4, rel=0.05)  # quadratic in eps
    assert big < 1e-2 * shift_big


def test_members_equal_to_the_mean_have_no_spread():
    rng = np.random.default_rng(1)
    mean_v = rng.normal(size=50)
    members = np.repeat(mean_v[:, None], 4, axis=1)
    observable = rng.normal(size=(50, 7))
    for method in ("exact", "cumulant"):
        result = reweight_observable(
            observable, members, TEMPERATURE, mean_v, method=method
        )
        assert result.members.shape == (4, 7)
        np.testing.assert_allclose(result.std, 0.0, atol=1e-12)
        np.testing.assert_allclose(result.mean, observable.mean(0), atol=1e-12)
    np.testing.assert_allclose(
        effective_sample_size(members, TEMPERATURE, mean_v), 50.0, rtol=1e-12
    )


@pytest.mark.parametrize("method", ["exact", "cumulant"])
def test_constant_shifts_of_the_potentials_change_nothing(method):
    """A frame-independent offset per member, or of all potentials, cancels."""
    rng = np.random.default_rng(2)
    mean_v = rng.normal(size=80)
    members = mean_v[:, None] + 0.05 * rng.normal(size=(80, 5))
    observable = rng.normal(size=80) + 3.0 * (members[:, 0] - mean_v)
    reference = reweight_observable(
        observable, members, TEMPERATURE, mean_v, method=method
    )
    offsets = np.array([-50.0, 1.0, 0.0, 7.5, 1e3])
    for shifted_members, shifted_mean in (
        (members + offsets, mean_v),
        (members + 123.0, mean_v + 123.0),
        (members - 1e4, mean_v),
    ):
        result = reweight_observable(
            observable, shifted_members, TEMPERATURE, shifted_mean, method=method
        )
        np.testing.assert_allclose(result.members, reference.members, rtol=1e-10)
        np.testing.assert_allclose(result.std, reference.std, rtol=1e-8)
        np.testing.assert_allclose(
            result.effective_sample_size, reference.effective_sample_size, rtol=1e-10
        )


def test_weights_do_not_overflow():
    """beta dV of thousands: the lowest-energy frame takes all the weight."""
    mean_v = np.zeros(4)
    members = np.array([[100.0, -100.0], [200.0, -50.0], [0.0, -300.0], [50.0, 0.0]])
    observable = np.array([1.0, 2.0, 3.0, 4.0])
    log_w = log_weights(members, TEMPERATURE, mean_v)
    assert np.all(np.isfinite(log_w))
    np.testing.assert_allclose(np.exp(log_w).sum(axis=0), 1.0)
    np.testing.assert_allclose(
        reweighted_averages(observable, members, TEMPERATURE, mean_v), [3.0, 3.0]
    )
    np.testing.assert_allclose(effective_sample_size(members, TEMPERATURE, mean_v), 1.0)


def test_effective_sample_size_closed_form():
    """Two frames with weights 1 and exp(-x): (1 + e^-x)^2 / (1 + e^-2x)."""
    x = 0.7
    members = np.array([[0.0], [x / BETA]])
    expected = (1 + np.exp(-x)) ** 2 / (1 + np.exp(-2 * x))
    ess = effective_sample_size(members, TEMPERATURE, np.zeros(2))
    np.testing.assert_allclose(ess, [expected], rtol=1e-12)


def test_defaults_inputs_and_shapes():
    rng = np.random.default_rng(3)
    members = rng.normal(size=(30, 4)) * 0.02
    observable = rng.normal(size=(30, 2, 3))
    # the mean potential defaults to the members' mean
    default = reweight_observable(observable, members, TEMPERATURE)
    explicit = reweight_observable(
        observable, members, TEMPERATURE, members.mean(axis=1)
    )
    np.testing.assert_allclose(default.members, explicit.members)
    assert default.members.shape == (4, 2, 3)
    assert default.std.shape == (2, 3)
    assert default.effective_sample_size.shape == (4,)
    # one column at a time gives the same numbers
    column = reweighted_averages(observable[:, 1, 2], members, TEMPERATURE)
    np.testing.assert_allclose(default.members[:, 1, 2], column)
    # torch tensors are accepted
    from_torch = reweight_observable(
        torch.from_numpy(observable), torch.from_numpy(members), TEMPERATURE
    )
    np.testing.assert_allclose(from_torch.members, default.members)
    np.testing.assert_allclose(
        default.std, default.members.std(axis=0, ddof=1), rtol=1e-12
    )


def test_errors_name_the_parameter():
    members = np.zeros((5, 3))
    with pytest.raises(ValueError, match="`temperature` is -1"):
        reweight_observable(np.zeros(5), members, -1.0)
    with pytest.raises(ValueError, match="`member_energies` has shape"):
        reweight_observable(np.zeros(5), np.zeros(5), 300.0)
    with pytest.raises(ValueError, match="`mean_energy` has shape"):
        reweight_observable(np.zeros(5), members, 300.0, np.zeros(4))
    with pytest.raises(ValueError, match="`observable` has shape"):
        reweight_observable(np.zeros(4), members, 300.0)
    with pytest.raises(ValueError, match="`method` is 'direct'"):
        reweight_observable(np.zeros(5), members, 300.0, method="direct")
    with pytest.raises(ValueError, match="non-finite"):
        reweight_observable(np.zeros(5), np.full((5, 3), np.nan), 300.0)
