"""The training loop: every strategy end to end, checkpoints, resuming."""

import csv
import json
import math

import ase.io
import pytest
import torch

from conftest import ETHANOL, tiny_config, write_ethanol_split
from shallow_ensemble.calibration.noise_floor import NoiseFloors
from shallow_ensemble.calibration.predictions import noise_floors
from shallow_ensemble.export import to_atomistic_model
from shallow_ensemble.export.predict import run_model
from shallow_ensemble.training import TrainingError, load_model, train
from shallow_ensemble.training.rundir import OutputError


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return write_ethanol_split(tmp_path_factory.mktemp("data"), 24, (100, 110))


def make_config(folder, **training):
    return tiny_config(folder, **training)


@pytest.mark.parametrize("strategy", ["mse", "energy_nll", "energy_force_nll"])
def test_each_strategy_trains_calibrates_and_exports(small_data, tmp_path, strategy):
    config = make_config(small_data, strategy=strategy)
    result = train(config, tmp_path, progress=False)
    assert result.checkpoint.exists()
    with open(tmp_path / "log.csv") as fd:
        rows = list(csv.DictReader(fd))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["valid_loss"])) for r in rows)

    model = load_model(result.checkpoint)
    expected_members = 1 if strategy == "mse" else 4
    assert model.num_members == expected_members
    alphas = {k: v for k, v in result.calibration.items() if k.startswith("alpha")}
    assert len(alphas) == 3
    for key, value in alphas.items():
        assert math.isfinite(value) and value > 0
        assert float(getattr(model, key)) == pytest.approx(value)
    assert model.noise_floors() == noise_floors(result.calibration)
    if strategy == "mse":
        assert set(alphas.values()) == {1.0}
        assert model.noise_floors() == NoiseFloors()
    else:
        assert result.calibration["alpha_energy"] != 1.0

    frames = ase.io.read(small_data / "valid.xyz", ":3")
    outputs = {
        "energy": "system",
        "energy_uncertainty": "atom",
        "energy_ensemble": "system",
    }
    results, _ = run_model(to_atomistic_model(model), frames, outputs)
    assert results["energy_ensemble"].block().values.shape == (3, expected_members)


def test_training_improves_on_the_composition_baseline(small_data, tmp_path):
    config = make_config(small_data, strategy="mse", epochs=8, learning_rate=0.01)
    result = train(config, tmp_path, progress=False)
    rmse = result.metrics["valid_uncalibrated"]["forces"]["rmse"]
    frames = ase.io.read(small_data / "valid.xyz", ":")
    zero_force_rmse = float(
        torch.cat([torch.tensor(f.get_forces()) for f in frames]).pow(2).mean().sqrt()
    )
    assert rmse < 0.7 * zero_force_rmse


