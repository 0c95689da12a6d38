"""The paper's strategies end to end on a tiny dataset, and what each one claims."""

import dataclasses
import json

import ase.io
import pytest
import torch

from conftest import ETHANOL, write_ethanol_split
from conftest import tiny_config as make_config
from shallow_ensemble.calibration.predictions import predict_dataset
from shallow_ensemble.data import GraphDataset, read_structures
from shallow_ensemble.export import to_atomistic_model
from shallow_ensemble.export.predict import run_model
from shallow_ensemble.training import load_model, run_protocol, train


#: buffers that the calibration sets after every stage
CALIBRATION = ("alpha_", "sigma0_", "floor_scale_")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_ethanol_split(tmp_path_factory.mktemp("data"), 24, (100, 110))


@pytest.fixture(scope="module")
def mse_checkpoint(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mse")
    return train(
        make_config(data, strategy="mse", epochs=3), out, progress=False
    ).checkpoint


@pytest.fixture(scope="module")
def valid_set(data):
    return GraphDataset(read_structures(data / "valid.xyz"), 3.5)


def mean_energies(model, dataset):
    return predict_dataset(model, dataset, forces=False).energies.mean(dim=1)


def check_exports(model):
    frames = ase.io.read(ETHANOL, "100:102")
    outputs = {
        "energy": "system",
        "energy_ensemble": "atom",
        "energy_uncertainty": "atom",
    }
    results, _ = run_model(to_atomistic_model(model), frames, outputs)
    assert results["energy_ensemble"].block().values.shape[1] == model.num_members


@pytest.mark.parametrize("strategy", ["laplace", "random_heads"])
def test_post_hoc_ensembles_keep_the_trained_mean(
    data, mse_checkpoint, valid_set, tmp_path, strategy
):
    config = make_config(data, strategy=strategy, init_from=str(mse_checkpoint))
    # the checkpoint's cutoff (3.5) wins over the config's for the neighbour lists
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, cutoff=2.5)
    )
    result = train(config, tmp_path, progress=False)
    model = load_model(result.checkpoint)
    assert model.num_members == 4
    assert result.history == []
    reference = load_model(mse_checkpoint)
    torch.testing.assert_close(
        mean_energies(model, valid_set),
        mean_energies(reference, valid_set),
        rtol=1e-12,
        atol=1e-10,
    )
    # the members differ, and the backbone is the trained one
    assert float(model.head.weight.detach().std(dim=0).max()) > 0
    for key, value in reference.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)
    if strategy == "laplace":
        info = json.loads((tmp_path / "metrics.json").read_text())["laplace"]
        assert info["alpha"] > 0 and info["regularizer"] > 0
    check_exports(model)


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("target", ["full", "heads"])
def test_finetune_updates_only_what_it_claims(data, mse_checkpoint, tmp_path, target):
    laplace = train(
        make_config(data, strategy="laplace", init_from=str(mse_checkpoint)),
        tmp_path / "laplace",
        progress=False,
    )
    config = make_config(
        data,
        strategy="finetune",
        init_from=str(laplace.checkpoint),
        finetune_target=target,
        epochs=2,
    )
    result = train(config, tmp_path / "finetune", progress=False)
    before = load_model(laplace.checkpoint).state_dict()
    after = load_model(result.checkpoint).state_dict()
    changed = {k for k in _changed(before, after) if not k.startswith(CALIBRATION)}
    head = {"head.weight", "head.bias"}
    assert head <= changed
    mlp = {k for k in before if k.startswith("backbone.mlps")}
    if target == "heads":
        assert changed == head
    else:
        assert mlp <= changed
        # descriptor tables and baselines are not parameters
        assert not any(
            k.startswith(("backbone.spline", "backbone.feature", "head.comp"))
            for k in changed
        )
    check_exports(load_model(result.checkpoint))


def test_finetune_with_pinned_mean_keeps_the_mean_head(data, mse_checkpoint, tmp_path):
    laplace = train(
        make_config(data, strategy="laplace", init_from=str(mse_checkpoint)),
        tmp_path / "laplace",
        progress=False,
    )
    config = make_config(
        data,
        strategy="finetune",
        init_from=str(laplace.checkpoint),
        finetune_target="heads",
        pin_mean=True,
        epochs=2,
    )
    result = train(config, tmp_path / "finetune", progress=False)
    before = load_model(laplace.checkpoint).head
    after = load_model(result.checkpoint).head
    torch.testing.assert_close(
        after.weight.mean(0), before.weight.mean(0), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        after.bias.mean(), before.bias.mean(), rtol=0, atol=1e-12
    )
    assert not torch.equal(after.weight, before.weight)


def test_finetune_refuses_a_single_head(data, mse_checkpoint, tmp_path):
    config = make_config(data, strategy="finetune", init_from=str(mse_checkpoint))
    with pytest.raises(ValueError, match="single head"):
        train(config, tmp_path, progress=False)


def test_deep_ensemble_members_are_the_independent_models(data, valid_set, tmp_path):
    config = make_config(data, strategy="deep_ensemble", epochs=2)
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, num_members=3)
    )
    result = train(config, tmp_path, progress=False)
    stacked = load_model(result.checkpoint)
    assert stacked.num_members == 3
    members = predict_dataset(stacked, valid_set, forces=True)
    for k in range(3):
        member = load_model(tmp_path / "members" / f"{k:02d}" / "model.ckpt")
        alone = predict_dataset(member, valid_set, forces=True)
        torch.testing.assert_close(members.energies[:, k], alone.energies[:, 0])
        torch.testing.assert_close(members.forces[k], alone.forces[0])
    # members were trained from different seeds
    assert float(members.energies.std(dim=1).min()) > 0
    # the exported ensemble mean is the mean of the members (calibration keeps it)
    results, _ = run_model(
        to_atomistic_model(stacked),
        ase.io.read(data / "valid.xyz", ":"),
        {"energy": "system", "energy_ensemble": "system"},
    )
    torch.testing.assert_close(
        results["energy"].block().values[:, 0], members.energies.mean(dim=1)
    )


def test_protocol_runs_every_stage(data, tmp_path):
    config = make_config(data, strategy="protocol", epochs=2)
    config = dataclasses.replace(
        config, protocol=dataclasses.replace(config.protocol, finetune_epochs=2)
    )
    result = run_protocol(config, tmp_path, progress=False)
    for folder in ("1-mse", "2-laplace", "3-finetune"):
        assert (tmp_path / folder / "model.ckpt").exists()
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert list(summary["stages"]) == ["mse", "laplace", "finetune"]
    assert summary["stages"]["finetune"]["epochs"] == 2
    assert summary["train_seconds"] == pytest.approx(
        sum(s["seconds"] for s in summary["stages"].values())
    )
    model = load_model(result.checkpoint)
    assert model.num_members == 4
    check_exports(model)
