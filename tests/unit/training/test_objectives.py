"""What the strategies optimise: loss terms and their weights, gradients through the
member forces, learning rates (per group and over epochs) and the configured
probabilistic losses in real (short) trainings."""

import copy
import csv
import dataclasses
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import tiny_config, write_ethanol_split
from shallow_ensemble import losses
from shallow_ensemble.data import GraphDataset, collate, read_structures
from shallow_ensemble.training import get_strategy, load_model, save_checkpoint, train
from shallow_ensemble.training.initialization import (
    build_model,
    init_data_dependent,
    random_heads,
)
from shallow_ensemble.training.loop import _lr_factor
from shallow_ensemble.training.stages import loss_term


TYPES = [1, 6, 8]
LR = 3e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_ethanol_split(tmp_path_factory.mktemp("data"), 12, (100, 104))


@pytest.fixture(scope="module")
def train_set(data):
    return GraphDataset(read_structures(data / "train.xyz"), 3.5)


@pytest.fixture(scope="module")
def valid_set(data):
    return GraphDataset(read_structures(data / "valid.xyz"), 3.5)


@pytest.fixture(scope="module")
def start_model(data, train_set):
    """A fresh float64 model of the tiny architecture, normalised on the data."""
    torch.manual_seed(0)
    model = build_model(tiny_config(data), TYPES, 4)
    init_data_dependent(model, train_set)
    return model.to(torch.float64)


@pytest.fixture(scope="module")
def batch(train_set):
    return collate([train_set[i] for i in range(4)]).to(dtype=torch.float64)


def config(data, **training):
    return tiny_config(data, **training).training


def backbone_parameters(model):
    return [p for name, p in model.named_parameters() if name.startswith("backbone.")]


def read_log(path):
    with open(path / "log.csv") as fd:
        return list(csv.DictReader(fd))


# --------------------------------------------------- 1. force NLL trains the backbone
def reference_force_nll(model, batch, var_floor=losses.DEFAULT_VARIANCE_FLOOR):
    """Per-component force NLL written out, with member forces from plain autograd
    (double backward through each member's energy)."""
    positions = batch.positions.clone().requires_grad_(True)
    vectors = positions[batch.neighbors] - positions[batch.centers] + batch.cell_shifts
    species = model.species_index(batch.numbers)
    atomic = model(vectors, batch.centers, batch.neighbors, species)
    member_forces = torch.stack(
        [
            -torch.autograd.grad(atomic[:, k].sum(), positions, create_graph=True)[0]
            for k in range(atomic.shape[1])
        ]
    )
    n_members = member_forces.shape[0]
    mean = member_forces.sum(dim=0) / n_members
    var = ((member_forces - mean) ** 2).sum(dim=0) / (n_members - 1)
    var = torch.clamp(var, min=var_floor)
    nll = 0.5 * (torch.log(var) + (batch.forces - mean) ** 2 / var)
    return nll.mean()


def test_force_only_nll_backpropagates_into_the_backbone(data, start_model, batch):
    model = copy.deepcopy(start_model)
    strategy = get_strategy(
        config(data, strategy="energy_force_nll", energy_weight=0.0, warmup_epochs=1)
    )
    assert not strategy.in_warmup(1)
    result = strategy.loss(model, batch, 1)
    result.total.backward()
    backbone = backbone_parameters(model)
    grads = [p.grad.detach().clone() for p in backbone]
    assert all(bool((g != 0).any()) for g in grads)

    reference_model = copy.deepcopy(start_model)
    reference = reference_force_nll(reference_model, batch)
    torch.testing.assert_close(result.total.detach(), reference.detach())
    expected = torch.autograd.grad(reference, backbone_parameters(reference_model))
    # the losses of an untrained model are large (squared z up to ~1e5) and so are
    # the gradients (~1e4): float64 rounding, amplified by that conditioning, leaves
    # ~1e-16 * 1e5 relative differences between the two routes; allow 1e-11
    for got, want in zip(grads, expected, strict=True):
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11 * scale)


def adam_first_step(parameter, grad, lr, eps=1e-8):
    """The first Adam step (bias-corrected moments are g and g^2)."""
    return parameter - lr * grad / (grad.abs() + eps)


