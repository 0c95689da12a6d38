"""Last-layer Laplace with strongly anisotropic, correlated feature covariances (as
real last-layer features have), in closed form, and per-atom features in a real run.

With :math:`L L^T = C + r I`, heads are sampled as
:math:`\\theta_k = \\theta_{MAP} + \\alpha L^{-T} z_k` (then recentred), so their
covariance is :math:`\\alpha^2 (C + r I)^{-1}`. Swapping :math:`L^{-T}` for
:math:`L^{-1}` gives :math:`\\alpha^2 (L^T L)^{-1}`, which only differs from it when
:math:`C` is far from isotropic: the covariances here span eight orders of magnitude
with rotated eigenvectors.
"""

import dataclasses
import math

import pytest
import torch

from conftest import tiny_config, write_ethanol_split
from shallow_ensemble.data import GraphDataset, collate, read_structures
from shallow_ensemble.laplace import (
    feature_covariance,
    fit_laplace,
    positive_definite_regularizer,
    sample_parameters,
)
from shallow_ensemble.training import initialization, load_model, train


DTYPE = torch.float64


def rotation(d: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=DTYPE, generator=generator))
    return q


@pytest.fixture(scope="module")
def anisotropic():
    """Features with singular values 1e2 ... 1e-2 along rotated directions: the
    eigenvalues of C span 1e8 and its off-diagonal entries are as large as the
    diagonal ones."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e2, 10.0, 1.0, 0.1, 1e-2], dtype=DTYPE)
    features = torch.randn(300, 5, dtype=DTYPE, generator=generator)
    features = features @ torch.diag(scales) @ rotation(5, 1).T
    covariance = feature_covariance(features)
    eigenvalues = torch.linalg.eigvalsh(covariance)
    assert float(eigenvalues.max() / eigenvalues.min()) > 1e7
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    assert float(off_diagonal.abs().max()) > 0.3 * float(covariance.diagonal().max())
    return covariance


THETA = torch.tensor([0.3, -1.2, 0.05, 2.0, -0.7], dtype=DTYPE)
R, ALPHA = 1e-3, 0.8


def test_samples_along_unit_draws_are_rows_of_the_inverse_cholesky(
    anisotropic, monkeypatch
):
    """Draws z = [I, -I] (mean zero: the recentring changes nothing) give
    theta_k - theta = alpha L^{-T} e_k, i.e. row k of alpha L^{-1}."""
    d = anisotropic.shape[0]

    def unit_draws(size, dtype=None, generator=None):
        assert tuple(size) == (d, 2 * d)
        eye = torch.eye(d, dtype=dtype)
        return torch.cat([eye, -eye], dim=1)

    monkeypatch.setattr(torch, "randn", unit_draws)
    samples = sample_parameters(THETA, anisotropic, R, ALPHA, 2 * d)
    monkeypatch.undo()

    eye = torch.eye(d, dtype=DTYPE)
    precision = anisotropic + R * eye
    cholesky = torch.linalg.cholesky(precision)
    delta = samples - THETA
    expected = ALPHA * torch.linalg.inv(cholesky)
    # L^{-1} has entries up to ~1e2 and a condition number ~1e4: float64 rounding
    # leaves ~1e-12 relative to its largest entry
    atol = 1e-10 * float(expected.abs().max())
    torch.testing.assert_close(delta[:d], expected, rtol=0, atol=atol)
    torch.testing.assert_close(delta[d:], -expected, rtol=0, atol=atol)
    # basis-free: sum_k delta_k delta_k^T = 2 alpha^2 (C + rI)^{-1}, i.e.
    # (C + rI) sum_k delta_k delta_k^T / (2 alpha^2) = I
    outer = delta.T @ delta
    torch.testing.assert_close(
        precision @ outer / (2 * ALPHA**2), eye, rtol=0, atol=1e-8
    )


def test_sample_covariance_is_the_anisotropic_posterior(anisotropic):
    n = 20000
    samples = sample_parameters(
        THETA, anisotropic, R, ALPHA, n, torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(samples.mean(dim=0), THETA, rtol=0, atol=1e-12)
    # whitened by the posterior (any square root of the precision), the samples
    # are standard normal: their covariance estimate has entries with standard
    # errors sqrt(2/n) = 0.010 (diagonal) and sqrt(1/n) = 0.007 (off-diagonal);
    # 0.05 is five standard errors of the diagonal
    cholesky = torch.linalg.cholesky(anisotropic + R * torch.eye(5, dtype=DTYPE))
    whitened = (samples - THETA) @ cholesky / ALPHA
    torch.testing.assert_close(
        torch.cov(whitened.T), torch.eye(5, dtype=DTYPE), rtol=0, atol=0.05
    )
    # the spread spans the anisotropy: the stiffest and softest directions of C
    # differ in sample variance by the ratio of their eigenvalues (+ r)
    eigenvalues, vectors = torch.linalg.eigh(anisotropic)
    projected = (samples - THETA) @ vectors
    variances = projected.var(dim=0)
    expected = ALPHA**2 / (eigenvalues + R)
    torch.testing.assert_close(variances, expected, rtol=0.05, atol=0)


def test_alpha_of_errors_not_proportional_to_sigma():
    """Queries along eigenvectors of C: sigma_j^2 = s_j^2 / (lambda_j + r), and
    alpha^2 = <e^2 / sigma^2> with errors unrelated to sigma."""
    q = rotation(4, 2)
    lam = torch.tensor([1e4, 1e2, 1.0, 1e-2], dtype=DTYPE)
    covariance = q @ torch.diag(lam) @ q.T
    s = torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=DTYPE)
    queries = (q * s).T  # row j: s_j q_j
    errors = torch.tensor([0.7, -0.1, 2.0, 0.02], dtype=DTYPE)
    r = 0.5
    fit = fit_laplace(covariance, queries, errors, regularizer=r)
    variance = s**2 / (lam + r)
    alpha2 = float((errors**2 / variance).mean())
    assert fit.regularizer == r
    assert fit.alpha == pytest.approx(math.sqrt(alpha2), rel=1e-10)
    nll = 0.5 * float(torch.log(alpha2 * variance).mean()) + 0.5
    assert fit.nll == pytest.approx(nll + 0.5 * math.log(2 * math.pi), rel=1e-10)
    # the errors are not a multiple of sigma: alpha is not |e_j| / sigma_j for any j
    ratios = (errors.abs() / variance.sqrt()).tolist()
    assert all(abs(fit.alpha - x) > 0.1 * x for x in ratios)


def two_direction_validation(lam1, lam2, rho):
    """Validation queries along the first two eigenvectors of C (unit length),
    with errors +-1 along the first and +-sqrt(rho) along the second."""
    q = rotation(3, 3)
    covariance = q @ torch.diag(torch.tensor([lam1, lam2, 1.0], dtype=DTYPE)) @ q.T
    queries = torch.stack([q[:, 0], q[:, 0], q[:, 1], q[:, 1]])
    errors = torch.tensor([1.0, -1.0, math.sqrt(rho), -math.sqrt(rho)], dtype=DTYPE)
    return covariance, queries, errors


def test_fit_chooses_the_nll_optimal_regularizer():
    """With alpha fitted, the validation NLL depends on r only through the ratio of
    the two predicted variances, t(r) = (lam1 + r) / (lam2 + r), decreasing in r;
    the NLL is convex in log t with its minimum where t equals the ratio of squared
    errors, rho. Choosing rho = t(r*) for a grid value r* makes r* the answer."""
    lam1, lam2 = 1e4, 1e-2
    scale = (lam1 + lam2 + 1.0) / 3.0  # mean diagonal of C: rotation invariant
    chosen = {}
    for name, k in (("small", 4), ("large", 11)):
        covariance, _, _ = two_direction_validation(lam1, lam2, 1.0)
        base = positive_definite_regularizer(covariance)
        assert base == pytest.approx(1e-10 * scale, rel=1e-12)
        r_star = base * 10.0**k
        rho = (lam1 + r_star) / (lam2 + r_star)
        covariance, queries, errors = two_direction_validation(lam1, lam2, rho)
        fit = fit_laplace(covariance, queries, errors, regularizer="fit")
        assert fit.regularizer == pytest.approx(r_star, rel=1e-12), name
        # alpha^2 = (1 (lam1 + r) + rho (lam2 + r)) / 2 = lam1 + r at r*
        assert fit.alpha == pytest.approx(math.sqrt(lam1 + r_star), rel=1e-9)
        auto = fit_laplace(covariance, queries, errors, regularizer="auto")
        assert fit.nll < auto.nll
        chosen[name] = fit.regularizer
    assert chosen["small"] < 1e-2 < 1e4 < chosen["large"]


# ------------------------------------------------- per-atom features, a real run
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_ethanol_split(tmp_path_factory.mktemp("data"), 12, (100, 105))


@pytest.fixture(scope="module")
def mse_checkpoint(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mse")
    config = tiny_config(data, strategy="mse", epochs=2)
    return train(config, out, progress=False).checkpoint


def design(model, graph):
    """Per-atom features phi_i = s (f_i, 1) in which the energy is linear."""
    batch = collate([graph]).to(dtype=DTYPE)
    with torch.no_grad():
        features = model.backbone(
            batch.pair_vectors(),
            batch.centers,
            batch.neighbors,
            model.species_index(batch.numbers),
        )
    ones = torch.ones(features.shape[0], 1, dtype=DTYPE)
    return model.head.energy_scale * torch.cat([features, ones], dim=1)


@pytest.mark.parametrize("features", ["structure", "atom"])
def test_laplace_features_mode_in_a_real_run(
    data, mse_checkpoint, tmp_path, monkeypatch, features
):
    seen = []

    def recording(rows):
        seen.append(rows.shape)
        return feature_covariance(rows)

    monkeypatch.setattr(initialization, "feature_covariance", recording)
    config = tiny_config(data, strategy="laplace", init_from=str(mse_checkpoint))
    laplace = dataclasses.replace(config.laplace, features=features, regularizer="fit")
    config = dataclasses.replace(config, laplace=laplace)
    result = train(config, tmp_path, progress=False)
    info = result.info["laplace"]

    start = load_model(mse_checkpoint)
    train_set = GraphDataset(read_structures(data / "train.xyz"), 3.5)
    phis = [design(start, train_set[i]) for i in range(len(train_set))]
    if features == "atom":
        rows = torch.cat(phis)
        assert seen == [(12 * 9, 9)]
    else:
        rows = torch.stack([phi.mean(dim=0) for phi in phis])
        assert seen == [(12, 9)]
    covariance = rows.T @ rows

    # alpha from the validation energies, in closed form: the MAP errors over the
    # analytic variances of the summed features
    valid_set = GraphDataset(read_structures(data / "valid.xyz"), 3.5)
    r = info["regularizer"]
    inverse = torch.linalg.inv(covariance + r * torch.eye(9, dtype=DTYPE))
    ratios = []
    for i in range(len(valid_set)):
        graph = valid_set[i]
        summed = design(start, graph).sum(dim=0)
        energy = start.predict(collate([graph])).energies.detach()[0, 0]
        ratios.append(float((graph.energy - energy) ** 2 / (summed @ inverse @ summed)))
    assert info["alpha"] == pytest.approx(
        math.sqrt(sum(ratios) / len(ratios)), rel=1e-8
    )

    # the heads are the posterior samples of that covariance, around the trained head
    theta = torch.cat([start.head.weight.detach()[0], start.head.bias.detach()])
    expected = sample_parameters(
        theta, covariance, r, info["alpha"], 4, torch.Generator().manual_seed(0)
    )
    heads = result.model.head
    got = torch.cat([heads.weight.detach(), heads.bias.detach()[:, None]], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)
