"""Calibration plots: parity, error vs predicted uncertainty, calibration curve.

matplotlib is optional (``pip install shallow-ensemble[plots]``) and only imported
when a report is saved. Figures are built with :py:class:`matplotlib.figure.Figure`
directly, never through ``pyplot``, so that no GUI backend or global state is involved.
The ``plot_*`` functions draw into an existing matplotlib ``Axes`` and return it.
"""

import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import CalibrationError
from . import metrics


if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


_MISSING_MATPLOTLIB = "plots need matplotlib: pip install shallow-ensemble[plots]"


def _figure_class() -> type["Figure"]:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(_MISSING_MATPLOTLIB) from error
    return Figure


def _as_arrays(
    y_true: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, mu, sigma = metrics._flatten(y_true=y_true, mean=mean, std=std)
    return y.numpy(), mu.numpy(), sigma.numpy()


def _non_negative(std: torch.Tensor, n: int) -> np.ndarray:
    sigma = torch.as_tensor(std).detach().to(torch.float64).reshape(-1)
    if sigma.numel() != n:
        raise CalibrationError(
            f"`std` has {sigma.numel()} elements but must have as many as `y_true`, {n}"
        )
    if not bool((sigma >= 0).all()):
        raise CalibrationError("`std` has entries < 0 (or NaN) but must be >= 0")
    return sigma.numpy()


def _axis_label(text: str, unit: str, label: str = "") -> str:
    text = f"{label}: {text}" if label else text
    return f"{text} [{unit}]" if unit else text


def plot_parity(
    ax: "Axes",
    y_true: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor | None = None,
    label: str = "",
    unit: str = "",
) -> "Axes":
    """Predicted vs reference values, with the predicted std as error bars.

    :param ax: the matplotlib axes to draw into
    :param y_true: reference values, any shape, in ``unit``
    :param mean: predicted means, same number of elements and units as ``y_true``
    :param std: predicted standard deviations, same number of elements and units,
        ``>= 0`` (no bar where zero); ``None`` for no error bars (a one-member model)
    :param label: name of the quantity, for the axis labels (e.g. ``"energy"``)
    :param unit: unit of the quantity, for the axis labels (e.g. ``"eV"``)
    :return: ``ax``
    """
    y, mu = (t.numpy() for t in metrics._flatten(y_true=y_true, mean=mean))
    sigma = None
    if std is not None:
        sigma = _non_negative(std, y.size)
    ax.errorbar(
        y,
        mu,
        yerr=sigma,
        fmt="o",
        markersize=2,
        elinewidth=0.5,
        alpha=0.5,
        rasterized=True,
    )
    low = float(min(y.min(), mu.min()))
    high = float(max(y.max(), mu.max()))
    ax.plot([low, high], [low, high], color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(_axis_label(f"reference {label}".strip(), unit))
    ax.set_ylabel(_axis_label(f"predicted {label}".strip(), unit))
    ax.set_title(f"RMSE = {metrics.rmse(y_true, mean):.4g} {unit}".strip())
    return ax


def plot_error_vs_sigma(
    ax: "Axes",
    y_true: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    label: str = "",
    unit: str = "",
) -> "Axes":
    r"""Absolute error vs predicted standard deviation, on log-log axes.

    Guide lines :math:`|e| = k \sigma` for :math:`k = 1, 2, 3`: for a calibrated
    Gaussian model, 68%, 95% and 99.7% of the points lie below them. Samples with a
    zero error are left out (they have no place on a log axis).

    :param ax: the matplotlib axes to draw into
    :param y_true: reference values, any shape, in ``unit``
    :param mean: predicted means, same number of elements and units as ``y_true``
    :param std: predicted standard deviations, same number of elements and units
    :param label: name of the quantity, for the axis labels
    :param unit: unit of the quantity, for the axis labels
    :return: ``ax``
    """
    y, mu, sigma = _as_arrays(y_true, mean, std)
    abs_error = np.abs(y - mu)
    nonzero = abs_error > 0
    ax.scatter(sigma[nonzero], abs_error[nonzero], s=2, alpha=0.5, rasterized=True)
    guide = np.array([sigma.min(), sigma.max()])
    for k, style in ((1, "-"), (2, "--"), (3, ":")):
        text = r"$|e| = \sigma$" if k == 1 else rf"$|e| = {k}\sigma$"
        ax.plot(guide, k * guide, color="black", linestyle=style, label=text)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(_axis_label("predicted std", unit, label))
    ax.set_ylabel(_axis_label("|error|", unit, label))
    ax.legend(loc="upper left", frameon=False)
    return ax


def plot_calibration_curve(
    ax: "Axes",
    y_true: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    label: str = "",
    unit: str = "",
    n_bins: int | None = None,
) -> "Axes":
    r"""Binned mean squared error vs mean predicted variance, on log-log axes.

    Bins hold equal numbers of samples, sorted by predicted variance (see
    :py:func:`~shallow_ensemble.calibration.metrics.calibration_curve`); a calibrated
    model lies on the diagonal.

    :param ax: the matplotlib axes to draw into
    :param y_true: reference values, any shape, in ``unit``
    :param mean: predicted means, same number of elements and units as ``y_true``
    :param std: predicted standard deviations, same number of elements and units
    :param label: name of the quantity, for the axis labels
    :param unit: unit of the quantity, for the axis labels (squared on the axes)
    :param n_bins: number of bins, default :math:`\sqrt{N}` clipped to ``[1, 50]``
    :return: ``ax``
    """
    mean_var, mean_sq_err = metrics.calibration_curve(y_true, mean, std, n_bins=n_bins)
    ax.plot(mean_var, mean_sq_err, marker="o", markersize=3, label="binned")
    values = np.concatenate([mean_var, mean_sq_err])
    values = values[values > 0]
    diagonal = np.array([values.min(), values.max()])
    ax.plot(diagonal, diagonal, color="black", linestyle="--", label="ideal")
    ax.set_xscale("log")
    ax.set_yscale("log")
    unit_squared = f"{unit}²" if unit else ""
    ax.set_xlabel(_axis_label("mean predicted variance", unit_squared, label))
    ax.set_ylabel(_axis_label("mean squared error", unit_squared, label))
    ax.legend(loc="upper left", frameon=False)
    return ax


def save_report(
    path: str | os.PathLike[str],
    name: str,
    y_true: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor | None = None,
    unit: str = "",
) -> str:
    r"""Write a PNG with the parity plot, error vs std and the calibration curve.

    The title gives the RMSE, the RLL and the global scale :math:`\alpha`.
    Components without ensemble spread (see
    :py:func:`~shallow_ensemble.calibration.predictions.zero_spread`) are drawn in the
    parity plot and left out of the other two panels and of the scores in the title.
    Without ``std`` (a one-member model), or if no component has a spread (a
    collapsed ensemble), only the parity plot is drawn.

    :param path: where to write the PNG
    :param name: name of the quantity (e.g. ``"forces"``), for the title and labels
    :param y_true: reference values, any shape, in ``unit``
    :param mean: predicted means, same number of elements and units as ``y_true``
    :param std: predicted standard deviations, same number of elements and units,
        ``>= 0``; or ``None``
    :param unit: unit of the quantity (e.g. ``"eV/Å"``)
    :return: what was drawn, in words (e.g. ``"parity only: one-member model, no
        uncertainty"``)
    """
    from .predictions import zero_spread

    figure_class = _figure_class()
    y, mu = metrics._flatten(y_true=y_true, mean=mean)
    keep = None
    if std is not None:
        sigma = torch.from_numpy(_non_negative(std, y.numel()))
        zero, _ = zero_spread(mu, sigma)
        keep = ~zero
    if keep is None or not bool(keep.any()):
        figure = figure_class(figsize=(5.0, 4.8), layout="constrained")
        plot_parity(figure.subplots(), y, mu, label=name, unit=unit)
        figure.suptitle(f"{name}: RMSE = {metrics.rmse(y, mu):.4g} {unit}")
        figure.savefig(os.fspath(path), dpi=110)
        if keep is None:
            return "parity only: one-member model, no uncertainty"
        return "parity only: no ensemble spread on any component"
    figure = figure_class(figsize=(15.0, 4.8), layout="constrained")
    parity, error, curve = figure.subplots(1, 3)
    plot_parity(parity, y, mu, sigma, label=name, unit=unit)
    y_kept, mu_kept, sigma_kept = y[keep], mu[keep], sigma[keep]
    plot_error_vs_sigma(error, y_kept, mu_kept, sigma_kept, label=name, unit=unit)
    plot_calibration_curve(curve, y_kept, mu_kept, sigma_kept, label=name, unit=unit)
    scores = metrics.summary(y_kept, mu_kept, sigma_kept)
    n_zero = int((~keep).sum())
    excluded = f", {n_zero} without spread left out" if n_zero else ""
    figure.suptitle(
        f"{name}: RMSE = {metrics.rmse(y, mu):.4g} {unit}, RLL = "
        f"{scores['rll']:.1f}%, alpha = {scores['alpha']:.3g}, miscalibration area = "
        f"{scores['miscalibration_area']:.3f} (n = {scores['n']}{excluded})"
    )
    figure.savefig(os.fspath(path), dpi=110)
    if n_zero:
        return f"{n_zero} components without spread only in the parity plot"
    return "parity, error vs std and calibration curve"