class Interrupt(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_result(small_data, tmp_path):
    config = make_config(small_data, strategy="energy_force_nll", epochs=4)
    straight = train(config, tmp_path / "straight", progress=False)

    def stop_after_second_epoch(epoch):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(
            config,
            tmp_path / "resumed",
            progress=False,
            on_epoch_end=stop_after_second_epoch,
        )
    assert not (tmp_path / "resumed" / "model.ckpt").exists()
    with pytest.raises(OutputError, match="--resume"):
        train(config, tmp_path / "resumed", progress=False)
    resumed = train(config, tmp_path / "resumed", resume=True, progress=False)

    assert [r["train_loss"] for r in resumed.history] == [
        r["train_loss"] for r in straight.history
    ]
    a = straight.model.state_dict()
    b = resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert resumed.calibration == straight.calibration


def test_resume_refuses_a_different_configuration(small_data, tmp_path):
    train(make_config(small_data, strategy="mse"), tmp_path, progress=False)
    with pytest.raises(TrainingError, match="configuration differs"):
        train(
            make_config(small_data, strategy="mse", epochs=3),
            tmp_path,
            resume=True,
            progress=False,
        )
    with pytest.raises(TrainingError, match="does not exist"):
        train(make_config(small_data), tmp_path / "new", resume=True, progress=False)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves the previous checkpoint intact."""
    from shallow_ensemble.training import checkpoints

    path = tmp_path / "state.ckpt"
    checkpoints.atomic_save({"a": 1}, path)

    def broken_save(obj, f):
        with open(f, "wb") as fd:
            fd.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.atomic_save({"a": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.ckpt"]


def test_unreadable_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_model(path)


def test_best_epoch_is_chosen_after_the_warm_up(small_data, tmp_path):
    """The MSE loss of the warm-up is not comparable with the NLL: the selected
    model is the post-warm-up epoch of lowest validation score (the loss with its
    NLL terms at their calibrated values, ``training.select_epoch``), recorded as
    ``best_epoch`` (numbered as in log.csv)."""
    config = make_config(small_data, strategy="energy_force_nll", epochs=4)
    snapshots = {}

    def snapshot(epoch):
        state = load_model(tmp_path / "last.ckpt").state_dict()
        snapshots[epoch + 1] = {k: v.clone() for k, v in state.items()}

    result = train(config, tmp_path, progress=False, on_epoch_end=snapshot)
    with open(tmp_path / "log.csv") as fd:
        rows = list(csv.DictReader(fd))
    losses = {int(r["epoch"]): float(r["valid_loss"]) for r in rows}
    # the warm-up loss is the smallest number in the log: the old rule kept it
    assert losses[1] < min(losses[e] for e in (2, 3, 4))

    def score(row):  # the NLL terms minus what a global factor removes (weights 1)
        z2 = [float(row[f"valid_{q}_z2"]) for q in ("energy", "forces")]
        return float(row["valid_loss"]) - sum(0.5 * (z - 1 - math.log(z)) for z in z2)

    scores = {int(r["epoch"]): score(r) for r in rows[1:]}
    expected = min((2, 3, 4), key=scores.__getitem__)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["best_epoch"] == expected
    selected = result.model.state_dict()
    for key, value in snapshots[expected].items():
        if not key.startswith(("alpha_", "sigma0_", "floor_scale_")):  # calibration
            torch.testing.assert_close(selected[key], value, rtol=0, atol=0)


def test_best_epoch_is_the_lowest_validation_loss_without_warm_up(small_data, tmp_path):
    config = make_config(small_data, strategy="mse", epochs=3, learning_rate=0.05)
    train(config, tmp_path, progress=False)
    with open(tmp_path / "log.csv") as fd:
        losses = [float(r["valid_loss"]) for r in csv.DictReader(fd)]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 + losses.index(min(losses))


def test_a_non_finite_loss_names_the_structures_of_the_batch(
    small_data, tmp_path, monkeypatch
):
    """Values the reader cannot catch (here an energy made infinite after reading)
    stop training with the structures of the failing batch named."""
    from shallow_ensemble.training import trainer

    real_load = trainer.load_datasets

    def load_with_a_bad_energy(config, cutoff=None, progress=True):
        types, datasets = real_load(config, cutoff, progress)
        datasets["train"][5].energy.fill_(float("inf"))
        return types, datasets

    monkeypatch.setattr(trainer, "load_datasets", load_with_a_bad_energy)
    config = make_config(small_data, strategy="mse", batch_size=24)
    with pytest.raises(TrainingError, match="non-finite loss") as error:
        train(config, tmp_path, progress=False)
    assert f"{small_data / 'train.xyz'}:5" in str(error.value)


def test_training_without_progress_prints_nothing(tmp_path, capsys):
    """More structures than the neighbour-list progress threshold: with
    ``progress=False`` nothing at all is written to the terminal."""
    from shallow_ensemble.data.dataset import PROGRESS_THRESHOLD

    frames = ase.io.read(ETHANOL, f":{PROGRESS_THRESHOLD + 10}")
    ase.io.write(tmp_path / "train.xyz", frames)
    ase.io.write(tmp_path / "valid.xyz", frames[:4])
    config = make_config(tmp_path, strategy="mse", epochs=1, batch_size=30)
    capsys.readouterr()
    train(config, tmp_path / "run", progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
