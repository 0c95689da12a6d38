r"""Training losses for shallow ensembles: MSE, Gaussian NLL and Gaussian CRPS.

All losses are differentiable functions of torch tensors that return a scalar tensor,
averaged over samples. Ensemble statistics are taken over the members with the mean
and the *unbiased* variance :math:`\frac{1}{M-1} \sum_k (x_k - \bar{x})^2`.

Energy losses are evaluated on per-atom energies (the total energy, its ensemble mean
and standard deviation divided by the atom count), so that large structures do not
dominate the loss. Force losses are evaluated per Cartesian component, or per atom with
the full :math:`3 \times 3` member covariance.

Losses are picked by the metatrain keys ``gaussian_nll_ensemble``,
``gaussian_nll_full_ensemble`` (forces only) and ``gaussian_crps_ensemble`` through
:py:func:`get_energy_loss` and :py:func:`get_force_loss`.
"""

import math
from collections.abc import Callable

import torch


DEFAULT_VARIANCE_FLOOR = 1e-6
"""Lower bound on predicted variances in NLL losses, in the target's units squared
((eV/atom)² for energies, (eV/Å)² for forces). Variances are clamped from below
with it, so that the NLL stays finite when the members collapse."""

DEFAULT_STD_FLOOR = 1e-3
"""Lower bound on predicted standard deviations in CRPS losses, in the target's units
(eV per atom for energies, eV/Å for forces); the square root of
:py:data:`DEFAULT_VARIANCE_FLOOR`."""

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    names = list(tensors)
    reference = tensors[names[0]].shape
    for name in names[1:]:
        if tensors[name].shape != reference:
            raise ValueError(
                f"`{name}` has shape {tuple(tensors[name].shape)} but must have the "
                f"same shape as `{names[0]}`, {tuple(reference)}"
            )


def _check_non_negative(name: str, value: float) -> None:
    if value < 0.0:
        raise ValueError(f"`{name}` is {value} but must be non-negative")


def ensemble_mean_var(
    members: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ensemble mean and unbiased variance over the members.

    :param members: member predictions, with the ``n_members`` entries along ``dim``;
        any units
    :param dim: the dimension indexing the members
    :return: ``(mean, var)``, both of the shape of ``members`` without ``dim``; the
        mean in the members' units, the variance (``1/(M-1)`` normalisation) in their
        units squared
    """
    n_members = members.shape[dim]
    if n_members < 2:
        entries = "entry" if n_members == 1 else "entries"
        raise ValueError(
            f"`members` has {n_members} {entries} along dim {dim} but an ensemble "
            "variance needs at least 2"
        )
    var, mean = torch.var_mean(members, dim=dim, correction=1)
    return mean, var


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Mean squared error.

    :param prediction: predicted values, any shape, in the target's units
    :param target: reference values, same shape as ``prediction``
    :return: scalar, :math:`\langle (p - y)^2 \rangle`, in the target's units squared
    """
    _check_same_shape(prediction=prediction, target=target)
    return torch.mean((prediction - target) ** 2)


def gaussian_nll(
    target: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    var_floor: float = DEFAULT_VARIANCE_FLOOR,
    full: bool = False,
) -> torch.Tensor:
    r"""Gaussian negative log-likelihood, averaged over all elements.

    :math:`\frac{1}{2} [\log \sigma^2 + (y - \mu)^2 / \sigma^2]`, with
    :math:`\sigma^2` clamped from below at ``var_floor``.

    :param target: reference values :math:`y`, any shape, in the target's units
    :param mean: predicted means :math:`\mu`, same shape and units as ``target``
    :param var: predicted variances :math:`\sigma^2`, same shape as ``target``, in the
        target's units squared
    :param var_floor: lower bound on the variance, in the target's units squared
    :param full: add the constant :math:`\frac{1}{2} \log 2\pi` (the full NLL)
    :return: scalar, the mean NLL (dimensionless, depends on the units through
        :math:`\log \sigma^2`)
    """
    _check_same_shape(target=target, mean=mean, var=var)
    _check_non_negative("var_floor", var_floor)
    var = torch.clamp(var, min=var_floor)
    nll = 0.5 * (torch.log(var) + (target - mean) ** 2 / var)
    if full:
        nll = nll + _HALF_LOG_2PI
    return torch.mean(nll)


def gaussian_crps(
    target: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    std_floor: float = DEFAULT_STD_FLOOR,
) -> torch.Tensor:
    r"""Continuous ranked probability score of a Gaussian, averaged over all elements.

    Closed form :math:`\sigma [z (2 \Phi(z) - 1) + 2 \phi(z) - 1/\sqrt{\pi}]`
    with :math:`z = (y - \mu)/\sigma`, :math:`\sigma` clamped from below at
    ``std_floor``.

    :param target: reference values :math:`y`, any shape, in the target's units
    :param mean: predicted means :math:`\mu`, same shape and units as ``target``
    :param std: predicted standard deviations :math:`\sigma`, same shape and units
        as ``target``
    :param std_floor: lower bound on the standard deviation, in the target's units
    :return: scalar, the mean CRPS, in the target's units
    """
    _check_same_shape(target=target, mean=mean, std=std)
    _check_non_negative("std_floor", std_floor)
    std = torch.clamp(std, min=std_floor)
    z = (target - mean) / std
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z**2) / math.sqrt(2.0 * math.pi)
    crps = std * (z * (2.0 * cdf - 1.0) + 2.0 * pdf - 1.0 / math.sqrt(math.pi))
    return torch.mean(crps)


