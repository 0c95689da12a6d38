r"""Accuracy and calibration metrics, as stateless functions.

In the style of :py:mod:`sklearn.metrics`, every metric takes torch tensors
``(y_true, mean, std)`` of any (equal) number of elements, flattens them, evaluates
in float64 without tracking gradients, and returns a Python float. The uncertainty is
always a standard deviation, in the units of ``y_true``, and must be positive. The
errors are :math:`e_i = y_i - \mu_i` and :math:`z_i = e_i / \sigma_i`.
"""

import math

import numpy as np
import torch

from .. import losses
from ..errors import CalibrationError


def _flatten(**tensors: torch.Tensor) -> list[torch.Tensor]:
    flat = [
        torch.as_tensor(t).detach().to(torch.float64).reshape(-1)
        for t in tensors.values()
    ]
    names = list(tensors)
    if flat[0].numel() == 0:
        raise CalibrationError(
            f"`{names[0]}` is empty but metrics need at least one value"
        )
    for name, value in zip(names[1:], flat[1:], strict=True):
        if value.numel() != flat[0].numel():
            raise CalibrationError(
                f"`{name}` has {value.numel()} elements but must have as many as "
                f"`{names[0]}`, {flat[0].numel()}"
            )
    if "std" in tensors:
        n_bad = int((flat[names.index("std")] <= 0).sum())
        if n_bad > 0:
            raise CalibrationError(
                f"`std` has {n_bad} entries <= 0 but an uncertainty must be positive: "
                "leave out the components without ensemble spread (see "
                "`shallow_ensemble.calibration.predictions.zero_spread`)"
            )
    return flat


def rmse(y_true: torch.Tensor, mean: torch.Tensor) -> float:
    """Root-mean-square error.

    :param y_true: reference values, any shape, in the target's units
    :param mean: predictions, same number of elements and units as ``y_true``
    :return: the RMSE, in the target's units
    """
    y, mu = _flatten(y_true=y_true, mean=mean)
    return math.sqrt(float(torch.mean((y - mu) ** 2)))


def mae(y_true: torch.Tensor, mean: torch.Tensor) -> float:
    """Mean absolute error.

    :param y_true: reference values, any shape, in the target's units
    :param mean: predictions, same number of elements and units as ``y_true``
    :return: the MAE, in the target's units
    """
    y, mu = _flatten(y_true=y_true, mean=mean)
    return float(torch.mean(torch.abs(y - mu)))


