r"""Uncertainty of MD observables from one trajectory, by reweighting per member.

A trajectory sampled with the mean potential :math:`V = \frac{1}{M}\sum_k V_k`
gives, for every ensemble member :math:`k`, the canonical average the dynamics would
have given with :math:`V_k` instead (DPOSE, Kellner & Ceriotti, MLST 2024; Imbalzano
et al., J. Chem. Phys. 154, 074102 (2021)):

.. math::

    \langle a \rangle_k = \frac{\langle a\, w_k \rangle}{\langle w_k \rangle},
    \qquad w_k = e^{-\beta (V_k - V)},

or, to first order in :math:`\Delta V_k = V_k - V` (cumulant expansion),

.. math::

    \langle a \rangle_k \approx \langle a \rangle
    - \beta \left(\langle a\, \Delta V_k \rangle
    - \langle a \rangle \langle \Delta V_k \rangle\right).

The spread of :math:`\langle a \rangle_k` over members is the uncertainty of
:math:`\langle a \rangle` due to the potential. The exact weights degenerate when
:math:`\beta\,\mathrm{std}(\Delta V_k)` is large (big systems, large uncertainties):
check :func:`effective_sample_size`; the cumulant form stays stable but is only
first order.

Relation to i-PI: i-PI ships the script ``i-pi-committee-reweight`` (``ipi`` 3.3.1),
which applies the same two formulas to files written by i-PI (committee potentials in
Hartree, ``--kt`` in Hartree or ``--input input.xml``; cumulant by default, ``--direct``
for the exact weights). Its weights are also taken relative to the committee mean, so
its per-member averages equal :func:`reweight_observable`'s (the i-PI engine test
checks this). Differences: its "Error" column is the population standard deviation
(``ddof=0``), where this module follows the project's convention of the unbiased
(``ddof=1``) spread; and it exponentiates in ``float128`` without a shift, where this
module normalises the weights with a log-sum-exp. Use either; this module works on
arrays in eV (from any engine, or from ASE) and adds the effective sample size.
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from ase.units import kB


__all__ = [
    "ReweightedObservable",
    "cumulant_averages",
    "effective_sample_size",
    "log_weights",
    "reweight_observable",
    "reweighted_averages",
]

ArrayLike = npt.ArrayLike


@dataclass(frozen=True)
class ReweightedObservable:
    """Per-member averages of an observable and their spread.

    :param members: averages for each member, shape ``(n_members, ...)`` (the
        observable's trailing shape), in the observable's unit
    :param mean: average over members of ``members``, shape ``(...)``
    :param std: standard deviation over members (``ddof=1``), shape ``(...)``
    :param effective_sample_size: Kish effective number of frames of each member's
        exact weights, shape ``(n_members,)`` (reported for both methods: a small
        value means the exact average is noisy and the cumulant one is far from
        its first-order regime)
    :param method: ``"exact"`` or ``"cumulant"``
    """

    members: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    effective_sample_size: np.ndarray
    method: str


def _beta(temperature: float) -> float:
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"`temperature` is {temperature} but must be positive (K)")
    return 1.0 / (kB * float(temperature))


def _energy_gaps(
    member_energies: ArrayLike, mean_energy: ArrayLike | None
) -> np.ndarray:
    """``V_k - V`` as a float64 array ``(n_frames, n_members)``, with shape checks."""
    members = np.asarray(member_energies, dtype=np.float64)
    if members.ndim != 2 or members.shape[0] == 0 or members.shape[1] == 0:
        raise ValueError(
            "`member_energies` has shape "
            f"{members.shape} but must be (n_frames, n_members), both non-zero"
        )
    if mean_energy is None:
        mean = members.mean(axis=1)
    else:
        mean = np.asarray(mean_energy, dtype=np.float64)
        if mean.shape != (members.shape[0],):
            raise ValueError(
                f"`mean_energy` has shape {mean.shape} but must be "
                f"({members.shape[0]},), one value per frame"
            )
    gaps = members - mean[:, None]
    if not np.all(np.isfinite(gaps)):
        raise ValueError("`member_energies` or `mean_energy` has non-finite values")
    return gaps


def _observable(observable: ArrayLike, n_frames: int) -> np.ndarray:
    values = np.asarray(observable, dtype=np.float64)
    if values.ndim == 0 or values.shape[0] != n_frames:
        raise ValueError(
            f"`observable` has shape {values.shape} but its first dimension must be "
            f"the number of frames, {n_frames}"
        )
    return values


def log_weights(
    member_energies: ArrayLike,
    temperature: float,
    mean_energy: ArrayLike | None = None,
) -> np.ndarray:
    r"""Normalised log-weights :math:`\log(w_k(t) / \sum_t w_k(t))` of every frame.

    Computed with a log-sum-exp over frames, so no exponential overflows whatever
    :math:`\beta (V_k - V)`.

    :param member_energies: potential energy of each member at each frame, shape
        ``(n_frames, n_members)``, eV
    :param temperature: temperature of the trajectory, K
    :param mean_energy: the potential that drove the dynamics, shape ``(n_frames,)``,
        eV; defaults to the mean of ``member_energies`` over members
    :return: shape ``(n_frames, n_members)``; ``exp`` of each column sums to 1
    """
    gaps = _energy_gaps(member_energies, mean_energy)
    log_w = -_beta(temperature) * gaps
    shift = log_w.max(axis=0, keepdims=True)
    log_norm = shift + np.log(np.exp(log_w - shift).sum(axis=0, keepdims=True))
    return log_w - log_norm


def effective_sample_size(
    member_energies: ArrayLike,
    temperature: float,
    mean_energy: ArrayLike | None = None,
) -> np.ndarray:
    r"""Kish effective sample size :math:`(\sum_t w_k)^2 / \sum_t w_k^2` per member.

    ``n_frames`` when member ``k`` agrees with the sampling potential up to a constant;
    close to 1 when one frame dominates, in which case the exact reweighted average of
    that member is noise (use more frames, or the cumulant approximation).

    :param member_energies: shape ``(n_frames, n_members)``, eV
    :param temperature: K
    :param mean_energy: shape ``(n_frames,)``, eV; defaults to the members' mean
    :return: shape ``(n_members,)``, between 1 and ``n_frames``
    """
    weights = np.exp(log_weights(member_energies, temperature, mean_energy))
    return 1.0 / np.sum(weights**2, axis=0)


def reweighted_averages(
    observable: ArrayLike,
    member_energies: ArrayLike,
    temperature: float,
    mean_energy: ArrayLike | None = None,
) -> np.ndarray:
    r"""Exact reweighted averages :math:`\langle a w_k\rangle / \langle w_k\rangle`.

    :param observable: samples of the observable, shape ``(n_frames, ...)``, any unit
    :param member_energies: shape ``(n_frames, n_members)``, eV
    :param temperature: K
    :param mean_energy: shape ``(n_frames,)``, eV; defaults to the members' mean
    :return: shape ``(n_members, ...)``, unit of the observable
    """
    weights = np.exp(log_weights(member_energies, temperature, mean_energy))
    values = _observable(observable, weights.shape[0])
    return np.tensordot(weights, values, axes=([0], [0]))


def cumulant_averages(
    observable: ArrayLike,
    member_energies: ArrayLike,
    temperature: float,
    mean_energy: ArrayLike | None = None,
) -> np.ndarray:
    r"""First-order cumulant averages :math:`\langle a\rangle - \beta\,
    \mathrm{cov}(a, \Delta V_k)` (covariance over frames, normalised by
    ``n_frames``).

    :param observable: shape ``(n_frames, ...)``, any unit
    :param member_energies: shape ``(n_frames, n_members)``, eV
    :param temperature: K
    :param mean_energy: shape ``(n_frames,)``, eV; defaults to the members' mean
    :return: shape ``(n_members, ...)``, unit of the observable
    """
    gaps = _energy_gaps(member_energies, mean_energy)
    values = _observable(observable, gaps.shape[0])
    n_frames = gaps.shape[0]
    centred_a = values - values.mean(axis=0)
    centred_v = gaps - gaps.mean(axis=0)
    covariance = np.tensordot(centred_v, centred_a, axes=([0], [0])) / n_frames
    return values.mean(axis=0)[None, ...] - _beta(temperature) * covariance


def reweight_observable(
    observable: ArrayLike,
    member_energies: ArrayLike,
    temperature: float,
    mean_energy: ArrayLike | None = None,
    method: Literal["exact", "cumulant"] = "exact",
) -> ReweightedObservable:
    """Per-member averages of ``observable``, their mean and spread over members.

    :param observable: samples along the trajectory, shape ``(n_frames, ...)``
        (e.g. ``(n_frames,)`` for a scalar, ``(n_frames, n_bins)`` for a histogram),
        any unit; torch tensors on the CPU are accepted
    :param member_energies: potential energy of each member at each frame, shape
        ``(n_frames, n_members)``, eV (i-PI writes Hartree: convert first)
    :param temperature: temperature of the trajectory, K
    :param mean_energy: the potential that drove the dynamics, shape ``(n_frames,)``,
        eV; defaults to the members' mean (what i-PI and the exported model use)
    :param method: ``"exact"`` (reweighting with log-sum-exp weights) or
        ``"cumulant"`` (first-order expansion, stable for large systems)
    :return: the per-member averages with their mean, std (``ddof=1``) and the
        effective sample size of each member's weights
    """
    if method == "exact":
        members = reweighted_averages(
            observable, member_energies, temperature, mean_energy
        )
    elif method == "cumulant":
        members = cumulant_averages(
            observable, member_energies, temperature, mean_energy
        )
    else:
        raise ValueError(f"`method` is '{method}' but must be 'exact' or 'cumulant'")
    n_members = members.shape[0]
    std = members.std(axis=0, ddof=1) if n_members > 1 else np.zeros_like(members[0])
    return ReweightedObservable(
        members=members,
        mean=members.mean(axis=0),
        std=std,
        effective_sample_size=effective_sample_size(
            member_energies, temperature, mean_energy
        ),
        method=method,
    )
