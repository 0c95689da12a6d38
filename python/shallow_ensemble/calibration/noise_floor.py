r"""Noise floors of the calibrated uncertainties: :math:`\sigma^2 = \alpha^2
\sigma_\mathrm{ens}^2 + \sigma_0^2`.

One stretch factor (:py:mod:`.recalibrate`) cannot serve components without ensemble
spread (atoms on high-symmetry sites, atoms without neighbours) and the rest at once.
:py:func:`fit_noise_floor` fits the factor jointly with a floor (one per group, e.g.
per element) by the Gaussian NLL; :py:func:`select_noise_floor` keeps a floor only
where it predicts held-out structures better. Written here (no library of the field
has it) as a small, closed-form-tested optimisation: L-BFGS, then Newton steps.
"""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CalibrationError


@dataclass(frozen=True)
class NoiseFloors:
    r"""Noise floors of the calibrated uncertainties (see :py:func:`fit_noise_floor`).

    The members are stretched by ``alpha`` (what engines that see only the members
    get: where a floor is kept, the factor of the components whose uncertainty the
    ensemble term rules); an uncertainty with a floor is then
    :math:`\sqrt{(s \sigma)^2 + \sigma_0^2}`, with :math:`\sigma` the spread of the
    stretched members, :math:`s` the scale of the floor model and :math:`\sigma_0`:

    - structure energies: :math:`s` = :py:attr:`energy_scale`, :math:`\sigma_0 = N
      \times` :py:attr:`energy` (a floor on the energy per atom);
    - per-atom energy uncertainties: :py:attr:`atom_scale`, :py:attr:`atom` (they add
      up in quadrature, so a structure gets :math:`\sqrt{N} \times`
      :py:attr:`atom`);
    - force components: :py:attr:`forces_scale`, :py:attr:`forces` of the atom's
      element.
    """

    energy: float = 0.0
    """Floor of the energy per atom, eV/atom."""
    atom: float = 0.0
    """Floor of each per-atom energy uncertainty, eV."""
    forces: dict[int, float] = field(default_factory=dict)
    """Floor of each force component by atomic number, eV/Å (0 for elements not
    listed)."""
    energy_scale: float = 1.0
    """Scale of the calibrated energy spread in the floor model."""
    atom_scale: float = 1.0
    """Scale of the calibrated per-atom spread in the floor model (1 in this
    version's calibrations: ``alpha_atom`` is the floor model's factor)."""
    forces_scale: float = 1.0
    """Scale of the calibrated force spread in the floor model."""

    @classmethod
    def from_buffers(cls, module: Any) -> "NoiseFloors":
        """The floors in the buffers of a model kind or an exported model
        (``sigma0_energy``, ``sigma0_atom``, ``sigma0_forces`` by atomic number and
        the ``floor_scale_*``)."""
        forces = module.sigma0_forces.detach().cpu()
        return cls(
            energy=float(module.sigma0_energy),
            atom=float(module.sigma0_atom),
            forces={int(z): float(forces[z]) for z in torch.nonzero(forces).flatten()},
            energy_scale=float(module.floor_scale_energy),
            atom_scale=float(module.floor_scale_atom),
            forces_scale=float(module.floor_scale_forces),
        )

    def force_floor(self, numbers: torch.Tensor) -> torch.Tensor:
        """The force floor of each atom, ``(n_atoms,)`` float64, eV/Å."""
        table = torch.zeros(
            max(
                [
                    int(numbers.max()) + 1 if numbers.numel() else 1,
                    *[z + 1 for z in self.forces],
                ]
            ),
            dtype=torch.float64,
        )
        for z, value in self.forces.items():
            table[z] = value
        return table[numbers.to(torch.long)]