def _floored_std(var: torch.Tensor, std_floor: float) -> torch.Tensor:
    # floor before the square root: the gradient of sqrt at a collapsed ensemble
    # (var = 0) is infinite, and would turn into NaN behind the floor's zero mask
    return torch.sqrt(torch.clamp(var, min=std_floor**2))


def _per_atom_energy_stats(
    member_energies: torch.Tensor, target: torch.Tensor, n_atoms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if member_energies.dim() != 2:
        raise ValueError(
            f"`member_energies` has shape {tuple(member_energies.shape)} but must be "
            "(n_systems, n_members)"
        )
    n_systems = member_energies.shape[0]
    for name, tensor in (("target", target), ("n_atoms", n_atoms)):
        if tensor.shape != (n_systems,):
            raise ValueError(
                f"`{name}` has shape {tuple(tensor.shape)} but must be (n_systems,) = "
                f"({n_systems},)"
            )
    mean, var = ensemble_mean_var(member_energies, dim=1)
    n_atoms = n_atoms.to(dtype=mean.dtype)
    return target / n_atoms, mean / n_atoms, var / n_atoms**2


def energy_nll(
    member_energies: torch.Tensor,
    target: torch.Tensor,
    n_atoms: torch.Tensor,
    var_floor: float = DEFAULT_VARIANCE_FLOOR,
) -> torch.Tensor:
    r"""Gaussian NLL of total energies, normalised per atom.

    With :math:`N` atoms, the NLL compares :math:`y/N` with the ensemble mean
    :math:`\mu/N` and variance :math:`\sigma^2/N^2` of the member energies, so that
    large structures do not dominate the loss.

    :param member_energies: total energy of each member, shape
        ``(n_systems, n_members)``, in eV
    :param target: reference total energies, shape ``(n_systems,)``, in eV
    :param n_atoms: atom count of each system, shape ``(n_systems,)``
    :param var_floor: lower bound on the per-atom variance, in eV²
    :return: scalar, the mean per-atom NLL over systems
    """
    y, mean, var = _per_atom_energy_stats(member_energies, target, n_atoms)
    return gaussian_nll(y, mean, var, var_floor=var_floor)


def mean_squared_z(
    target: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    var_floor: float = DEFAULT_VARIANCE_FLOOR,
) -> torch.Tensor:
    r""":math:`\langle (y - \mu)^2 / \sigma^2 \rangle`, with :math:`\sigma^2`
    clamped as in :py:func:`gaussian_nll`: the square of the factor alpha that
    calibrates these predictions. The NLL at that factor is the NLL minus
    :math:`\frac{1}{2} (z^2 - 1 - \log z^2)`, what a global recalibration removes.

    :return: scalar, dimensionless
    """
    _check_same_shape(target=target, mean=mean, var=var)
    var = torch.clamp(var, min=var_floor)
    return torch.mean((target - mean) ** 2 / var)


def energy_mean_squared_z(
    member_energies: torch.Tensor,
    target: torch.Tensor,
    n_atoms: torch.Tensor,
    var_floor: float = DEFAULT_VARIANCE_FLOOR,
) -> torch.Tensor:
    """:py:func:`mean_squared_z` of the per-atom energies of :py:func:`energy_nll`."""
    y, mean, var = _per_atom_energy_stats(member_energies, target, n_atoms)
    return mean_squared_z(y, mean, var, var_floor=var_floor)


def force_mean_squared_z(
    member_forces: torch.Tensor,
    target: torch.Tensor,
    var_floor: float = DEFAULT_VARIANCE_FLOOR,
) -> torch.Tensor:
    """:py:func:`mean_squared_z` of the force components of :py:func:`force_nll`."""
    _check_member_forces(member_forces, target)
    mean, var = ensemble_mean_var(member_forces, dim=0)
    return mean_squared_z(target, mean, var, var_floor=var_floor)


def energy_crps(
    member_energies: torch.Tensor,
    target: torch.Tensor,
    n_atoms: torch.Tensor,
    std_floor: float = DEFAULT_STD_FLOOR,
) -> torch.Tensor:
    """Gaussian CRPS of total energies, normalised per atom as in :py:func:`energy_nll`.

    :param member_energies: total energy of each member, shape
        ``(n_systems, n_members)``, in eV
    :param target: reference total energies, shape ``(n_systems,)``, in eV
    :param n_atoms: atom count of each system, shape ``(n_systems,)``
    :param std_floor: lower bound on the per-atom standard deviation, in eV
    :return: scalar, the mean per-atom CRPS over systems, in eV
    """
    y, mean, var = _per_atom_energy_stats(member_energies, target, n_atoms)
    return gaussian_crps(y, mean, _floored_std(var, std_floor), std_floor=std_floor)


def _check_member_forces(member_forces: torch.Tensor, target: torch.Tensor) -> None:
    if member_forces.dim() != 3 or member_forces.shape[2] != 3:
        raise ValueError(
            f"`member_forces` has shape {tuple(member_forces.shape)} but must be "
            "(n_members, n_atoms, 3)"
        )
    if target.shape != member_forces.shape[1:]:
        raise ValueError(
            f"`target` has shape {tuple(target.shape)} but must be (n_atoms, 3) = "
            f"{tuple(member_forces.shape[1:])}"
        )


def force_nll(
    member_forces: torch.Tensor,
    target: torch.Tensor,
    var_floor: float = DEFAULT_VARIANCE_FLOOR,
) -> torch.Tensor:
    """Gaussian NLL of forces per Cartesian component, with the member variance.

    :param member_forces: forces of each member, shape ``(n_members, n_atoms, 3)``,
        in eV/Å
    :param target: reference forces, shape ``(n_atoms, 3)``, in eV/Å
    :param var_floor: lower bound on the variance, in (eV/Å)²
    :return: scalar, the mean NLL over the ``3 * n_atoms`` components
    """
    _check_member_forces(member_forces, target)
    mean, var = ensemble_mean_var(member_forces, dim=0)
    return gaussian_nll(target, mean, var, var_floor=var_floor)


def force_nll_full(
    member_forces: torch.Tensor, target: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    r"""Gaussian NLL of forces with the full per-atom :math:`3 \times 3` covariance.

    :math:`\mathrm{NLL}_i = \frac{1}{2} [d_i^T S_i^{-1} d_i + \log \det S_i]`, with
    :math:`d_i` the error of the mean force on atom :math:`i` and :math:`S_i` the
    unbiased member covariance of its force plus ``eps`` times the identity. The
    value is per atom (three components), so for a diagonal covariance it is three
    times :py:func:`force_nll`.

    :param member_forces: forces of each member, shape ``(n_members, n_atoms, 3)``,
        in eV/Å
    :param target: reference forces, shape ``(n_atoms, 3)``, in eV/Å
    :param eps: added to the diagonal of each covariance, in (eV/Å)², so that it is
        positive definite (with fewer than four members it is singular otherwise)
    :return: scalar, the mean NLL over atoms
    """
    _check_member_forces(member_forces, target)
    _check_non_negative("eps", eps)
    n_members = member_forces.shape[0]
    if n_members < 2:
        raise ValueError(
            f"`member_forces` has {n_members} member(s) along dim 0 but an "
            "ensemble covariance needs at least 2"
        )
    mean = member_forces.mean(dim=0)
    deviations = member_forces - mean  # (n_members, n_atoms, 3)
    cov = torch.einsum("kia,kib->iab", deviations, deviations) / (n_members - 1)
    identity = torch.eye(3, dtype=cov.dtype, device=cov.device)
    cholesky = torch.linalg.cholesky(cov + eps * identity)  # (n_atoms, 3, 3)
    error = (target - mean).unsqueeze(-1)  # (n_atoms, 3, 1)
    whitened = torch.linalg.solve_triangular(cholesky, error, upper=False)
    quadratic = whitened.squeeze(-1).pow(2).sum(dim=-1)
    log_det = 2.0 * torch.log(torch.diagonal(cholesky, dim1=-2, dim2=-1)).sum(dim=-1)
    return torch.mean(0.5 * (quadratic + log_det))


def force_crps(
    member_forces: torch.Tensor,
    target: torch.Tensor,
    std_floor: float = DEFAULT_STD_FLOOR,
) -> torch.Tensor:
    """Gaussian CRPS of forces per Cartesian component, with the member std.

    :param member_forces: forces of each member, shape ``(n_members, n_atoms, 3)``,
        in eV/Å
    :param target: reference forces, shape ``(n_atoms, 3)``, in eV/Å
    :param std_floor: lower bound on the standard deviation, in eV/Å
    :return: scalar, the mean CRPS over the ``3 * n_atoms`` components, in eV/Å
    """
    _check_member_forces(member_forces, target)
    mean, var = ensemble_mean_var(member_forces, dim=0)
    return gaussian_crps(
        target, mean, _floored_std(var, std_floor), std_floor=std_floor
    )


VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
"""The six independent components of a symmetric 3x3 tensor, in Voigt order
``xx yy zz yz xz xy``."""


def virials_per_atom(
    stress: torch.Tensor, cell: torch.Tensor, n_atoms: torch.Tensor
) -> torch.Tensor:
    r"""The six components of :math:`V \sigma / N` (eV) of each system.

    Stress losses compare these rather than stresses (eV/Å³): a per-atom virial has
    the scale of a per-atom energy, so one weight balances the two for any cell.

    :param stress: ``(..., n_systems, 3, 3)``, eV/Å³
    :param cell: ``(n_systems, 3, 3)``, Å
    :param n_atoms: ``(n_systems,)``
    :return: ``(..., n_systems, 6)``, eV
    """
    volume = torch.linalg.det(cell.to(stress.dtype)).abs()
    scale = volume / n_atoms.to(stress.dtype)
    return voigt(stress) * scale.unsqueeze(-1)


def voigt(tensor: torch.Tensor) -> torch.Tensor:
    """The six components ``xx yy zz yz xz xy`` of symmetric 3x3 matrices
    ``(..., 3, 3)``, as ``(..., 6)``."""
    rows = [a for a, _ in VOIGT]
    cols = [b for _, b in VOIGT]
    return tensor[..., rows, cols]


def stress_loss(
    name: str,
    member_stress: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    cell: torch.Tensor,
    n_atoms: torch.Tensor,
) -> torch.Tensor:
    r"""Loss of the stresses of the systems in ``mask``, per structure of the batch.

    The loss ``name`` (``"mse"`` of the ensemble mean, or a key of
    :py:data:`FORCE_LOSSES`: the Gaussian NLL per component for both NLL keys, or the
    CRPS) compares the six components of :py:func:`virials_per_atom`; it is averaged
    over the systems with a stress, then multiplied by their share of the batch, so
    that the term is a mean over all the structures (those without stress count as
    zero), like the energy term.

    :param member_stress: ``(n_members, n_systems, 3, 3)`` (one member for the mean
        of an MSE), eV/Å³
    :param target: ``(n_systems, 3, 3)``, eV/Å³ (any values where ``mask`` is
        ``False``)
    :param mask: ``(n_systems,)``, ``bool``
    :param cell: ``(n_systems, 3, 3)``, Å
    :param n_atoms: ``(n_systems,)``
    :return: scalar
    """
    share = mask.to(member_stress.dtype).mean()
    members = virials_per_atom(member_stress, cell, n_atoms)[:, mask]
    reference = virials_per_atom(target, cell, n_atoms)[mask]
    if name == "mse":
        value = mse(members.mean(dim=0), reference)
    else:
        mean, var = ensemble_mean_var(members, dim=0)
        if name == "gaussian_crps_ensemble":
            std = _floored_std(var, DEFAULT_STD_FLOOR)
            value = gaussian_crps(reference, mean, std)
        else:
            _get_loss(FORCE_LOSSES, name)  # an unknown name is an error
            value = gaussian_nll(reference, mean, var)
    return value * share


ENERGY_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "gaussian_nll_ensemble": energy_nll,
    "gaussian_crps_ensemble": energy_crps,
}
"""Energy losses by key; each takes ``(member_energies, target, n_atoms)``."""

FORCE_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "gaussian_nll_ensemble": force_nll,
    "gaussian_nll_full_ensemble": force_nll_full,
    "gaussian_crps_ensemble": force_crps,
}
"""Force losses by key; each takes ``(member_forces, target)``."""

