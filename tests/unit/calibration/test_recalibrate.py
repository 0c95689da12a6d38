import doctest

import pytest
import torch

from shallow_ensemble.calibration import metrics, recalibrate
from shallow_ensemble.calibration.recalibrate import (
    GlobalRecalibration,
    fit_alpha,
    stretch_members,
)


DTYPE = torch.float64


def _ensemble(
    seed: int, n_samples: int = 2000, n_members: int = 8, spread: float = 0.3
):
    """Members with spread ``spread`` and targets with errors three times larger."""
    generator = torch.Generator().manual_seed(seed)
    centre = torch.randn(n_samples, dtype=DTYPE, generator=generator)
    scale = spread * torch.exp(
        0.5 * torch.randn(n_samples, dtype=DTYPE, generator=generator)
    )
    noise = torch.randn(n_samples, n_members, dtype=DTYPE, generator=generator)
    members = centre.unsqueeze(1) + scale.unsqueeze(1) * noise
    mean, std = members.mean(dim=1), members.std(dim=1)
    y_true = mean + 3.0 * std * torch.randn(n_samples, dtype=DTYPE, generator=generator)
    return y_true, members


def test_fit_alpha_is_metrics_alpha():
    y_true, members = _ensemble(0)
    mean, std = members.mean(dim=1), members.std(dim=1)
    assert fit_alpha(y_true, mean, std) == metrics.alpha(y_true, mean, std)
    assert fit_alpha(y_true, mean, std) == pytest.approx(3.0, rel=0.05)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_stretch_members_keeps_mean_and_scales_std(dim):
    generator = torch.Generator().manual_seed(1)
    members = torch.randn(6, 5, dtype=DTYPE, generator=generator) + 10.0
    stretched = stretch_members(members, 2.5, dim=dim)
    assert stretched.shape == members.shape
    torch.testing.assert_close(
        stretched.mean(dim=dim), members.mean(dim=dim), rtol=0.0, atol=1e-13
    )
    torch.testing.assert_close(
        stretched.std(dim=dim), 2.5 * members.std(dim=dim), rtol=1e-13, atol=0.0
    )


def test_stretch_members_with_tensor_alpha():
    generator = torch.Generator().manual_seed(2)
    members = torch.randn(3, 4, 7, dtype=DTYPE, generator=generator)  # (M, n_atoms, 3)
    alpha = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=DTYPE).reshape(1, 4, 1)
    stretched = stretch_members(members, alpha, dim=0)
    torch.testing.assert_close(stretched.mean(dim=0), members.mean(dim=0))
    torch.testing.assert_close(
        stretched.std(dim=0), alpha[0] * members.std(dim=0), rtol=1e-13, atol=0.0
    )


def test_stretch_members_rejects_non_positive_alpha():
    with pytest.raises(ValueError, match="`alpha` is 0.0 but must be positive"):
        stretch_members(torch.zeros(2, 3), 0.0, dim=0)
    with pytest.raises(ValueError, match="`alpha` has entries <= 0"):
        stretch_members(torch.zeros(2, 3), torch.tensor([1.0, -1.0, 1.0]), dim=0)


def test_global_recalibration_fixes_alpha():
    y_true, members = _ensemble(3)
    mean, std = members.mean(dim=1), members.std(dim=1)
    assert metrics.alpha(y_true, mean, std) > 2.5

    recalibration = GlobalRecalibration()
    assert recalibration.fit(y_true, mean, std) is recalibration
    assert recalibration.alpha_ == metrics.alpha(y_true, mean, std)

    new_std = recalibration.transform_std(std)
    assert metrics.alpha(y_true, mean, new_std) == pytest.approx(1.0, abs=1e-10)

    stretched = recalibration.transform_members(members, dim=1)
    torch.testing.assert_close(stretched.mean(dim=1), mean, rtol=0.0, atol=1e-13)
    torch.testing.assert_close(stretched.std(dim=1), new_std, rtol=1e-13, atol=0.0)
    assert metrics.alpha(y_true, mean, stretched.std(dim=1)) == pytest.approx(
        1.0, abs=1e-10
    )
    # recalibration improves the likelihood on the data it was fitted on
    assert metrics.gaussian_nll(y_true, mean, new_std) < metrics.gaussian_nll(
        y_true, mean, std
    )


def test_global_recalibration_before_fit():
    recalibration = GlobalRecalibration()
    assert repr(recalibration) == "GlobalRecalibration()"
    with pytest.raises(RuntimeError, match="not fitted yet: call `fit`"):
        recalibration.transform_std(torch.ones(3))
    with pytest.raises(RuntimeError, match="not fitted yet: call `fit`"):
        recalibration.transform_members(torch.ones(2, 3), dim=0)


def test_docstring_examples():
    result = doctest.testmod(recalibrate, raise_on_error=False)
    assert result.attempted > 0
    assert result.failed == 0