def floored_std(
    std: torch.Tensor,
    alpha: float | torch.Tensor,
    sigma0: float | torch.Tensor,
    weight: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    r"""Calibrated uncertainty with a noise floor,
    :math:`\sqrt{\alpha^2 \sigma^2 + (w \sigma_0)^2}`.

    :param std: ensemble standard deviations, any shape, in the target's units
    :param alpha: dimensionless scale of the ensemble spread
    :param sigma0: the noise floor, broadcastable against ``std`` (e.g. one value per
        component, looked up from one value per element), in the target's units
        (divided by those of ``weight``)
    :param weight: multiplies the floor, broadcastable against ``std`` (e.g. the
        number of atoms, for a floor given per atom on structure energies)
    :return: the calibrated standard deviations, shape and units of ``std``
    """
    return torch.sqrt((alpha * std) ** 2 + (weight * sigma0) ** 2)


def fit_noise_floor(
    y_true: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    weight: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    n_groups: int = 1,
) -> tuple[float, list[float]]:
    r"""NLL-optimal scale and noise floor of the uncertainties.

    Fits :math:`\sigma_i^2 = \alpha^2 \sigma_{\mathrm{ens},i}^2 + (w_i
    \sigma_{0,g(i)})^2` by minimising the mean Gaussian NLL of the errors
    :math:`y_i - \mu_i`: one :math:`\alpha` for all components, one floor
    :math:`\sigma_{0,g}` per group (e.g. per element for force components). The floor
    gives components without ensemble spread (atoms on high-symmetry sites, atoms
    without neighbours) a finite likelihood, and stops one stretch factor from having
    to serve both them and the rest.

    Components with neither spread nor error carry no information on either parameter
    and are left out. A group whose fitted floor does not lower the NLL (within float64
    rounding) gets exactly zero; without any floor the fit is
    :py:func:`fit_alpha`. Closed forms: when every component of a group has zero
    spread, :math:`\sigma_{0,g}^2 = \langle e^2/w^2 \rangle_g`; when :math:`e_i^2 = c
    \sigma_{\mathrm{ens},i}^2` for all i, :math:`\alpha^2 = c` and no floor.

    :param y_true: reference values, any shape, in the target's units
    :param mean: ensemble means, same number of elements and units
    :param std: ensemble standard deviations, same number of elements and units
    :param weight: per-component multiplier of the floor (e.g. the number of atoms
        of a structure, to fit a per-atom floor on structure energies), dimensionless;
        default 1
    :param groups: per-component group index in ``[0, n_groups)``, ``int64``;
        default: one group
    :param n_groups: the number of groups
    :return: ``alpha`` and the list of ``n_groups`` floors (in the target's units
        divided by those of ``weight``; zero for groups without components)
    """
    return _Components(y_true, mean, std, weight, groups).fit_floor(n_groups)


def _floor_nll(
    err2: torch.Tensor,
    var: torch.Tensor,
    weight2: torch.Tensor,
    groups: torch.Tensor,
    a: float | torch.Tensor,
    b: torch.Tensor,
) -> torch.Tensor:
    """Mean Gaussian NLL (without the constant) of :py:func:`fit_noise_floor`'s
    model, ``a = alpha^2`` and ``b = sigma0^2`` per group."""
    v = a * var + weight2 * b[groups]
    return 0.5 * torch.mean(torch.log(v) + err2 / v)


def _minimise_floor_nll(
    err2: torch.Tensor,
    var: torch.Tensor,
    weight2: torch.Tensor,
    groups: torch.Tensor,
    free: torch.Tensor,
    alpha2: float | None = None,
) -> tuple[float, torch.Tensor]:
    """``alpha^2`` and the squared floors minimising :py:func:`_floor_nll`, the
    floors of the groups not ``free`` held at zero (L-BFGS on their logarithms, then
    Newton steps); ``alpha2`` given: ``alpha^2`` held at that value.

    The NLL is not convex in these parameters: a start where the floor explains
    everything can end in a local minimum with ``alpha`` near zero while the global
    one has a small floor. So the descent runs from two starts and the lowest NLL
    wins: ``alpha^2`` at the mean and at the median of ``err2 / var`` (the mean is
    ruled by the components with the least spread), each floor at the mean squared
    error of its group's components without spread, or at a tenth of its group's
    mean squared error."""
    n_groups = free.shape[0]
    spread = var > 0
    if not bool(free.any()):
        # no floor: the closed form of fit_alpha
        b0 = torch.zeros(n_groups, dtype=torch.float64)
        return float(torch.mean(err2 / var)) if alpha2 is None else alpha2, b0
    if alpha2 is not None:
        a_starts = [alpha2]
    else:
        ratio = err2[spread] / var[spread]
        a_starts = [float(torch.mean(ratio)), float(torch.median(ratio))]
    b0 = torch.zeros(n_groups, dtype=torch.float64)
    for k in range(n_groups):
        in_k = groups == k
        if bool(free[k]):
            flat = in_k & ~spread
            pick, share = (flat, 1.0) if bool(flat.any()) else (in_k, 0.1)
            b0[k] = share * float(torch.mean(err2[pick] / weight2[pick]))
    best: tuple[float, torch.Tensor, float] | None = None
    for a0 in a_starts:
        a, b = _descend(err2, var, weight2, groups, free, a0, b0, alpha2 is None)
        nll = float(_floor_nll(err2, var, weight2, groups, a, b))
        if best is None or nll < best[2]:
            best = (a, b, nll)
    assert best is not None
    return best[0], best[1]


def _descend(
    err2: torch.Tensor,
    var: torch.Tensor,
    weight2: torch.Tensor,
    groups: torch.Tensor,
    free: torch.Tensor,
    a0: float,
    b0: torch.Tensor,
    free_alpha: bool,
) -> tuple[float, torch.Tensor]:
    """One descent of :py:func:`_minimise_floor_nll` from ``alpha^2 = a0`` and the
    squared floors ``b0`` (``alpha^2`` held at ``a0`` unless ``free_alpha``)."""
    n_groups = free.shape[0]
    log_a = torch.tensor(math.log(max(a0, 1e-300)), dtype=torch.float64)
    log_b = torch.log(b0[free].clamp(min=1e-300))
    log_a.requires_grad_(free_alpha)
    log_b.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [log_a, log_b] if free_alpha else [log_b],
        lr=1.0,
        max_iter=1000,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def floors(log_b: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_groups, dtype=torch.float64).masked_scatter(
            free, torch.exp(log_b)
        )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _floor_nll(err2, var, weight2, groups, torch.exp(log_a), floors(log_b))
        loss.backward()
        return loss

    optimizer.step(closure)
    if not free_alpha:
        theta = _newton(
            lambda t: _floor_nll(err2, var, weight2, groups, a0, floors(t)),
            log_b.detach(),
        )
        return a0, floors(theta)
    theta = _newton(
        lambda t: _floor_nll(
            err2, var, weight2, groups, torch.exp(t[0]), floors(t[1:])
        ),
        torch.cat([log_a.detach().reshape(1), log_b.detach()]),
    )
    with torch.no_grad():
        return float(torch.exp(theta[0])), floors(theta[1:])


def _newton(
    function: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor
) -> torch.Tensor:
    """Polish a minimum of a smooth function of a few parameters with damped Newton
    steps: L-BFGS stops where the NLL stops changing in float64, which leaves the
    parameters of a flat valley (scale against floor) uncertain; Newton steps drive
    the gradient itself to rounding, so that nearly equal inputs give nearly equal
    fits."""
    for _ in range(50):
        value = function(theta)
        gradient = torch.autograd.functional.jacobian(function, theta)
        if not bool(torch.isfinite(gradient).all()):
            break
        hessian = torch.autograd.functional.hessian(function, theta)
        eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
        # damped: directions of negative or tiny curvature move along the gradient
        curvature = eigenvalues.clamp(min=1e-8 * float(eigenvalues.abs().max()) + 1e-30)
        step = -eigenvectors @ ((eigenvectors.T @ gradient) / curvature)
        largest = float(step.abs().max())
        if largest == 0.0:
            break
        step = step * min(1.0, 10.0 / largest)
        size = 1.0
        while size > 1e-6:
            trial = theta + size * step
            if float(function(trial)) <= float(value):
                break
            size /= 2
        else:
            break
        if bool(torch.equal(trial, theta)):
            break
        theta = trial
    return theta.detach()


MIN_ENSEMBLE_SHARE = 1e-2
"""Smallest share of the ensemble spread in the variance of a floor model, averaged
over the components (``alpha^2 sigma^2 / (alpha^2 sigma^2 + w^2 sigma_0^2)``), that
:py:func:`select_noise_floor` accepts."""


def select_noise_floor(
    y_true: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    folds: torch.Tensor,
    weight: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    n_groups: int = 1,
) -> tuple[float, list[float]]:
    r""":py:func:`fit_noise_floor` where a floor predicts held-out data better than
    the factor alone, else the factor alone.

    Three models are compared by their cross-validated Gaussian NLL: the factor
    alone, one floor shared by all groups, and one floor per group (the latter two
    only differ with several groups); each fold of ``folds`` (e.g. the structure's
    index modulo 5, so that the components of a structure stay together) is predicted
    by the model fitted on the other folds, and the lowest total wins (ties go to the
    simpler model). A shared floor is what a group needs whose few components
    without spread all fall into one fold: fitted per group on the other folds, its
    floor is zero, and one such component held out costs more than all the others
    gain.
    With a few validation structures, a floor fitted on them can swallow the ensemble
    (``alpha`` near zero: the same uncertainty everywhere); held out, it survives only
    if the data support it. The chosen model is then fitted on all the data. Where a
    component has no spread but an error, the factor alone has an infinite NLL and
    the floor is chosen. A floor model whose variance is on average less than
    :py:data:`MIN_ENSEMBLE_SHARE` ensemble spread (``alpha`` near zero: the same
    uncertainty everywhere, as a handful of validation structures can suggest) is not
    used: the factor alone is kept, with floors, at that factor, only for the groups
    that need them.

    :param folds: per-component fold index, ``int64``, same number of elements as
        ``y_true``; with fewer than two folds the floor is chosen only where needed
    :return: as :py:func:`fit_noise_floor` (all floors zero for the factor alone)
    """
    data = _Components(y_true, mean, std, weight, groups)
    folds = folds.detach().flatten().to(torch.long)
    if folds.shape != data.e2.shape:
        raise CalibrationError("`folds` must have one entry per component")
    plain = data.fit_plain()
    fold_ids = torch.unique(folds).tolist()
    models = ["plain", "shared", "per group"] if n_groups > 1 else ["plain", "floor"]
    if len(fold_ids) < 2:  # no held-out data: a floor only where one is needed
        models = ["plain", models[-1]]
        floor_needed = not math.isfinite(data.total_nll(plain, [0.0] * n_groups))
        nll = [1.0, 0.0] if floor_needed else [0.0, 1.0]
    else:
        nll = [0.0] * len(models)
        for k in fold_ids:
            train, test = data.subset(folds != k), data.subset(folds == k)
            for i, name in enumerate(models):
                nll[i] += test.total_nll(*train.fit_model(name, n_groups))
    best = min(range(len(models)), key=lambda i: (nll[i], i))
    if models[best] == "plain":
        return plain, [0.0] * n_groups
    alpha, floors = data.fit_model(models[best], n_groups, strict=True)
    if data.ensemble_share(alpha, floors) >= MIN_ENSEMBLE_SHARE:
        return alpha, floors
    # the floor would replace the ensemble's spread: keep the spread, and a floor
    # only where one is needed, fitted at the factor alone
    informative = data.subset((data.var > 0) | (data.e2 > 0))
    needed = torch.zeros(n_groups, dtype=torch.bool)
    needed[informative.groups[informative.var == 0]] = True
    if not bool(needed.any()):
        return plain, [0.0] * n_groups
    _, b = _minimise_floor_nll(
        informative.e2,
        informative.var,
        informative.w2,
        informative.groups,
        needed,
        alpha2=plain**2,
    )
    return plain, [math.sqrt(float(x)) for x in b]


class _Components:
    """Squared errors, variances, squared floor weights and groups of components,
    flattened float64 (see :py:func:`select_noise_floor`)."""

    def __init__(
        self,
        y_true: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        weight: torch.Tensor | None,
        groups: torch.Tensor | None,
    ) -> None:
        sizes = {
            t.numel() for t in (y_true, mean, std, weight, groups) if t is not None
        }
        if len(sizes) != 1:
            raise CalibrationError(
                "`y_true`, `mean`, `std`, `weight` and `groups` must have the same "
                "number of elements"
            )
        self.e2 = (y_true.detach().flatten() - mean.detach().flatten()).double() ** 2
        self.var = std.detach().flatten().double() ** 2
        self.w2 = (
            torch.ones_like(self.var)
            if weight is None
            else weight.detach().flatten().double() ** 2
        )
        if bool((self.w2 <= 0).any()):
            raise CalibrationError("`weight` must be positive")
        self.groups = (
            torch.zeros(self.var.shape, dtype=torch.long)
            if groups is None
            else groups.detach().flatten().to(torch.long)
        )

    def subset(self, mask: torch.Tensor) -> "_Components":
        part = copy.copy(self)
        for name in ("e2", "var", "w2", "groups"):
            setattr(part, name, getattr(self, name)[mask])
        return part

    def fit_floor(self, n_groups: int) -> tuple[float, list[float]]:
        """:py:func:`fit_noise_floor` of these components."""
        informative = (self.var > 0) | (self.e2 > 0)
        data = self.subset(informative)
        e2, var, w2, g = data.e2, data.var, data.w2, data.groups
        spread = var > 0
        if not bool(spread.any()):
            raise CalibrationError(
                "cannot fit a scale factor: no component has an ensemble spread"
            )
        present = torch.zeros(n_groups, dtype=torch.bool)
        present[g] = True
        # a floor is needed wherever a group has a component without spread
        needed = torch.zeros(n_groups, dtype=torch.bool)
        needed[g[~spread]] = True
        a, b = _minimise_floor_nll(e2, var, w2, g, present)
        best = _floor_nll(e2, var, w2, g, a, b)
        # drop the floors that do not lower the NLL, then refit the others
        free = present.clone()
        for k in range(n_groups):
            if bool(present[k]) and not bool(needed[k]):
                trial = b.clone()
                trial[k] = 0.0
                nll = _floor_nll(e2, var, w2, g, a, trial)
                if float(nll) <= float(best) + 1e-12 * abs(float(best)):
                    b, best, free[k] = trial, nll, False
        if not bool(free.all()):
            a, b = _minimise_floor_nll(e2, var, w2, g, free)
        return math.sqrt(a), [math.sqrt(float(x)) for x in b]

    def fit_model(
        self, name: str, n_groups: int, strict: bool = False
    ) -> tuple[float, list[float]]:
        """The factor and floors of one of the models that
        :py:func:`select_noise_floor` compares: ``plain`` (the factor alone),
        ``shared`` (one floor for all groups), ``floor`` or ``per group`` (one floor
        per group); an infinite factor where it cannot be fitted, unless
        ``strict``."""
        if name == "plain":
            return self.fit_plain(), [0.0] * n_groups
        try:
            if name == "shared":
                pooled = self.subset(torch.ones_like(self.groups, dtype=torch.bool))
                pooled.groups = torch.zeros_like(self.groups)
                alpha, (floor,) = pooled.fit_floor(1)
                present = torch.zeros(n_groups, dtype=torch.bool)
                present[self.groups] = True
                return alpha, [floor if bool(p) else 0.0 for p in present]
            return self.fit_floor(n_groups)
        except CalibrationError:
            if strict:
                raise
            return math.inf, [0.0] * n_groups

    def fit_plain(self) -> float:
        """The factor alone, on the components with a spread (``inf`` if none)."""
        spread = self.var > 0
        if not bool(spread.any()):
            return math.inf
        return math.sqrt(float(torch.mean(self.e2[spread] / self.var[spread])))

    def ensemble_share(self, alpha: float, floors: list[float]) -> float:
        """Mean share of the ensemble spread in the variance of the floor model,
        over the components with a spread or an error."""
        keep = (self.var > 0) | (self.e2 > 0)
        b = torch.tensor(floors, dtype=torch.float64) ** 2
        spread = alpha**2 * self.var[keep]
        return float(
            torch.mean(spread / (spread + self.w2[keep] * b[self.groups[keep]]))
        )

    def total_nll(self, alpha: float, floors: list[float]) -> float:
        """Summed Gaussian NLL (without the constant) of the components with a
        spread or an error; ``inf`` where one has an error and no uncertainty."""
        if not math.isfinite(alpha):
            return math.inf
        keep = (self.var > 0) | (self.e2 > 0)
        b = torch.tensor(floors, dtype=torch.float64) ** 2
        v = alpha**2 * self.var[keep] + self.w2[keep] * b[self.groups[keep]]
        if bool((v <= 0).any()):
            return math.inf
        return float(0.5 * torch.sum(torch.log(v) + self.e2[keep] / v))
