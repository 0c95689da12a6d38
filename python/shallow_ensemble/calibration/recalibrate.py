r"""Global recalibration of ensemble uncertainties on a validation set.

The NLL-optimal factor :math:`\alpha = \sqrt{\langle e^2/\sigma^2 \rangle}` is applied
by stretching the members around their mean, :math:`x_k \to \bar{x} + \alpha (x_k -
\bar{x})`, so that the ensemble mean is unchanged and the ensemble standard deviation is
multiplied by exactly :math:`\alpha`: the members and the reported uncertainty stay
consistent. Fit one factor per quantity (total energies, per-atom energies, forces).
"""

import torch

from ..errors import CalibrationError, ShallowEnsembleError
from . import metrics


class NotFittedError(ShallowEnsembleError, RuntimeError):
    """A recalibration is used before it is fitted."""


def fit_alpha(y_true: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> float:
    r"""NLL-optimal global scale :math:`\sqrt{\langle (y - \mu)^2/\sigma^2 \rangle}`.

    The same as :py:func:`shallow_ensemble.calibration.metrics.alpha`.

    :param y_true: validation reference values, any shape, in the target's units
    :param mean: predicted means, same number of elements and units as ``y_true``
    :param std: predicted standard deviations, same number of elements and units
    :return: the dimensionless factor to multiply ``std`` with (>1: the model was
        overconfident)
    """
    return metrics.alpha(y_true, mean, std)


def stretch_members(
    members: torch.Tensor, alpha: float | torch.Tensor, dim: int
) -> torch.Tensor:
    r"""Stretch ensemble members around their mean by ``alpha``.

    :math:`x_k \to \bar{x} + \alpha (x_k - \bar{x})`: the mean is unchanged, the
    (unbiased or not) standard deviation over ``dim`` is scaled by exactly ``alpha``.

    :param members: member predictions with the ``n_members`` entries along ``dim``,
        any units
    :param alpha: positive, dimensionless scale; a tensor must broadcast against
        ``members`` (e.g. with size 1 along ``dim``), for one factor per entry
    :param dim: the dimension indexing the members
    :return: the stretched members, same shape, dtype and units as ``members``
    """
    if isinstance(alpha, torch.Tensor):
        if not bool(torch.all(alpha > 0)):
            raise CalibrationError("`alpha` has entries <= 0 but must be positive")
    elif not alpha > 0:
        raise CalibrationError(f"`alpha` is {alpha} but must be positive")
    mean = members.mean(dim=dim, keepdim=True)
    return mean + alpha * (members - mean)


class GlobalRecalibration:
    r"""One global scale factor for the uncertainties, fitted on validation data.

    Follows scikit-learn's estimator rules: :py:meth:`fit` returns ``self`` and the
    fitted factor is in :py:attr:`alpha_`.

    >>> import torch
    >>> y_true = torch.tensor([2.0, -2.0, 2.0, 1.0], dtype=torch.float64)
    >>> mean = torch.zeros(4, dtype=torch.float64)
    >>> std = torch.tensor([1.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    >>> recalibration = GlobalRecalibration().fit(y_true, mean, std)
    >>> recalibration.alpha_
    2.0
    >>> recalibration.transform_std(std)
    tensor([2., 2., 2., 1.], dtype=torch.float64)
    """

    alpha_: float
    r"""The fitted factor, :math:`\sqrt{\langle z^2 \rangle}` on the fit data."""

    def fit(
        self, y_true: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
    ) -> "GlobalRecalibration":
        """Fit the scale factor.

        :param y_true: validation reference values, any shape, in the target's units
        :param mean: predicted means, same number of elements and units as ``y_true``
        :param std: predicted standard deviations, same number of elements and units
        :return: ``self``, with :py:attr:`alpha_` set
        """
        self.alpha_ = fit_alpha(y_true, mean, std)
        return self

    def _fitted_alpha(self) -> float:
        if not hasattr(self, "alpha_"):
            raise NotFittedError(
                "this GlobalRecalibration is not fitted yet: call `fit` before "
                "transforming"
            )
        return self.alpha_

    def transform_std(self, std: torch.Tensor) -> torch.Tensor:
        """Scale uncertainties by the fitted factor.

        :param std: standard deviations, any shape and units
        :return: ``alpha_ * std``, same shape, dtype and units
        """
        return self._fitted_alpha() * std

    def transform_members(self, members: torch.Tensor, dim: int) -> torch.Tensor:
        """Stretch ensemble members around their mean by the fitted factor.

        :param members: member predictions with the ``n_members`` entries along
            ``dim``, any units
        :param dim: the dimension indexing the members
        :return: the stretched members (see :py:func:`stretch_members`), same shape
        """
        return stretch_members(members, self._fitted_alpha(), dim)

    def __repr__(self) -> str:
        """Show the fitted factor, if any."""
        if hasattr(self, "alpha_"):
            return f"GlobalRecalibration(alpha_={self.alpha_!r})"
        return "GlobalRecalibration()"
