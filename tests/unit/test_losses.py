import math

import pytest
import torch

from shallow_ensemble import losses


DTYPE = torch.float64
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=DTYPE)


def _crps_numerical(y: float, mu: float, sigma: float) -> float:
    """Integral of (F(x) - 1{x >= y})^2 over x, split at y, by the trapezoid rule."""
    normal = torch.distributions.Normal(
        torch.tensor(mu, dtype=DTYPE), torch.tensor(sigma, dtype=DTYPE)
    )
    low = min(y, mu) - 15.0 * sigma
    high = max(y, mu) + 15.0 * sigma
    left = torch.linspace(low, y, 400_001, dtype=DTYPE)
    right = torch.linspace(y, high, 400_001, dtype=DTYPE)
    integral = torch.trapezoid(normal.cdf(left) ** 2, left)
    integral = integral + torch.trapezoid((1.0 - normal.cdf(right)) ** 2, right)
    return float(integral)


def test_ensemble_mean_var_is_unbiased():
    generator = torch.Generator().manual_seed(0)
    members = torch.randn(5, 7, 3, dtype=DTYPE, generator=generator)
    mean, var = losses.ensemble_mean_var(members, dim=1)
    assert mean.shape == (5, 3)
    torch.testing.assert_close(mean, members.mean(dim=1), rtol=0, atol=1e-15)
    torch.testing.assert_close(var, torch.var(members, dim=1, unbiased=True))
    by_hand = ((members - members.mean(dim=1, keepdim=True)) ** 2).sum(dim=1) / 6
    torch.testing.assert_close(var, by_hand)


def test_ensemble_mean_var_needs_two_members():
    message = (
        "`members` has 1 entry along dim 1 but an ensemble variance needs at least 2"
    )
    with pytest.raises(ValueError, match=message):
        losses.ensemble_mean_var(torch.zeros(4, 1, dtype=DTYPE), dim=1)


def test_mse():
    value = losses.mse(_tensor([1.0, 2.0, 3.0]), _tensor([1.0, 0.0, 6.0]))
    assert value.item() == pytest.approx((0.0 + 4.0 + 9.0) / 3.0, rel=1e-15)


def test_gaussian_nll_known_values():
    target = _tensor([1.0, 2.0])
    mean = _tensor([0.5, 2.0])
    var = _tensor([0.25, 4.0])
    # 0.5 (log 0.25 + 1) = -0.19314718..., 0.5 log 4 = 0.69314718...
    expected = 0.5 * ((math.log(0.25) + 1.0) + math.log(4.0)) / 2.0
    assert expected == pytest.approx(0.25, rel=1e-14)
    nll = losses.gaussian_nll(target, mean, var)
    assert nll.item() == pytest.approx(0.25, rel=1e-12)
    full = losses.gaussian_nll(target, mean, var, full=True)
    assert full.item() == pytest.approx(0.25 + 0.9189385332046727, rel=1e-12)


def test_gaussian_nll_floors_the_variance():
    target, mean = _tensor([0.1]), _tensor([0.0])
    nll = losses.gaussian_nll(target, mean, _tensor([0.0]), var_floor=1e-2)
    assert nll.item() == pytest.approx(0.5 * (math.log(1e-2) + 0.01 / 1e-2), rel=1e-12)


def test_gaussian_nll_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="`mean` has shape \\(3, 1\\)"):
        losses.gaussian_nll(torch.zeros(3), torch.zeros(3, 1), torch.ones(3))


@pytest.mark.parametrize(
    ("y", "mu", "sigma"), [(0.3, 0.0, 1.0), (-2.5, 1.0, 0.7), (10.0, 1.0, 2.0)]
)
def test_gaussian_crps_matches_numerical_integral(y, mu, sigma):
    closed = losses.gaussian_crps(_tensor([y]), _tensor([mu]), _tensor([sigma]))
    assert closed.item() == pytest.approx(_crps_numerical(y, mu, sigma), rel=1e-8)


def test_gaussian_crps_at_zero_error():
    sigma = _tensor([0.5, 2.0])
    crps = losses.gaussian_crps(
        torch.zeros(2, dtype=DTYPE), torch.zeros(2, dtype=DTYPE), sigma
    )
    phi0 = 1.0 / math.sqrt(2.0 * math.pi)
    expected = float(sigma.mean()) * (2.0 * phi0 - 1.0 / math.sqrt(math.pi))
    assert crps.item() == pytest.approx(expected, rel=1e-14)


def test_energy_nll_and_crps_are_per_atom():
    generator = torch.Generator().manual_seed(1)
    members = 10.0 * torch.randn(6, 4, dtype=DTYPE, generator=generator)
    target = 10.0 * torch.randn(6, dtype=DTYPE, generator=generator)
    n_atoms = torch.tensor([1, 3, 8, 20, 64, 192])
    mean = members.mean(dim=1) / n_atoms
    var = members.var(dim=1) / n_atoms**2
    y = target / n_atoms

    nll = losses.energy_nll(members, target, n_atoms)
    torch.testing.assert_close(nll, losses.gaussian_nll(y, mean, var))
    crps = losses.energy_crps(members, target, n_atoms)
    torch.testing.assert_close(crps, losses.gaussian_crps(y, mean, var.sqrt()))


def test_energy_nll_floor_is_per_atom():
    members = _tensor([[100.0, 100.0]])  # zero spread: the floor takes over
    nll = losses.energy_nll(
        members, _tensor([110.0]), torch.tensor([10]), var_floor=0.5
    )
    assert nll.item() == pytest.approx(0.5 * (math.log(0.5) + 1.0 / 0.5), rel=1e-14)


def test_energy_nll_checks_shapes():
    with pytest.raises(ValueError, match="`n_atoms` has shape \\(2,\\)"):
        losses.energy_nll(torch.zeros(3, 4), torch.zeros(3), torch.ones(2))