def gaussian_nll(y_true: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> float:
    r"""Full Gaussian negative log-likelihood, averaged over samples.

    :math:`\frac{1}{2} [\log 2\pi + \log \sigma^2 + e^2/\sigma^2]`, with no floor on
    :math:`\sigma`.

    :param y_true: reference values, any shape, in the target's units
    :param mean: predicted means, same number of elements and units as ``y_true``
    :param std: predicted standard deviations, same number of elements and units
    :return: the mean NLL (its value shifts by :math:`\log c` if the units are scaled
        by :math:`c`)
    """
    y, mu, sigma = _flatten(y_true=y_true, mean=mean, std=std)
    return float(losses.gaussian_nll(y, mu, sigma**2, var_floor=0.0, full=True))


def crps(y_true: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> float:
    """Continuous ranked probability score of Gaussian predictions, averaged.

    :param y_true: reference values, any shape, in the target's units
    :param mean: predicted means, same number of elements and units as ``y_true``
    :param std: predicted standard deviations, same number of elements and units
    :return: the mean CRPS, in the target's units (equals the MAE for ``std -> 0``)
    """
    y, mu, sigma = _flatten(y_true=y_true, mean=mean, std=std)
    return float(losses.gaussian_crps(y, mu, sigma, std_floor=0.0))


def alpha(y_true: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> float:
    r"""NLL-optimal global scale of the stds, :math:`\sqrt{\langle z^2 \rangle}`.

    Multiplying every ``std`` by this factor minimises the Gaussian NLL. A value above
    1 means the model is overconfident (uncertainties too small), below 1
    underconfident.

    :param y_true: reference values, any shape, in the target's units
    :param mean: predicted means, same number of elements and units as ``y_true``
    :param std: predicted standard deviations, same number of elements and units
    :return: the dimensionless scale factor
    """
    y, mu, sigma = _flatten(y_true=y_true, mean=mean, std=std)
    return math.sqrt(float(torch.mean(((y - mu) / sigma) ** 2)))


def rll(y_true: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> float:
    r"""Relative log-likelihood, in percent.

    :math:`\mathrm{RLL} = 100 (\mathrm{NLL} - \mathrm{NLL}_\mathrm{const}) /
    (\mathrm{NLL}_\mathrm{oracle} - \mathrm{NLL}_\mathrm{const})`, where
    :math:`\mathrm{NLL}_\mathrm{const}` uses one constant variance equal to the MSE
    and :math:`\mathrm{NLL}_\mathrm{oracle}` uses :math:`\sigma_i^2 = e_i^2`. 100 is
    the oracle, 0 no better than a constant error bar equal to the RMSE, negative
    worse. An exact zero error would make the oracle NLL :math:`-\infty`, so the oracle
    variance is floored at :math:`10^{-12}` times the MSE (scale-free; such samples
    contribute a large but finite term).

    :param y_true: reference values, any shape, in the target's units
    :param mean: predicted means, same number of elements and units as ``y_true``
    :param std: predicted standard deviations, same number of elements and units
    :return: the RLL in percent; NaN where it is undefined: when all errors are zero,
        or all absolute errors are equal (then the constant error bar is the oracle)
    """
    y, mu, sigma = _flatten(y_true=y_true, mean=mean, std=std)
    sq_err = (y - mu) ** 2
    mse_value = torch.mean(sq_err)
    if float(mse_value) == 0.0:
        return float("nan")
    # the 0.5 log(2 pi) constants cancel in the differences
    nll_model = 0.5 * torch.mean(torch.log(sigma**2) + sq_err / sigma**2)
    nll_const = 0.5 * (torch.log(mse_value) + 1.0)
    oracle_var = torch.clamp(sq_err, min=1e-12 * float(mse_value))
    nll_oracle = 0.5 * torch.mean(torch.log(oracle_var) + sq_err / oracle_var)
    denominator = float(nll_oracle - nll_const)
    if denominator >= -1e-12:
        return float("nan")
    return 100.0 * float(nll_model - nll_const) / denominator


def miscalibration_area(
    y_true: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, n_levels: int = 99
) -> float:
    r"""Area between expected and observed coverage of central Gaussian intervals.

    For confidence levels :math:`p_j = j/(n+1)`, :math:`j = 1 \dots n`, the observed
    coverage is the fraction of samples with :math:`|z| \le \Phi^{-1}((1+p_j)/2)`.
    The area :math:`\int_0^1 |\mathrm{observed}(p) - p|\, dp` is computed with the
    trapezoid rule on these levels plus the end points 0 and 1 (where the difference
    vanishes). 0 is perfectly calibrated, 0.5 the maximum.

    :param y_true: reference values, any shape, in the target's units
    :param mean: predicted means, same number of elements and units as ``y_true``
    :param std: predicted standard deviations, same number of elements and units
    :param n_levels: number of confidence levels in :math:`(0, 1)`
    :return: the dimensionless area
    """
    if n_levels < 1:
        raise CalibrationError(f"`n_levels` is {n_levels} but must be at least 1")
    y, mu, sigma = _flatten(y_true=y_true, mean=mean, std=std)
    abs_z = torch.sort(torch.abs((y - mu) / sigma)).values
    levels = torch.arange(1, n_levels + 1, dtype=torch.float64) / (n_levels + 1)
    half_widths = torch.special.ndtri(0.5 * (1.0 + levels))
    # number of samples with |z| <= half width, for each level
    n_inside = torch.searchsorted(abs_z, half_widths, right=True)
    observed = n_inside.to(torch.float64) / abs_z.numel()
    return float(torch.sum(torch.abs(observed - levels)) / (n_levels + 1))


def z_statistics(
    y_true: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> dict[str, float]:
    r"""Statistics of :math:`z = (y - \mu)/\sigma`.

    For a calibrated model :math:`z \sim \mathcal{N}(0, 1)`.

    :param y_true: reference values, any shape, in the target's units
    :param mean: predicted means, same number of elements and units as ``y_true``
    :param std: predicted standard deviations, same number of elements and units
    :return: ``mean`` and ``std`` (population, ``1/N``) of :math:`z`, ``mean_abs``
        (:math:`\sqrt{2/\pi} \approx 0.798` if calibrated), ``frac_within_1`` and
        ``frac_within_2`` (fractions with :math:`|z| \le 1` and :math:`\le 2`, 0.683
        and 0.954 if calibrated)
    """
    y, mu, sigma = _flatten(y_true=y_true, mean=mean, std=std)
    z = (y - mu) / sigma
    abs_z = torch.abs(z)
    return {
        "mean": float(z.mean()),
        "std": float(torch.std(z, correction=0)),
        "mean_abs": float(abs_z.mean()),
        "frac_within_1": float((abs_z <= 1.0).to(torch.float64).mean()),
        "frac_within_2": float((abs_z <= 2.0).to(torch.float64).mean()),
    }


def calibration_curve(
    y_true: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    n_bins: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Binned calibration curve: mean squared error vs mean predicted variance.

    Samples are sorted by predicted variance and split into ``n_bins`` bins of equal
    counts (sizes differ by at most one). For a calibrated model the points lie on the
    diagonal.

    :param y_true: reference values, any shape, in the target's units
    :param mean: predicted means, same number of elements and units as ``y_true``
    :param std: predicted standard deviations, same number of elements and units
    :param n_bins: number of bins; default :math:`\sqrt{N}` rounded, clipped to
        ``[1, 50]``; at most the number of samples
    :return: ``(mean predicted variance, mean squared error)`` per bin, two float64
        arrays of shape ``(n_bins,)`` in the target's units squared, in increasing
        order of predicted variance
    """
    y, mu, sigma = _flatten(y_true=y_true, mean=mean, std=std)
    n_samples = y.numel()
    if n_bins is None:
        n_bins = min(max(round(math.sqrt(n_samples)), 1), 50)
    if not 1 <= n_bins <= n_samples:
        raise CalibrationError(
            f"`n_bins` is {n_bins} but must be between 1 and the number of samples, "
            f"{n_samples}"
        )
    order = torch.argsort(sigma)
    variances = torch.tensor_split(sigma[order] ** 2, n_bins)
    sq_errors = torch.tensor_split((y - mu)[order] ** 2, n_bins)
    mean_var = torch.stack([v.mean() for v in variances])
    mean_sq_err = torch.stack([e.mean() for e in sq_errors])
    return mean_var.numpy(), mean_sq_err.numpy()


def summary(
    y_true: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> dict[str, float]:
    """All scalar metrics at once.

    :param y_true: reference values, any shape, in the target's units
    :param mean: predicted means, same number of elements and units as ``y_true``
    :param std: predicted standard deviations, same number of elements and units
    :return: ``rmse``, ``mae``, ``crps`` (target's units), ``nll``, ``rll`` (percent),
        ``miscalibration_area``, ``alpha``, ``z_mean``, ``z_std`` (dimensionless) and
        ``n`` (number of values)
    """
    y, mu, sigma = _flatten(y_true=y_true, mean=mean, std=std)
    z_stats = z_statistics(y, mu, sigma)
    return {
        "rmse": rmse(y, mu),
        "mae": mae(y, mu),
        "nll": gaussian_nll(y, mu, sigma),
        "crps": crps(y, mu, sigma),
        "rll": rll(y, mu, sigma),
        "miscalibration_area": miscalibration_area(y, mu, sigma),
        "alpha": alpha(y, mu, sigma),
        "z_mean": z_stats["mean"],
        "z_std": z_stats["std"],
        "n": y.numel(),
    }
