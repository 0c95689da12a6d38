"""Last-layer Laplace approximation (LLPR) and posterior sampling of ensemble heads.

The heads are linear in their parameters :math:`\\theta = (w, b)`, so a trained
(deterministic) model defines a Gaussian posterior over :math:`\\theta` around the
trained head :math:`\\theta_{MAP}`:

.. math::

    \\Sigma = \\alpha^2 (C + r I)^{-1}, \\qquad C = \\Phi^T \\Phi

where :math:`\\Phi` holds the last-layer features of the training set (per structure,
averaged over atoms, or per atom), :math:`r` is a regulariser and :math:`\\alpha` a
calibration factor. The analytic LLPR uncertainty of a prediction with features
:math:`\\phi_*` is :math:`\\sigma^2 = \\alpha^2 \\phi_*^T (C + r I)^{-1} \\phi_*`
(Bigi, Chong, Ceriotti, Grasselli, MLST 2024). Ensemble heads are sampled as
:math:`\\theta_k = \\theta_{MAP} + \\alpha L^{-T} z_k`, :math:`L L^T = C + r I`, then
recentred so that their mean is exactly :math:`\\theta_{MAP}`.
"""

import math
from dataclasses import dataclass

import torch


def feature_covariance(features: torch.Tensor) -> torch.Tensor:
    """:math:`C = \\Phi^T \\Phi` (float64).

    :param features: ``(n_samples, n_features)``
    :return: ``(n_features, n_features)``
    """
    features = features.to(torch.float64)
    return features.T @ features


def positive_definite_regularizer(
    covariance: torch.Tensor, start: float = 1e-10, factor: float = 10.0
) -> float:
    """Smallest ``r = start * mean(diag C) * factor^n`` making ``C + r I`` factorisable.

    :param covariance: ``(d, d)`` symmetric positive semi-definite matrix
    :return: the regulariser ``r``
    """
    scale = float(torch.diagonal(covariance).mean())
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError("the feature covariance is zero or not finite")
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype)
    r = start * scale
    for _ in range(40):
        _, info = torch.linalg.cholesky_ex(covariance + r * eye)
        if int(info) == 0:
            return r
        r *= factor
    raise ValueError("could not regularise the feature covariance")


def _cholesky(covariance: torch.Tensor, regularizer: float) -> torch.Tensor:
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype)
    factor, info = torch.linalg.cholesky_ex(covariance + regularizer * eye)
    if int(info) != 0:
        raise ValueError(
            f"`regularizer` is {regularizer:.3g} but C + rI is not positive definite; "
            "use a larger value or 'auto'"
        )
    return factor


def laplace_variance(
    features: torch.Tensor, covariance: torch.Tensor, regularizer: float
) -> torch.Tensor:
    """Analytic :math:`\\phi^T (C + r I)^{-1} \\phi` for each row (``alpha = 1``).

    :param features: ``(n, d)`` features of the predictions
    :return: ``(n,)`` variances
    """
    factor = _cholesky(covariance, regularizer)
    solved = torch.linalg.solve_triangular(
        factor, features.to(torch.float64).T, upper=False
    )
    return (solved**2).sum(dim=0)


def sample_parameters(
    theta_map: torch.Tensor,
    covariance: torch.Tensor,
    regularizer: float,
    alpha: float,
    n_members: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``n_members`` parameter vectors from the Laplace posterior, recentred.

    :param theta_map: ``(d,)`` trained (MAP) parameters
    :return: ``(n_members, d)`` samples whose mean is exactly ``theta_map``
    """
    if n_members < 2:
        raise ValueError(f"`n_members` is {n_members} but must be at least 2")
    factor = _cholesky(covariance, regularizer)
    z = torch.randn(
        (covariance.shape[0], n_members), dtype=torch.float64, generator=generator
    )
    # L^T x = z  =>  x = L^{-T} z has covariance (L L^T)^{-1}
    delta = alpha * torch.linalg.solve_triangular(factor.T, z, upper=True).T
    delta = delta - delta.mean(dim=0, keepdim=True)
    return theta_map.to(torch.float64).unsqueeze(0) + delta


@dataclass
class LaplaceFit:
    """Result of :py:func:`fit_laplace`."""

    regularizer: float
    alpha: float
    nll: float


def fit_laplace(
    covariance: torch.Tensor,
    valid_features: torch.Tensor,
    valid_errors: torch.Tensor,
    regularizer: str | float = "auto",
) -> LaplaceFit:
    """Choose the regulariser and the NLL-optimal ``alpha`` on validation data.

    :param valid_features: ``(n, d)`` features of validation predictions
    :param valid_errors: ``(n,)`` errors of the MAP model on them
    :param regularizer: ``"auto"`` (smallest positive-definite value), ``"fit"``
        (grid search minimising the validation NLL with its optimal ``alpha``), or a
        number
    """
    errors2 = valid_errors.to(torch.float64) ** 2

    def evaluate(r: float) -> LaplaceFit:
        variance = laplace_variance(valid_features, covariance, r).clamp(min=1e-300)
        alpha2 = float((errors2 / variance).mean())
        nll = 0.5 * float(torch.log(alpha2 * variance).mean()) + 0.5
        return LaplaceFit(r, math.sqrt(alpha2), nll + 0.5 * math.log(2 * math.pi))

    if regularizer == "auto":
        return evaluate(positive_definite_regularizer(covariance))
    if regularizer == "fit":
        base = positive_definite_regularizer(covariance)
        scale = float(torch.diagonal(covariance).mean())
        grid = [base * 10.0**k for k in range(0, 30)]
        grid = [r for r in grid if r <= 1e3 * scale] or [base]
        return min((evaluate(r) for r in grid), key=lambda fit: fit.nll)
    if isinstance(regularizer, int | float) and regularizer > 0:
        return evaluate(float(regularizer))
    raise ValueError(
        f"`regularizer` is {regularizer!r} but must be 'auto', 'fit' or a positive "
        "number"
    )
