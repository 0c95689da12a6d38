"""Data-parallel training under torchrun (2 CPU processes, gloo) equals one process.

The training structures have different sizes and the last batch holds a single
structure, so one process has nothing to do in that step: the loss shares and the
gradient sum must still give the one-process gradient.
"""

import json
import os
import subprocess
import sys

import ase.io
import pytest
import torch
import yaml

from conftest import SILICON, tiny_config
from shallow_ensemble.training import load_model, train
from shallow_ensemble.training.checkpoints import read_checkpoint


def _torchrun(config, outdir, tmp_path, nproc=2):
    path = tmp_path / f"{outdir.name}.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "shallow_ensemble.cli",
        "train",
        str(path),
        "-o",
        str(outdir),
    ]
    process = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=env
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return process


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    frames = ase.io.read(SILICON, ":")
    train_frames = frames[8:17]  # 9 structures of 12 to 40 atoms
    assert len({len(atoms) for atoms in train_frames}) > 3
    ase.io.write(folder / "train.xyz", train_frames)
    ase.io.write(folder / "valid.xyz", frames[17:20])
    return folder


def _assert_same_parameters(path_a, path_b):
    a = load_model(path_a).state_dict()
    b = load_model(path_b).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-11, msg=key)


def test_two_processes_train_like_one(mixed_sizes, tmp_path):
    config = tiny_config(
        mixed_sizes, strategy="energy_force_nll", epochs=3, batch_size=4
    )
    single = train(config, tmp_path / "one", progress=False)
    process = _torchrun(config, tmp_path / "two", tmp_path)
    assert "calibration on validation" in process.stdout  # rank 0 reports, once
    assert process.stdout.count("calibration on validation") == 1

    _assert_same_parameters(single.checkpoint, tmp_path / "two" / "model.ckpt")
    # both selected the same NLL epoch (after the one warm-up epoch)
    best = [
        json.loads((tmp_path / run / "metrics.json").read_text())["best_epoch"]
        for run in ("one", "two")
    ]
    assert best[0] == best[1] and best[0] in (2, 3)

    with (
        open(tmp_path / "one" / "log.csv") as one,
        open(tmp_path / "two" / "log.csv") as two,
    ):
        rows_one = [line.split(",") for line in one.read().splitlines()]
        rows_two = [line.split(",") for line in two.read().splitlines()]
    header = rows_one[0]
    for row_one, row_two in zip(rows_one[1:], rows_two[1:], strict=True):
        for name in ("train_loss", "valid_loss"):
            column = header.index(name)
            assert float(row_two[column]) == pytest.approx(
                float(row_one[column]), rel=1e-9
            )


def test_laplace_covariance_is_summed_over_processes(mixed_sizes, tmp_path):
    start = train(
        tiny_config(mixed_sizes, strategy="mse", epochs=2, batch_size=4),
        tmp_path / "mse",
        progress=False,
    )
    config = tiny_config(
        mixed_sizes,
        strategy="laplace",
        init_from=str(start.checkpoint),
        batch_size=4,
    )
    single = train(config, tmp_path / "one", progress=False)
    _torchrun(config, tmp_path / "two", tmp_path)
    two = load_model(tmp_path / "two" / "model.ckpt")
    # the sampled heads depend on the whole covariance: a covariance of one
    # process's share would give other samples and another alpha
    torch.testing.assert_close(
        two.head.weight, single.model.head.weight, rtol=1e-9, atol=1e-12
    )
    info = read_checkpoint(tmp_path / "two" / "model.ckpt")["info"]["laplace"]
    assert info["alpha"] == pytest.approx(single.info["laplace"]["alpha"], rel=1e-10)
