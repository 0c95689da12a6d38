"""Output folders: a finished run is never silently replaced, an interrupted one of
any strategy can be resumed, files are written atomically with ordinary
permissions, and unusable paths fail before any work."""

import dataclasses
import json
import os
import stat

import pytest
import torch

from conftest import tiny_config, write_ethanol_split
from shallow_ensemble.training import load_model, train
from shallow_ensemble.training.checkpoints import read_checkpoint
from shallow_ensemble.training.rundir import OutputError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_ethanol_split(tmp_path_factory.mktemp("data"), 12, (100, 106))


@pytest.fixture(scope="module")
def mse_checkpoint(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mse")
    return train(tiny_config(data, strategy="mse"), out, progress=False).checkpoint


def protocol_config(data):
    config = tiny_config(data, strategy="protocol", epochs=1)
    return dataclasses.replace(
        config, protocol=dataclasses.replace(config.protocol, finetune_epochs=2)
    )


def config_for(strategy, data, mse_checkpoint):
    if strategy == "protocol":
        return protocol_config(data)
    if strategy in ("laplace", "random_heads"):
        return tiny_config(data, strategy=strategy, init_from=str(mse_checkpoint))
    if strategy == "deep_ensemble":
        config = tiny_config(data, strategy=strategy, epochs=1)
        model = dataclasses.replace(config.model, num_members=2)
        return dataclasses.replace(config, model=model)
    return tiny_config(data, strategy=strategy)


STRATEGIES = ["energy_nll", "laplace", "random_heads", "deep_ensemble", "protocol"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_finished_run_is_not_replaced_without_overwrite(
    strategy, data, mse_checkpoint, tmp_path
):
    config = config_for(strategy, data, mse_checkpoint)
    train(config, tmp_path, progress=False)
    before = (tmp_path / "model.ckpt").read_bytes()
    with pytest.raises(OutputError, match="--overwrite"):
        train(config, tmp_path, progress=False)
    assert (tmp_path / "model.ckpt").read_bytes() == before
    # --resume of a finished run gives the same model back
    resumed = train(config, tmp_path, resume=True, progress=False)
    original = load_model(tmp_path / "model.ckpt").state_dict()
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0)


class Interrupt(Exception):
    pass


def test_an_interrupted_overwrite_leaves_no_previous_result(data, tmp_path):
    config = tiny_config(data, strategy="energy_nll", epochs=3)
    train(config, tmp_path, progress=False)
    assert (tmp_path / "model.ckpt").exists()

    def stop(epoch):
        raise Interrupt

    with pytest.raises(Interrupt):
        train(config, tmp_path, overwrite=True, progress=False, on_epoch_end=stop)
    assert not (tmp_path / "model.ckpt").exists()
    assert not (tmp_path / "metrics.json").exists()
    # what is there is the new run's state after its first epoch
    assert read_checkpoint(tmp_path / "last.ckpt")["epoch"] == 0


def test_an_interrupted_protocol_overwrite_leaves_no_previous_stages(data, tmp_path):
    config = protocol_config(data)
    train(config, tmp_path, progress=False)

    def stop(epoch):
        raise Interrupt

    # the first epoch of the first stage is interrupted
    with pytest.raises(Interrupt):
        train(config, tmp_path, overwrite=True, progress=False, on_epoch_end=stop)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["1-mse"]
    assert not (tmp_path / "1-mse" / "model.ckpt").exists()


def test_protocol_resumes_when_a_stage_metrics_file_is_lost(data, tmp_path):
    """model.ckpt marks a finished stage; its metrics.json (written before it) may
    be missing or truncated without stopping a resume."""
    config = protocol_config(data)
    straight = train(config, tmp_path / "straight", progress=False)

    out = tmp_path / "resumed"
    train(config, out, progress=False)
    (out / "1-mse" / "metrics.json").unlink()
    (out / "2-laplace" / "metrics.json").write_text('{"train_seconds": 1')
    (out / "model.ckpt").unlink()
    (out / "3-finetune" / "model.ckpt").unlink()  # the last stage was interrupted
    resumed = train(config, out, resume=True, progress=False)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    summary = json.loads((out / "metrics.json").read_text())
    assert list(summary["stages"]) == ["mse", "laplace", "finetune"]
    assert summary["stages"]["mse"]["best_epoch"] == 1
    assert summary["stages"]["laplace"]["best_epoch"] is None
    assert summary["stages"]["finetune"]["best_epoch"] in (1, 2)


def test_a_damaged_stage_checkpoint_is_named(data, tmp_path):
    config = protocol_config(data)
    train(config, tmp_path, progress=False)
    (tmp_path / "2-laplace" / "model.ckpt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="2-laplace/model.ckpt"):
        train(config, tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("strategy", ["laplace", "random_heads"])
def test_post_hoc_strategies_resume_when_interrupted(
    strategy, data, mse_checkpoint, tmp_path
):
    config = config_for(strategy, data, mse_checkpoint)
    straight = train(config, tmp_path / "straight", progress=False)
    out = tmp_path / "resumed"
    out.mkdir()
    (out / ".model.ckpt.abcd1234.tmp").write_bytes(b"left by a kill")
    resumed = train(config, out, resume=True, progress=False)
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value)
    assert sorted(p.name for p in out.iterdir()) == [
        "best.ckpt",
        "metrics.json",
        "model.ckpt",
    ]


def test_deep_ensemble_resumes_its_members(data, mse_checkpoint, tmp_path):
    config = config_for("deep_ensemble", data, mse_checkpoint)
    straight = train(config, tmp_path / "straight", progress=False)
    out = tmp_path / "resumed"
    train(config, out, progress=False)
    # a kill while the second member trains: its model.ckpt and the stack are lost
    (out / "members" / "01" / "model.ckpt").unlink()
    (out / "model.ckpt").unlink()
    (out / "metrics.json").unlink()
    first = (out / "members" / "00" / "last.ckpt").stat().st_mtime_ns
    resumed = train(config, out, resume=True, progress=False)
    assert (out / "members" / "00" / "last.ckpt").stat().st_mtime_ns == first
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value)


def test_files_get_the_permissions_of_the_umask(data, tmp_path):
    old = os.umask(0o022)
    try:
        train(tiny_config(data, strategy="mse", epochs=1), tmp_path, progress=False)
    finally:
        os.umask(old)
    for name in ("model.ckpt", "last.ckpt", "best.ckpt", "metrics.json", "log.csv"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode))


def test_metrics_json_is_strict(tmp_path):
    from shallow_ensemble.training.rundir import write_json

    write_json(tmp_path / "m.json", {"rll": float("nan"), "x": [float("inf"), 1.0]})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"rll": None, "x": [None, 1.0]}
    assert "NaN" not in text and "Infinity" not in text


def test_stale_temporaries_of_other_files_are_kept(data, tmp_path):
    (tmp_path / ".notes.txt.tmp").write_text("not ours")
    (tmp_path / ".last.ckpt.x1y2z3.tmp").write_text("ours")
    train(tiny_config(data, strategy="mse", epochs=1), tmp_path, progress=False)
    assert (tmp_path / ".notes.txt.tmp").exists()
    assert not (tmp_path / ".last.ckpt.x1y2z3.tmp").exists()


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_an_unusable_output_folder_fails_before_training(data, tmp_path, where):
    (tmp_path / "taken").write_text("a file")
    outdir = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "run"
    config = tiny_config(data, strategy="mse")
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, train=str(tmp_path / "no.xyz"))
    )
    # the output is checked first: the missing training file is not reached
    with pytest.raises(OutputError, match="taken"):
        train(config, outdir, progress=False)