def test_one_step_of_a_force_only_loss_moves_the_backbone(data, start_model, batch):
    model = copy.deepcopy(start_model)
    strategy = get_strategy(
        config(
            data,
            strategy="energy_force_nll",
            energy_weight=0.0,
            warmup_epochs=0,
            learning_rate=1e-3,
            heads_learning_rate=2e-5,
        )
    )
    groups = strategy.param_groups(model)
    assert [g["lr"] for g in groups] == [1e-3, 2e-5]
    optimizer = torch.optim.Adam(groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy.loss(model, batch, 0).total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name, parameter in model.named_parameters():
        lr = 2e-5 if name.startswith("head.") else 1e-3
        expected = adam_first_step(before[name], grads[name], lr)
        torch.testing.assert_close(parameter.detach(), expected, rtol=0, atol=1e-14)
        if name.startswith("backbone."):
            assert bool((parameter.detach() != before[name]).any()), name


# ---------------------------------------------------- 7. energy and forces weights
def independent_terms(model, batch, strategy_name, warmup):
    """The unweighted energy and forces terms, from the loss functions directly."""
    with torch.enable_grad():
        if warmup or strategy_name == "mse":
            prediction = model.predict(batch, forces="mean", create_graph=True)
            energy = losses.mse(
                prediction.energies.mean(dim=1) / batch.n_atoms,
                batch.energy / batch.n_atoms,
            )
            forces = losses.mse(prediction.forces.mean(dim=0), batch.forces)
        elif strategy_name == "energy_nll":
            prediction = model.predict(batch, forces="mean", create_graph=True)
            energy = losses.energy_nll(prediction.energies, batch.energy, batch.n_atoms)
            forces = losses.mse(prediction.forces[0], batch.forces)
        else:
            prediction = model.predict(batch, forces="members", create_graph=True)
            energy = losses.energy_nll(prediction.energies, batch.energy, batch.n_atoms)
            forces = losses.force_nll(prediction.forces, batch.forces)
    return energy.detach(), forces.detach()


@pytest.mark.parametrize("strategy_name", ["mse", "energy_nll", "energy_force_nll"])
@pytest.mark.parametrize("epoch", [0, 1])
def test_loss_is_the_weighted_sum_of_its_terms(
    data, start_model, batch, strategy_name, epoch
):
    model = copy.deepcopy(start_model)

    def total(energy_weight, forces_weight):
        strategy = get_strategy(
            config(
                data,
                strategy=strategy_name,
                warmup_epochs=1,
                energy_weight=energy_weight,
                forces_weight=forces_weight,
            )
        )
        return strategy.loss(model, batch, epoch).total.detach(), strategy

    energy_only, strategy = total(1.0, 0.0)
    forces_only, _ = total(0.0, 1.0)
    energy, forces = independent_terms(
        model, batch, strategy_name, strategy.in_warmup(epoch)
    )
    assert strategy.in_warmup(epoch) == (strategy_name != "mse" and epoch == 0)
    torch.testing.assert_close(energy_only, energy, rtol=1e-12, atol=0)
    torch.testing.assert_close(forces_only, forces, rtol=1e-12, atol=0)
    assert float(energy) != pytest.approx(float(forces), rel=1e-3)
    mixed, _ = total(0.3, 2.5)
    torch.testing.assert_close(mixed, 0.3 * energy + 2.5 * forces, rtol=1e-12, atol=0)


# --------------------------------------------------------- 7. heads learning rate
def test_param_groups_give_heads_their_own_learning_rate(data, start_model):
    model = copy.deepcopy(start_model)
    strategy = get_strategy(
        config(data, strategy="energy_force_nll", heads_learning_rate=7e-4)
    )
    backbone_group, heads_group = strategy.param_groups(model)
    assert backbone_group["lr"] == LR
    assert heads_group["lr"] == 7e-4
    assert {id(p) for p in heads_group["params"]} == {
        id(model.head.weight),
        id(model.head.bias),
    }
    assert {id(p) for p in backbone_group["params"]} == {
        id(p) for p in backbone_parameters(model)
    }
    # without the option, the heads follow `learning_rate`
    default = get_strategy(config(data, strategy="energy_force_nll"))
    assert [g["lr"] for g in default.param_groups(model)] == [LR, LR]


def test_heads_learning_rate_zero_leaves_the_heads_unchanged(data, start_model, batch):
    model = copy.deepcopy(start_model)
    strategy = get_strategy(
        config(
            data, strategy="energy_force_nll", warmup_epochs=0, heads_learning_rate=0.0
        )
    )
    optimizer = torch.optim.Adam(strategy.param_groups(model))
    head = copy.deepcopy(model.head.state_dict())
    backbone = [p.detach().clone() for p in backbone_parameters(model)]
    strategy.loss(model, batch, 0).total.backward()
    optimizer.step()
    assert not all(
        torch.equal(a, b.detach())
        for a, b in zip(backbone, backbone_parameters(model), strict=True)
    )
    for key, value in head.items():
        torch.testing.assert_close(model.head.state_dict()[key], value, rtol=0, atol=0)


# ------------------------------------------------------------- 7. random_heads_std
def test_random_heads_spread_is_proportional_to_random_heads_std(
    data, start_model, tmp_path
):
    checkpoint = tmp_path / "start.ckpt"
    save_checkpoint(checkpoint, start_model)
    heads = {}
    for std in (0.2, 0.8):
        result = train(
            tiny_config(
                data,
                strategy="random_heads",
                init_from=str(checkpoint),
                random_heads_std=std,
            ),
            tmp_path / f"std-{std}",
            progress=False,
        )
        model = load_model(result.checkpoint)
        heads[std] = torch.cat(
            [model.head.weight.detach(), model.head.bias.detach().unsqueeze(1)], dim=1
        )
    start = start_model.head
    theta = torch.cat([start.weight.detach().mean(0), start.bias.detach().mean()[None]])
    for values in heads.values():
        # the mean head is the trained one
        torch.testing.assert_close(values.mean(dim=0), theta, rtol=0, atol=1e-13)
    # same seed: the deviations are the same draws, scaled by the std
    torch.testing.assert_close(
        heads[0.8] - theta, 4.0 * (heads[0.2] - theta), rtol=1e-10, atol=1e-14
    )
    spread = {std: float((v - theta).std(dim=0).mean()) for std, v in heads.items()}
    assert spread[0.8] / spread[0.2] == pytest.approx(4.0, rel=1e-10)


def test_random_heads_spread_is_the_std_times_the_rms_weight(start_model):
    model = copy.deepcopy(start_model)
    weight = model.head.weight.detach().mean(dim=0)
    rms = float(weight.pow(2).mean().sqrt())
    n_members = 4000
    random_heads(model, n_members, 0.3, seed=5)
    thetas = torch.cat(
        [model.head.weight.detach(), model.head.bias.detach()[:, None]], 1
    )
    # unbiased variance of recentred draws is scale^2; pooled over the 9 columns of
    # 4000 draws its relative standard error is sqrt(2 / (9 * 3999)) = 0.75%, so
    # the std is good to 0.4%; 2% is 5 standard errors
    variance = thetas.var(dim=0).mean()
    assert float(variance.sqrt()) == pytest.approx(0.3 * rms, rel=0.02)


# ---------------------------------------------------------- 5. learning rate schedule
def test_lr_factor_closed_form():
    epochs = 12
    expected = {
        0: 1.0,
        3: 0.01 + 0.495 * (1 + math.sqrt(0.5)),
        4: 0.01 + 0.495 * 1.5,
        6: 0.505,
        8: 0.01 + 0.495 * 0.5,
        12: 0.01,
    }
    for epoch, value in expected.items():
        assert _lr_factor("cosine", epoch, epochs) == pytest.approx(value, rel=1e-14)
        assert _lr_factor("constant", epoch, epochs) == 1.0
    # monotone decay from 1 to 0.01
    values = [_lr_factor("cosine", e, epochs) for e in range(epochs + 1)]
    assert all(a > b for a, b in zip(values[:-1], values[1:], strict=True))


def used_learning_rates(config, outdir):
    """Train, recording the learning rate of each parameter group at every step."""
    used = []

    def hook(optimizer, args, kwargs):
        used.append([group["lr"] for group in optimizer.param_groups])

    handle = register_optimizer_step_pre_hook(hook)
    try:
        train(config, outdir, progress=False)
    finally:
        handle.remove()
    return used


@pytest.fixture(scope="module")
def cosine_run(data, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("cosine")
    run = tiny_config(
        data, strategy="mse", epochs=3, learning_rate=LR, heads_learning_rate=LR / 7
    )
    return used_learning_rates(run, outdir), read_log(outdir)


def test_cosine_schedule_rates_used_in_training(cosine_run):
    used, _ = cosine_run
    # 12 structures in batches of 6: two steps per epoch
    factors = [1.0, 0.01 + 0.495 * 1.5, 0.01 + 0.495 * 0.5]
    expected = [[LR * f, LR / 7 * f] for f in factors for _ in range(2)]
    assert len(used) == len(expected)
    for got, want in zip(used, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-12)


def test_logged_lr_is_the_rate_of_that_epoch(cosine_run):
    used, rows = cosine_run
    assert [float(r["lr"]) for r in rows] == pytest.approx(
        [used[0][0], used[2][0], used[4][0]], rel=1e-12
    )


def test_constant_schedule_rates_used_in_training(data, tmp_path):
    run = tiny_config(
        data, strategy="mse", epochs=2, lr_schedule="constant", heads_learning_rate=1e-4
    )
    used = used_learning_rates(run, tmp_path)
    assert used == [[LR, 1e-4]] * 4
    assert [float(r["lr"]) for r in read_log(tmp_path)] == [LR, LR]


# ------------------------------------ 8. the configured probabilistic losses, trained
SHORT_NAMES = {
    "gaussian_nll_ensemble": "nll",
    "gaussian_nll_full_ensemble": "nll_full",
    "gaussian_crps_ensemble": "crps",
}


def test_every_loss_has_a_short_name_in_the_log():
    assert set(SHORT_NAMES) == {*losses.ENERGY_LOSS_NAMES, *losses.FORCE_LOSS_NAMES}
    for name, short in SHORT_NAMES.items():
        assert loss_term(name) == short


@pytest.mark.parametrize(
    ("energy_loss", "forces_loss"),
    [
        ("gaussian_crps_ensemble", "gaussian_crps_ensemble"),
        ("gaussian_nll_ensemble", "gaussian_nll_full_ensemble"),
        ("gaussian_crps_ensemble", "gaussian_nll_full_ensemble"),
    ],
)
def test_configured_losses_are_the_ones_trained(
    data, valid_set, tmp_path, energy_loss, forces_loss
):
    run = tiny_config(
        data,
        strategy="energy_force_nll",
        epochs=2,
        warmup_epochs=1,
        energy_loss=energy_loss,
        forces_loss=forces_loss,
        energy_weight=0.7,
        forces_weight=1.9,
    )
    states = {}

    def snapshot(epoch):
        states[epoch] = load_model(tmp_path / "last.ckpt").state_dict()

    result = train(run, tmp_path, progress=False, on_epoch_end=snapshot)
    assert result.checkpoint.exists()
    rows = read_log(tmp_path)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    warmup, after = rows

    # the logged parts switch from the warm-up MSE to the probabilistic terms
    def logged(row):
        return {k for k, v in row.items() if k.startswith("valid_") and v != ""}

    # named by the loss used: gaussian_crps_ensemble -> crps, ...
    energy_column = "valid_energy_" + SHORT_NAMES[energy_loss]
    forces_column = "valid_forces_" + SHORT_NAMES[forces_loss]
    parts = {"valid_energy_mse", "valid_forces_mse"}
    assert logged(warmup) == parts | {"valid_loss"}
    # and the mean squared z-scores of the Gaussian NLL terms (selection_score)
    z2 = {"valid_energy_z2"} if energy_loss == "gaussian_nll_ensemble" else set()
    if forces_loss == "gaussian_nll_ensemble":
        z2.add("valid_forces_z2")
    assert logged(after) == {energy_column, forces_column, "valid_loss"} | z2
    for row in rows:
        assert math.isfinite(float(row["valid_loss"]))
        assert math.isfinite(float(row["train_loss"]))

    # the epoch after the warm-up trained the backbone and the heads
    changed = {k for k in states[0] if not torch.equal(states[0][k], states[1][k])}
    assert {"head.weight", "head.bias"} <= changed
    assert any(k.startswith("backbone.mlps") for k in changed)

    # the logged validation terms are the configured losses of the final model
    # (the 4 validation structures fit in one batch)
    model = load_model(tmp_path / "last.ckpt").eval()
    batch = collate([valid_set[i] for i in range(len(valid_set))]).to(
        dtype=torch.float64
    )
    prediction = model.predict(batch, forces="members")
    energies, forces = prediction.energies.detach(), prediction.forces.detach()
    energy_terms = {
        name: float(fn(energies, batch.energy, batch.n_atoms))
        for name, fn in losses.ENERGY_LOSSES.items()
    }
    force_terms = {
        name: float(fn(forces, batch.forces))
        for name, fn in losses.FORCE_LOSSES.items()
    }
    logged_energy = float(after[energy_column])
    logged_forces = float(after[forces_column])
    assert logged_energy == pytest.approx(energy_terms[energy_loss], rel=1e-10)
    assert logged_forces == pytest.approx(force_terms[forces_loss], rel=1e-10)
    for name, value in energy_terms.items():
        if name != energy_loss:
            assert value != pytest.approx(logged_energy, rel=1e-3)
    for name, value in force_terms.items():
        if name != forces_loss:
            assert value != pytest.approx(logged_forces, rel=1e-3)
    assert float(after["valid_loss"]) == pytest.approx(
        0.7 * logged_energy + 1.9 * logged_forces, rel=1e-12
    )


# -------------------------------- best epoch: the validation NLL after calibration
def stretched(model, factor):
    """The model with its heads stretched around their mean by ``factor``: every
    member energy (and force) deviation from the mean times ``factor``."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in (model.head.weight, model.head.bias):
            mean = p.mean(dim=0, keepdim=True)
            p.copy_(mean + factor * (p - mean))
    return model


@pytest.mark.parametrize("objective", ["energy_nll", "energy_force_nll"])
def test_the_selection_score_ignores_what_the_calibration_fixes(
    data, start_model, batch, objective
):
    from shallow_ensemble.training.stages import Objective, Stage

    stage = Stage("s", "fresh", objective=objective, num_members=4, epochs=2)
    training = config(data, energy_weight=0.3, forces_weight=2.0)
    chosen = Objective(stage, training)
    model = stretched(start_model, 5.0)  # members far apart: heads of one init
    scores, totals = [], []
    for factor in (1.0, 0.5, 3.0):
        result = chosen.loss(stretched(model, factor), batch, 0, z2=True)
        parts = {k: float(v) for k, v in result.parts.items()}
        total = float(result.total.detach())
        scores.append(chosen.selection_score(total, parts, 0))
        totals.append(total)
        # the z-scores are those of the loss's own NLL terms, written out
        energies = stretched(model, factor).predict(batch, forces="mean").energies
        e_mean, e_var = losses.ensemble_mean_var(energies.detach(), dim=1)
        n = batch.n_atoms.double()
        expected = torch.mean((batch.energy / n - e_mean / n) ** 2 / (e_var / n**2))
        assert parts["energy_z2"] == pytest.approx(float(expected), rel=1e-10)
        assert ("forces_z2" in parts) == (objective == "energy_force_nll")
    # stretching every member deviation changes the loss, not its calibrated value
    assert max(totals) - min(totals) > 0.1
    assert scores == pytest.approx([scores[0]] * 3, rel=1e-9, abs=1e-9)
    # at z^2 = 1 the score is the loss; otherwise lower by 0.5 (z^2 - 1 - log z^2)
    assert chosen.selection_score(2.0, {"energy_z2": 1.0}, 0) == 2.0
    assert chosen.selection_score(2.0, {"energy_z2": 4.0}, 0) == pytest.approx(
        2.0 - 0.3 * 0.5 * (4.0 - 1.0 - math.log(4.0))
    )
    # the loss itself with select_epoch: loss, and in the MSE warm-up
    plain = Objective(stage, config(data, select_epoch="loss"))
    assert plain.selection_score(2.0, {"energy_z2": 4.0}, 0) == 2.0
    warm = Objective(dataclasses.replace(stage, warmup_epochs=1), training)
    assert warm.selection_score(2.0, {"energy_z2": 4.0}, 0) == 2.0
