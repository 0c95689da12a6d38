import math

import numpy as np
import pytest
import torch

from shallow_ensemble.calibration import metrics


DTYPE = torch.float64


def _tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=DTYPE)


def _heteroscedastic(n: int, true_scale: float, seed: int):
    """Predictions with log-normal std; the truth has ``true_scale`` times that std."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, dtype=DTYPE, generator=generator)
    std = torch.exp(torch.randn(n, dtype=DTYPE, generator=generator))
    noise = torch.randn(n, dtype=DTYPE, generator=generator)
    return mean + true_scale * std * noise, mean, std


def test_rmse_and_mae():
    y_true = _tensor([1.0, 2.0, 3.0, 4.0])
    mean = _tensor([1.0, 0.0, 4.0, 4.0])
    assert metrics.rmse(y_true, mean) == pytest.approx(math.sqrt(5.0 / 4.0), rel=1e-15)
    assert metrics.mae(y_true, mean) == pytest.approx(3.0 / 4.0, rel=1e-15)
    # inputs are flattened
    assert metrics.mae(y_true.reshape(2, 2), mean) == pytest.approx(0.75, rel=1e-15)


def test_metrics_return_floats():
    y_true, mean, std = _heteroscedastic(10, 1.0, 0)
    assert type(metrics.rmse(y_true, mean)) is float
    assert type(metrics.crps(y_true, mean, std)) is float


def test_input_validation():
    with pytest.raises(ValueError, match="`mean` has 3 elements but must have as many"):
        metrics.rmse(torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match="`y_true` is empty"):
        metrics.mae(torch.zeros(0), torch.zeros(0))
    message = "`std` has 1 entries <= 0 but an uncertainty must be positive"
    with pytest.raises(ValueError, match=message):
        metrics.gaussian_nll(torch.zeros(2), torch.zeros(2), _tensor([1.0, 0.0]))


def test_gaussian_nll_is_full():
    y_true, mean, std = _tensor([1.0, 2.0]), _tensor([0.5, 2.0]), _tensor([0.5, 2.0])
    # 0.5 [log 0.25 + 1] and 0.5 log 4 average to 0.25; plus 0.5 log 2 pi
    expected = 0.25 + 0.5 * math.log(2.0 * math.pi)
    assert metrics.gaussian_nll(y_true, mean, std) == pytest.approx(expected, rel=1e-14)


def test_crps_has_no_floor():
    std = _tensor([1e-6])
    value = metrics.crps(_tensor([0.0]), _tensor([0.0]), std)
    phi0 = 1.0 / math.sqrt(2.0 * math.pi)
    assert value == pytest.approx(1e-6 * (2.0 * phi0 - 1.0 / math.sqrt(math.pi)))


def test_alpha():
    y_true = _tensor([2.0, -2.0, 2.0, 1.0])
    std = _tensor([1.0, 1.0, 1.0, 0.5])
    assert metrics.alpha(y_true, torch.zeros(4, dtype=DTYPE), std) == 2.0


def test_rll_oracle_and_constant():
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(500, dtype=DTYPE, generator=generator)
    error = torch.randn(500, dtype=DTYPE, generator=generator)
    y_true = mean + error
    assert metrics.rll(y_true, mean, error.abs()) == pytest.approx(100.0, rel=1e-12)
    rmse = torch.full_like(mean, metrics.rmse(y_true, mean))
    assert metrics.rll(y_true, mean, rmse) == pytest.approx(0.0, abs=1e-10)
    # something in between, and worse than constant when badly mis-ranked
    assert 0.0 < metrics.rll(y_true, mean, 0.5 * error.abs() + 0.5 * rmse) < 100.0
    assert metrics.rll(y_true, mean, 1.0 / (error.abs() + 0.1)) < 0.0


def test_rll_undefined_cases():
    mean = torch.zeros(3, dtype=DTYPE)
    std = torch.ones(3, dtype=DTYPE)
    assert math.isnan(metrics.rll(mean, mean, std))
    assert math.isnan(metrics.rll(_tensor([1.0, -1.0, 1.0]), mean, std))


def test_rll_oracle_floor_for_zero_errors():
    y_true = _tensor([0.0, 1.0, -3.0])
    value = metrics.rll(y_true, torch.zeros(3, dtype=DTYPE), _tensor([1.0, 1.0, 3.0]))
    assert math.isfinite(value)


def test_misscaled_uncertainties_rll_and_alpha():
    # y ~ N(mu, (2 sigma)^2) with log sigma ~ N(0, 1)
    y_true, mean, std = _heteroscedastic(200_000, 2.0, 2)
    assert metrics.alpha(y_true, mean, std) == pytest.approx(2.0, rel=0.01)
    # expected values of the three NLLs (without 0.5 log 2 pi), E[log eps^2] of a
    # standard normal is -(euler_gamma + log 2), E[sigma^2] = e^2
    e_log_eps2 = -(np.euler_gamma + math.log(2.0))
    nll_model = 0.5 * (0.0 + 4.0)
    nll_const = 0.5 * (math.log(4.0) + 2.0 + 1.0)
    nll_oracle = 0.5 * (math.log(4.0) + 0.0 + e_log_eps2 + 1.0)
    expected = 100.0 * (nll_model - nll_const) / (nll_oracle - nll_const)  # ~ 11.8
    misscaled = metrics.rll(y_true, mean, std)
    assert misscaled == pytest.approx(expected, abs=2.0)
    recalibrated = metrics.rll(y_true, mean, 2.0 * std)
    assert recalibrated > misscaled + 40.0


def test_calibrated_by_construction():
    y_true, mean, std = _heteroscedastic(20_000, 1.0, 3)
    assert metrics.miscalibration_area(y_true, mean, std) < 0.02
    assert metrics.alpha(y_true, mean, std) == pytest.approx(1.0, rel=0.05)
    z = metrics.z_statistics(y_true, mean, std)
    assert z["mean"] == pytest.approx(0.0, abs=0.03)
    assert z["std"] == pytest.approx(1.0, abs=0.03)
    assert z["mean_abs"] == pytest.approx(math.sqrt(2.0 / math.pi), abs=0.02)
    assert z["frac_within_1"] == pytest.approx(0.6827, abs=0.015)
    assert z["frac_within_2"] == pytest.approx(0.9545, abs=0.01)


@pytest.mark.parametrize("true_scale", [3.0, 1.0 / 3.0])
def test_miscalibration_area_of_misscaled(true_scale):
    y_true, mean, std = _heteroscedastic(20_000, true_scale, 4)
    assert metrics.miscalibration_area(y_true, mean, std) > 0.1


def test_miscalibration_area_known_value():
    # one sample with z = 0 is inside every interval: observed coverage 1 at every
    # level, area = sum_j (1 - j/4) / 4 for j = 1, 2, 3
    value = metrics.miscalibration_area(
        _tensor([0.0]), _tensor([0.0]), _tensor([1.0]), 3
    )
    assert value == pytest.approx((0.75 + 0.5 + 0.25) / 4.0, rel=1e-15)
    with pytest.raises(ValueError, match="`n_levels` is 0 but must be at least 1"):
        metrics.miscalibration_area(_tensor([0.0]), _tensor([0.0]), _tensor([1.0]), 0)


def test_z_statistics_known_values():
    z = metrics.z_statistics(
        _tensor([1.0, -4.0, 0.5, 3.0]),
        torch.zeros(4, dtype=DTYPE),
        _tensor([1, 2, 1, 1]),
    )
    # z = [1, -2, 0.5, 3]
    assert z["mean"] == pytest.approx(0.625, rel=1e-15)
    assert z["std"] == pytest.approx(float(np.std([1.0, -2.0, 0.5, 3.0])), rel=1e-14)
    assert z["mean_abs"] == pytest.approx(1.625, rel=1e-15)
    assert z["frac_within_1"] == 0.5
    assert z["frac_within_2"] == 0.75


def test_calibration_curve_of_calibrated_data_is_diagonal():
    y_true, mean, std = _heteroscedastic(20_000, 1.0, 5)
    mean_var, mean_sq_err = metrics.calibration_curve(y_true, mean, std, n_bins=10)
    assert isinstance(mean_var, np.ndarray) and isinstance(mean_sq_err, np.ndarray)
    assert mean_var.shape == mean_sq_err.shape == (10,)
    assert np.all(np.diff(mean_var) > 0)
    np.testing.assert_allclose(mean_sq_err / mean_var, 1.0, atol=0.15)

    y_true, mean, std = _heteroscedastic(20_000, 3.0, 5)
    mean_var, mean_sq_err = metrics.calibration_curve(y_true, mean, std, n_bins=10)
    np.testing.assert_allclose(mean_sq_err / mean_var, 9.0, rtol=0.15)


def test_calibration_curve_bins():
    y_true = _tensor([0.0, 1.0, 0.0, 3.0, 0.0])
    std = _tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    mean_var, mean_sq_err = metrics.calibration_curve(
        y_true, torch.zeros(5, dtype=DTYPE), std, n_bins=2
    )
    # sorted by variance: (1, 1), (4, 9), (9, 0) | (16, 0), (25, 0)
    np.testing.assert_allclose(mean_var, [14.0 / 3.0, 41.0 / 2.0])
    np.testing.assert_allclose(mean_sq_err, [10.0 / 3.0, 0.0])
    with pytest.raises(ValueError, match="`n_bins` is 6 but must be between 1 and"):
        metrics.calibration_curve(y_true, y_true, std, n_bins=6)


@pytest.mark.parametrize(
    ("n", "n_bins"), [(1, 1), (2, 1), (3, 2), (100, 10), (10_000, 50)]
)
def test_calibration_curve_default_bins(n, n_bins):
    y_true, mean, std = _heteroscedastic(n, 1.0, 6)
    mean_var, _ = metrics.calibration_curve(y_true, mean, std)
    assert mean_var.shape == (n_bins,)


def test_summary():
    y_true, mean, std = _heteroscedastic(1000, 1.5, 7)
    scores = metrics.summary(y_true.reshape(100, 10), mean, std)
    keys = "rmse mae nll crps rll miscalibration_area alpha z_mean z_std n"
    assert set(scores) == set(keys.split())
    assert scores["n"] == 1000
    assert scores["rmse"] == metrics.rmse(y_true, mean)
    assert scores["nll"] == metrics.gaussian_nll(y_true, mean, std)
    assert scores["crps"] == metrics.crps(y_true, mean, std)
    assert scores["rll"] == metrics.rll(y_true, mean, std)
    assert scores["alpha"] == metrics.alpha(y_true, mean, std)
    assert scores["z_std"] == metrics.z_statistics(y_true, mean, std)["std"]


def test_metrics_accept_float32_and_grad():
    y_true, mean, std = _heteroscedastic(50, 1.0, 8)
    mean32 = mean.to(torch.float32).requires_grad_()
    value = metrics.gaussian_nll(y_true.float(), mean32, std.float())
    expected = metrics.gaussian_nll(
        y_true.float().double(), mean32.double(), std.float().double()
    )
    assert value == expected
