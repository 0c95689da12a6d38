"""Last-layer Laplace: closed-form linear regression checks."""

import math

import pytest
import torch

from shallow_ensemble.laplace import (
    feature_covariance,
    fit_laplace,
    laplace_variance,
    positive_definite_regularizer,
    sample_parameters,
)


@pytest.fixture
def regression():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 5, dtype=torch.float64, generator=generator)
    features[:, 4] = 1.0  # a bias column, as in the heads
    theta = torch.tensor([0.5, -1.0, 2.0, 0.1, 0.3], dtype=torch.float64)
    targets = features @ theta + 0.1 * torch.randn(
        200, dtype=torch.float64, generator=generator
    )
    return features, targets


def test_samples_have_the_map_mean_and_the_posterior_covariance(regression):
    features, targets = regression
    covariance = feature_covariance(features)
    r, alpha = 0.5, 0.7
    eye = torch.eye(5, dtype=torch.float64)
    theta_map = torch.linalg.solve(covariance + r * eye, features.T @ targets)
    samples = sample_parameters(
        theta_map, covariance, r, alpha, 40000, torch.Generator().manual_seed(1)
    )
    # recentring is exact
    torch.testing.assert_close(samples.mean(dim=0), theta_map, rtol=0, atol=1e-12)
    expected = alpha**2 * torch.linalg.inv(covariance + r * eye)
    empirical = torch.cov(samples.T)
    # Monte Carlo error of a covariance estimate with 40000 samples is ~1%
    error = torch.linalg.matrix_norm(empirical - expected) / torch.linalg.matrix_norm(
        expected
    )
    assert float(error) < 0.03


def test_analytic_variance_is_the_quadratic_form(regression):
    features, _ = regression
    covariance = feature_covariance(features)
    eye = torch.eye(5, dtype=torch.float64)
    queries = torch.randn(7, 5, dtype=torch.float64)
    expected = torch.einsum(
        "nd,de,ne->n", queries, torch.linalg.inv(covariance + 0.3 * eye), queries
    )
    torch.testing.assert_close(laplace_variance(queries, covariance, 0.3), expected)


def test_positive_definite_regularizer_on_a_singular_covariance():
    features = torch.randn(3, 6, dtype=torch.float64)  # rank 3 < 6
    covariance = feature_covariance(features)
    r = positive_definite_regularizer(covariance)
    assert r > 0
    eye = torch.eye(6, dtype=torch.float64)
    assert int(torch.linalg.cholesky_ex(covariance + r * eye).info) == 0
    with pytest.raises(ValueError, match="zero or not finite"):
        positive_definite_regularizer(torch.zeros(3, 3, dtype=torch.float64))


def test_fitted_alpha_recovers_the_scale_of_consistent_errors(regression):
    """Errors drawn from the posterior predictive with a known alpha give it back."""
    features, _ = regression
    covariance = feature_covariance(features)
    r = 1.0
    queries = torch.randn(
        20000, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    sigma = laplace_variance(queries, covariance, r).sqrt()
    errors = (
        3.0
        * sigma
        * torch.randn(
            20000, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
        )
    )
    fit = fit_laplace(covariance, queries, errors, regularizer=r)
    assert fit.alpha == pytest.approx(3.0, rel=0.02)
    expected_nll = 0.5 * float(torch.log(9.0 * sigma**2).mean()) + 0.5 * (
        1 + math.log(2 * math.pi)
    )
    assert fit.nll == pytest.approx(expected_nll, abs=0.02)
    fitted = fit_laplace(covariance, queries, errors, regularizer="fit")
    auto = fit_laplace(covariance, queries, errors, regularizer="auto")
    assert fitted.nll <= auto.nll + 1e-12
    with pytest.raises(ValueError, match="`regularizer` is 'bad'"):
        fit_laplace(covariance, queries, errors, regularizer="bad")


def test_sampling_needs_two_members(regression):
    features, _ = regression
    with pytest.raises(ValueError, match="`n_members` is 1"):
        sample_parameters(
            torch.zeros(5, dtype=torch.float64),
            feature_covariance(features),
            1.0,
            1.0,
            1,
        )
