"""Building the model a strategy starts from: fresh, or derived from a trained one."""

from collections.abc import Sequence

import torch

from ..backbones import SoapBpnn, StackedBackbone
from ..config import Config, ConfigError
from ..data import Graph, GraphDataset, iterate_batches
from ..laplace import LaplaceFit, feature_covariance, fit_laplace, sample_parameters
from ..model import EnsembleModel
from .distributed import Workers


def build_model(
    config: Config, atomic_types: list[int], num_members: int
) -> EnsembleModel:
    """A fresh model with the architecture of ``config.model``."""
    m = config.model
    backbone = SoapBpnn(
        atomic_types,
        cutoff=m.cutoff,
        cutoff_width=m.cutoff_width,
        max_radial=m.max_radial,
        max_angular=m.max_angular,
        hidden_sizes=list(m.hidden_sizes),
    )
    return EnsembleModel(backbone, num_members=num_members)


def init_data_dependent(model: EnsembleModel, dataset: GraphDataset) -> None:
    """Descriptor standardisation, composition baseline and energy scale."""
    graphs = [dataset[i] for i in range(min(len(dataset), 32))]
    model.backbone.fit_normalization(
        [
            [g.pair_vectors(), g.centers, g.neighbors, model.species_index(g.numbers)]
            for g in graphs
        ]
    )
    n_types = len(model.atomic_types)
    counts = torch.zeros(len(dataset), n_types, dtype=torch.float64)
    energies = torch.zeros(len(dataset), dtype=torch.float64)
    n_atoms = torch.zeros(len(dataset), dtype=torch.float64)
    for i in range(len(dataset)):
        g = dataset[i]
        counts[i] = torch.bincount(model.species_index(g.numbers), minlength=n_types)
        energies[i] = g.energy
        n_atoms[i] = len(g.numbers)
    model.fit_baseline(counts, energies, n_atoms)


def check_compatible(
    model: EnsembleModel, atomic_types: list[int], source: str
) -> None:
    """The data's atomic types must all be known to the model."""
    unknown = sorted(set(atomic_types) - set(model.atomic_types))
    if unknown:
        raise ConfigError(
            f"the training data has atomic types {unknown} that the model in "
            f"'{source}' (`training.init_from`) does not know (it has "
            f"{model.atomic_types})"
        )


def _head_parameters(model: EnsembleModel) -> torch.Tensor:
    """Mean head as one vector ``(w, b)``, float64."""
    head = model.head
    theta = torch.cat([head.weight.mean(dim=0), head.bias.mean().reshape(1)])
    return theta.detach().double()


def _set_heads(model: EnsembleModel, thetas: torch.Tensor) -> None:
    feature_size = model.head.feature_size
    model.head.set_members(thetas[:, :feature_size], thetas[:, feature_size])


@torch.no_grad()
def head_features(
    model: EnsembleModel,
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
    model: EnsembleModel,
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
    model: EnsembleModel, num_members: int, relative_std: float, seed: int
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


def stack_models(models: list[EnsembleModel]) -> EnsembleModel:
    """One :py:class:`EnsembleModel` whose member ``k`` is ``models[k]``.

    The models must share their composition baseline and energy scale (true for
    models trained on the same data, which fit them by least squares).
    """
    first = models[0]
    for other in models[1:]:
        if not (
            torch.allclose(other.head.composition, first.head.composition)
            and torch.allclose(other.head.energy_scale, first.head.energy_scale)
        ):
            raise ValueError("deep-ensemble members have different energy baselines")
    backbone = StackedBackbone([m.backbone for m in models])
    stacked = EnsembleModel(backbone, num_members=len(models)).to(
        first.head.weight.dtype
    )
    block = first.head.feature_size
    weight = torch.zeros(len(models), block * len(models), dtype=torch.float64)
    bias = torch.zeros(len(models), dtype=torch.float64)
    for k, member in enumerate(models):
        weight[k, k * block : (k + 1) * block] = member.head.weight.mean(dim=0)
        bias[k] = member.head.bias.mean()
    stacked.head.set_members(weight, bias)
    with torch.no_grad():
        stacked.head.composition.copy_(first.head.composition)
        stacked.head.energy_scale.copy_(first.head.energy_scale)
    return stacked
