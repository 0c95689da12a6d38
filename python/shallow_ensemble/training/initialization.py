"""Building the model a strategy starts from: fresh, or derived from a trained one.

Everything here goes through the model contract
(:py:class:`~shallow_ensemble.kinds.ModelKind`): it works for every model kind.
"""

from collections.abc import Sequence

import torch

from ..config import Config
from ..data import Graph, GraphDataset, check_atomic_types, iterate_batches
from ..kinds import ModelKind, get_kind
from ..laplace import LaplaceFit, feature_covariance, fit_laplace, sample_parameters
from ..model import StackedEnsemble
from .distributed import Workers


def build_model(config: Config, atomic_types: list[int], num_members: int) -> ModelKind:
    """A fresh model of the kind ``config.model.kind``, with its architecture."""
    kind = get_kind(config.model.kind)
    return kind.from_config(config.model, atomic_types, num_members)


def init_data_dependent(model: ModelKind, dataset: GraphDataset) -> None:
    """The fresh model's data-dependent initialisation (for the built-in kinds:
    descriptor standardisation, composition baseline and energy scale)."""
    model.init_from_data(dataset)


def check_compatible(model: ModelKind, atomic_types: list[int], source: str) -> None:
    """The data's atomic types must all be known to the model (the package's one
    check, :py:func:`~shallow_ensemble.data.check_atomic_types`)."""
    check_atomic_types(
        atomic_types,
        model.atomic_types,
        model=f"the model in '{source}' (`training.init_from`)",
        where="the training data",
    )


def _head_parameters(model: ModelKind) -> torch.Tensor:
    """Mean head as one vector ``(w, b)``, float64."""
    head = model.head
    theta = torch.cat([head.weight.mean(dim=0), head.bias.mean().reshape(1)])
    return theta.detach().double()


def _set_heads(model: ModelKind, thetas: torch.Tensor) -> None:
    feature_size = model.head.feature_size
    model.head.set_members(thetas[:, :feature_size], thetas[:, feature_size])


@torch.no_grad()
def head_features(
    model: ModelKind,
    dataset: Sequence[Graph] | GraphDataset,
    per_atom: bool,
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features in which the heads are linear, and the MAP errors per structure.

    Energies are :math:`E = \\sum_i s (w \\cdot f_i + b) + \\text{baseline}`, linear in
    :math:`\\theta = (w, b)` with features :math:`\\phi_i = s (f_i, 1)`.

    :return: covariance rows (per-atom ``phi_i``, or per-structure averages),
        per-structure summed features ``(n, F + 1)`` and errors
        ``E_ref - E_MAP`` ``(n,)``
    """
    parameter = next(model.parameters())
    theta = _head_parameters(model)
    rows, summed, errors = [], [], []
    for batch in iterate_batches(dataset, batch_size, shuffle=False):
        batch = batch.to(device=parameter.device, dtype=parameter.dtype)
        phi, offsets = model.head_design(batch)
        phi_sum = torch.zeros(
            (batch.n_systems, phi.shape[1]), dtype=phi.dtype, device=phi.device
        ).index_add(0, batch.system_index, phi)
        baseline = torch.zeros(batch.n_systems, dtype=phi.dtype, device=phi.device)
        baseline = baseline.index_add(0, batch.system_index, offsets)
        predicted = phi_sum @ theta.to(phi.device) + baseline
        assert batch.energy is not None, "training data have energies"
        errors.append((batch.energy.double() - predicted).cpu())
        summed.append(phi_sum.cpu())
        if per_atom:
            rows.append(phi.cpu())
        else:
            rows.append((phi_sum / batch.n_atoms.unsqueeze(1)).cpu())
    return torch.cat(rows), torch.cat(summed), torch.cat(errors)


def laplace_heads(
    model: ModelKind,
    train_set: GraphDataset,
    valid_set: GraphDataset,
    num_members: int,
    regularizer: str | float,
    per_atom: bool,
    seed: int,
    workers: Workers | None = None,
) -> LaplaceFit:
    """Replace the heads by ``num_members`` samples of the last-layer posterior.

    The regulariser and ``alpha`` are chosen on the validation energies; the samples
    are recentred on the trained (mean) head, so the mean prediction is unchanged.
    With several training processes (``workers``), each accumulates the feature
    covariance of its share of the training set and the shares are summed.
    """
    workers = workers or Workers()
    shard = workers.shard([train_set[i] for i in range(len(train_set))])
    rows, _, _ = head_features(model, shard, per_atom)
    covariance = workers.all_reduce(feature_covariance(rows))
    _, valid_summed, valid_errors = head_features(model, valid_set, per_atom)
    fit = fit_laplace(covariance, valid_summed, valid_errors, regularizer)
    generator = torch.Generator().manual_seed(seed)
    thetas = sample_parameters(
        _head_parameters(model),
        covariance,
        fit.regularizer,
        fit.alpha,
        num_members,
        generator,
    )
    _set_heads(model, thetas)
    return fit


def random_heads(
    model: ModelKind, num_members: int, relative_std: float, seed: int
) -> None:
    """Heads drawn isotropically around the trained head, recentred on it."""
    theta = _head_parameters(model)
    scale = relative_std * float(theta[:-1].pow(2).mean().sqrt())
    generator = torch.Generator().manual_seed(seed)
    delta = scale * torch.randn(
        (num_members, theta.shape[0]), dtype=torch.float64, generator=generator
    )
    delta = delta - delta.mean(dim=0, keepdim=True)
    _set_heads(model, theta.unsqueeze(0) + delta)


def stack_models(models: Sequence[ModelKind]) -> StackedEnsemble:
    """One model (kind ``stacked``) whose member ``k`` is ``models[k]``.

    The models must share their composition baseline and energy scale (true for
    models trained on the same data, which fit them by least squares).
    """
    return StackedEnsemble.from_members(models)
