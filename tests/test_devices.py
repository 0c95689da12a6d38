"""The same numbers on every device: a training step (loss and gradients, with the
batched member forces and the force NLL), predictions and member forces, a short
training run with ``training.device``, and an exported model through ASE's
``MetatomicCalculator(device=...)``.

Each test is parametrised over ``DEVICES`` (tests/conftest.py): it runs on the CPU
everywhere, with the device given explicitly, and on CUDA where torch sees a GPU
(marker ``cuda``; that variant skips without a GPU, also in CI). The reference is
always the float64 model on the CPU, so the CPU variants check the float32 route and
the explicit device handling, and the CUDA variants check the GPU against it.
``benchmarks/device_check.sh`` runs them on a GPU machine.
"""

import csv

import ase.io
import numpy as np
import pytest
import torch
from metatomic.torch import ModelOutput
from metatomic_ase import MetatomicCalculator

from conftest import DEVICES, SILICON, export_calibrated_model, tiny_config
from shallow_ensemble.config import TrainingConfig
from shallow_ensemble.data import GraphDataset, collate, read_structures
from shallow_ensemble.training import get_strategy, train
from shallow_ensemble.training.checkpoints import read_checkpoint
from shallow_ensemble.training.initialization import build_model, init_data_dependent


#: relative tolerances against the float64 CPU reference (of the largest value)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-3}
OBJECTIVES = ["mse", "energy_nll", "energy_force_nll"]


def assert_close(actual, expected, rtol, what=""):
    actual = torch.as_tensor(actual).detach().cpu().to(torch.float64)
    expected = torch.as_tensor(expected).detach().cpu().to(torch.float64)
    assert actual.shape == expected.shape, what
    scale = max(float(expected.abs().max()), 1e-300)
    error = float((actual - expected).abs().max())
    assert error <= rtol * scale, (
        f"{what}: max |diff| {error:.3e} > {rtol:.0e} x {scale:.3e}"
    )


@pytest.fixture(scope="module")
def silicon():
    """Four silicon structures (periodic, 8 to 64 atoms) and their batch."""
    structures = read_structures(SILICON)[:4]
    dataset = GraphDataset(structures, 3.5)
    return dataset, collate([dataset[i] for i in range(len(dataset))])


def _strategy_and_model(objective, dataset):
    strategy = get_strategy(TrainingConfig(strategy=objective, warmup_epochs=0))
    from shallow_ensemble.config import Config, DataConfig

    config = Config(data=DataConfig(train="", valid=""))
    torch.manual_seed(0)
    model = build_model(config, [14], strategy.num_members(4))
    model.backbone.member_chunk = 2  # the chunked member route too
    init_data_dependent(model, dataset)
    return strategy, model.to(torch.float64)


