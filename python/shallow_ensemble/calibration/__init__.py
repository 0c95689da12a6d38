"""Calibration of ensemble uncertainties: metrics, recalibration and plots.

Metrics are stateless functions ``metric(y_true, mean, std) -> float``; recalibrators
follow scikit-learn's ``fit``/``transform`` conventions. Importing this package does
not import matplotlib: the plotting functions import it when they need it.
"""

from .metrics import (
    alpha,
    calibration_curve,
    crps,
    gaussian_nll,
    mae,
    miscalibration_area,
    rll,
    rmse,
    summary,
    z_statistics,
)
from .noise_floor import NoiseFloors, fit_noise_floor, select_noise_floor
from .plots import (
    plot_calibration_curve,
    plot_error_vs_sigma,
    plot_parity,
    save_report,
)
from .recalibrate import GlobalRecalibration, fit_alpha, stretch_members


__all__ = [
    "GlobalRecalibration",
    "NoiseFloors",
    "alpha",
    "calibration_curve",
    "crps",
    "fit_alpha",
    "fit_noise_floor",
    "gaussian_nll",
    "mae",
    "miscalibration_area",
    "plot_calibration_curve",
    "plot_error_vs_sigma",
    "plot_parity",
    "rll",
    "rmse",
    "save_report",
    "select_noise_floor",
    "stretch_members",
    "summary",
    "z_statistics",
]