ENERGY_LOSS_NAMES: tuple[str, ...] = tuple(ENERGY_LOSSES)
"""The keys of :py:data:`ENERGY_LOSSES` (the choices of ``training.energy_loss``)."""

FORCE_LOSS_NAMES: tuple[str, ...] = tuple(FORCE_LOSSES)
"""The keys of :py:data:`FORCE_LOSSES` (the choices of ``training.forces_loss``)."""


def _get_loss(
    registry: dict[str, Callable[..., torch.Tensor]], name: str
) -> Callable[..., torch.Tensor]:
    try:
        return registry[name]
    except KeyError:
        choices = ", ".join(sorted(registry))
        raise ValueError(f"unknown loss `{name}`; choose one of: {choices}") from None


def get_energy_loss(name: str) -> Callable[..., torch.Tensor]:
    """Look up an energy loss in :py:data:`ENERGY_LOSSES`.

    :param name: the loss key, e.g. ``"gaussian_nll_ensemble"``
    :return: the loss function, called as ``loss(member_energies, target, n_atoms)``
    """
    return _get_loss(ENERGY_LOSSES, name)


def get_force_loss(name: str) -> Callable[..., torch.Tensor]:
    """Look up a force loss in :py:data:`FORCE_LOSSES`.

    :param name: the loss key, e.g. ``"gaussian_nll_ensemble"``
    :return: the loss function, called as ``loss(member_forces, target)``
    """
    return _get_loss(FORCE_LOSSES, name)