def _loss_and_gradients(strategy, model, batch, device, dtype):
    model = model.to(device=device, dtype=dtype)
    model.zero_grad(set_to_none=True)
    result = strategy.loss(model, batch.to(device=device, dtype=dtype), epoch=10)
    result.total.backward()
    grads = {
        name: p.grad.detach().cpu().to(torch.float64)
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    parts = {k: float(v) for k, v in result.parts.items()}
    return float(result.total.detach()), grads, parts


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("device", DEVICES)
def test_training_step_matches_the_cpu(silicon, device, dtype, objective):
    """Loss, its logged parts (tensors on the device) and every parameter's
    gradient of one training step: ``mse``, ``energy_nll`` and ``energy_force_nll``
    (member forces in chunks, and their parameter gradients)."""
    dataset, batch = silicon
    strategy, model = _strategy_and_model(objective, dataset)
    reference = _loss_and_gradients(
        strategy, model, batch, torch.device("cpu"), torch.float64
    )
    strategy, model = _strategy_and_model(objective, dataset)
    loss, grads, parts = _loss_and_gradients(strategy, model, batch, device, dtype)
    rtol = TOLERANCE[dtype]
    assert_close(loss, reference[0], rtol, "loss")
    assert parts.keys() == reference[2].keys()
    for key, value in parts.items():
        assert_close(value, reference[2][key], rtol, key)
    assert grads.keys() == reference[1].keys() and len(grads) > 4
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert_close(grad, reference[1][name], 10 * rtol, name)


@pytest.mark.parametrize("device", DEVICES)
def test_predictions_and_member_forces_match_the_cpu(silicon, device):
    """Member energies, mean forces and the batched member forces (float64)."""
    dataset, batch = silicon
    _, model = _strategy_and_model("energy_force_nll", dataset)
    expected = model.predict(batch, forces="members")
    mean = model.predict(batch, forces="mean")
    model = model.to(device)
    on_device = batch.to(device=device)
    members = model.predict(on_device, forces="members")
    assert members.forces is not None and members.forces.device.type == device
    assert_close(members.energies, expected.energies, 1e-10, "energies")
    assert_close(members.forces, expected.forces, 1e-9, "member forces")
    mean_device = model.predict(on_device, forces="mean")
    assert_close(mean_device.forces, mean.forces, 1e-9, "mean forces")
    # the mean of the member forces is the force of the mean energy
    assert_close(members.forces.mean(dim=0), mean.forces[0], 1e-9, "members vs mean")


@pytest.mark.parametrize("device", DEVICES)
def test_training_on_the_device_matches_the_cpu(tmp_path, device):
    """``training.device`` given explicitly: two epochs (MSE warm-up, then the
    joint energy + force NLL) log the losses of the same run on the CPU, and the
    checkpoints hold CPU tensors."""
    ase.io.write(tmp_path / "train.xyz", ase.io.read(SILICON, ":8"))
    ase.io.write(tmp_path / "valid.xyz", ase.io.read(SILICON, "8:11"))
    logs = {}
    for where in dict.fromkeys(["cpu", device]):  # the CPU variant trains once
        config = tiny_config(
            tmp_path,
            strategy="energy_force_nll",
            device=where,
            batch_size=3,
            learning_rate=1e-3,
        )
        result = train(config, tmp_path / f"run-{where}", progress=False)
        assert next(result.model.parameters()).device.type == where
        with open(tmp_path / f"run-{where}" / "log.csv") as fd:
            logs[where] = list(csv.DictReader(fd))
        state = read_checkpoint(tmp_path / f"run-{where}" / "model.ckpt")
        assert all(t.device.type == "cpu" for t in state["state_dict"].values())
    assert len(logs["cpu"]) == 2
    assert {"valid_energy_nll", "valid_forces_nll"} <= logs[device][1].keys()
    for key in ("train_loss", "valid_loss", "valid_energy_mse", "valid_forces_nll"):
        values = [float(row[key]) for row in logs[device] if row.get(key)]
        expected = [float(row[key]) for row in logs["cpu"] if row.get(key)]
        assert len(values) == 1 + key.endswith("_loss"), key
        assert np.all(np.isfinite(values)), key
        np.testing.assert_allclose(values, expected, rtol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_calibrated_model(tmp_path_factory.mktemp("exported"), [14], seed=3)


@pytest.mark.parametrize("device", DEVICES)
def test_exported_model_through_ase_matches_the_cpu(exported, device):
    """``MetatomicCalculator(device=...)``: energy, forces, stress and the
    per-atom and whole-system uncertainties of the exported float64 model."""
    atoms = ase.io.read(SILICON, 3)
    results = {}
    for where in ("cpu", device):
        calculator = MetatomicCalculator(
            str(exported),
            device=where,
            check_consistency=True,
            uncertainty_threshold=None,
        )
        copy = atoms.copy()
        copy.calc = calculator
        values = {
            "energy": copy.get_potential_energy(),
            "forces": copy.get_forces(),
            "stress": copy.get_stress(),
        }
        for kind in ("system", "atom"):
            request = {"energy_uncertainty": ModelOutput(unit="eV", sample_kind=kind)}
            block = calculator.run_model(copy, request)["energy_uncertainty"].block()
            assert block.values.device.type == where
            values[f"uncertainty_{kind}"] = block.values.detach().cpu()
        results[where] = values
    assert results[device]["energy"] != 0.0
    for key, value in results[device].items():
        assert_close(value, results["cpu"][key], 1e-10, key)