def _member_forces(seed: int, n_members: int = 8, n_atoms: int = 5):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_atoms, 3, 3, dtype=DTYPE, generator=generator)
    noise = torch.randn(n_members, n_atoms, 3, dtype=DTYPE, generator=generator)
    members = torch.einsum("iab,kib->kia", mixing, noise)  # correlated components
    target = torch.randn(n_atoms, 3, dtype=DTYPE, generator=generator)
    return members, target


def test_force_nll_per_component():
    members, target = _member_forces(2)
    expected = losses.gaussian_nll(target, members.mean(dim=0), members.var(dim=0))
    torch.testing.assert_close(losses.force_nll(members, target), expected)


def test_force_crps_per_component():
    members, target = _member_forces(3)
    std = members.std(dim=0)
    expected = losses.gaussian_crps(target, members.mean(dim=0), std)
    torch.testing.assert_close(losses.force_crps(members, target), expected)


def test_force_nll_full_matches_multivariate_normal():
    members, target = _member_forces(4)
    eps = 1e-6
    mean = members.mean(dim=0)
    deviations = members - mean
    cov = torch.einsum("kia,kib->iab", deviations, deviations) / (members.shape[0] - 1)
    cov = cov + eps * torch.eye(3, dtype=DTYPE)
    normal = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    expected = -normal.log_prob(target).mean() - 3.0 * HALF_LOG_2PI
    torch.testing.assert_close(
        losses.force_nll_full(members, target, eps=eps), expected
    )


def test_force_nll_full_is_three_times_diagonal_form():
    # Hadamard rows: zero-sum, mutually orthogonal deviations, so that the member
    # covariance of each atom is exactly diagonal
    hadamard = _tensor([[1.0, 1.0, -1.0, -1.0], [1.0, -1.0, 1.0, -1.0], [1, -1, -1, 1]])
    scales = _tensor([[0.5, 1.0, 2.0], [3.0, 0.1, 0.2]])  # (n_atoms, 3)
    centres = _tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]])
    members = centres + scales * hadamard.T.unsqueeze(1)  # (4, 2, 3)
    target = _tensor([[0.0, 2.5, 1.0], [-4.0, 0.3, 1.1]])
    full = losses.force_nll_full(members, target, eps=0.0)
    diagonal = losses.force_nll(members, target, var_floor=0.0)
    torch.testing.assert_close(full, 3.0 * diagonal, rtol=1e-13, atol=0.0)


def test_force_losses_check_shapes():
    with pytest.raises(ValueError, match="`member_forces` has shape \\(4, 2\\)"):
        losses.force_nll(torch.zeros(4, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`target` has shape \\(3, 3\\)"):
        losses.force_crps(torch.zeros(4, 2, 3), torch.zeros(3, 3))


def _energy_inputs():
    generator = torch.Generator().manual_seed(5)
    members = torch.randn(4, 6, dtype=DTYPE, generator=generator).requires_grad_()
    return members, (
        torch.randn(4, dtype=DTYPE, generator=generator),
        torch.tensor([2, 3, 4, 5]),
    )


@pytest.mark.parametrize("name", sorted(losses.ENERGY_LOSSES))
def test_energy_losses_backpropagate(name):
    members, (target, n_atoms) = _energy_inputs()
    loss = losses.get_energy_loss(name)(members, target, n_atoms)
    assert loss.shape == ()
    (grad,) = torch.autograd.grad(loss, members)
    assert torch.isfinite(grad).all()
    assert grad.abs().max() > 0


@pytest.mark.parametrize("name", sorted(losses.FORCE_LOSSES))
def test_force_losses_backpropagate(name):
    members, target = _member_forces(6, n_members=3)
    members.requires_grad_()
    loss = losses.get_force_loss(name)(members, target)
    assert loss.shape == ()
    (grad,) = torch.autograd.grad(loss, members)
    assert torch.isfinite(grad).all()
    assert grad.abs().max() > 0


def test_registries():
    assert losses.get_energy_loss("gaussian_nll_ensemble") is losses.energy_nll
    assert losses.get_energy_loss("gaussian_crps_ensemble") is losses.energy_crps
    assert losses.get_force_loss("gaussian_nll_ensemble") is losses.force_nll
    assert losses.get_force_loss("gaussian_nll_full_ensemble") is losses.force_nll_full
    assert losses.get_force_loss("gaussian_crps_ensemble") is losses.force_crps


def test_unknown_loss_names():
    message = (
        "unknown loss `mse`; choose one of: "
        "gaussian_crps_ensemble, gaussian_nll_ensemble$"
    )
    with pytest.raises(ValueError, match=message):
        losses.get_energy_loss("mse")
    with pytest.raises(ValueError, match="unknown loss `crps`; choose one of: .*full"):
        losses.get_force_loss("crps")


def test_losses_backpropagate_through_collapsed_ensembles():
    # identical members: zero variance, the floors take over and gradients stay finite
    energies = torch.ones(3, 4, dtype=DTYPE, requires_grad=True)
    forces = torch.ones(4, 2, 3, dtype=DTYPE, requires_grad=True)
    target = torch.zeros(3, dtype=DTYPE)
    for name, loss_fn in losses.ENERGY_LOSSES.items():
        loss = loss_fn(energies, target, torch.tensor([1, 2, 3]))
        (grad,) = torch.autograd.grad(loss, energies)
        assert torch.isfinite(grad).all(), name
    for name, loss_fn in losses.FORCE_LOSSES.items():
        loss = loss_fn(forces, torch.zeros(2, 3, dtype=DTYPE))
        (grad,) = torch.autograd.grad(loss, forces)
        assert torch.isfinite(grad).all(), name
