"""Every configuration in examples/ loads as it is, and trains for one short epoch.

Each ``examples/*.yaml`` must load with :py:func:`shallow_ensemble.config.load_config`
unchanged; then it runs (``train``, which runs the stages of ``strategy: protocol``)
with ``--set``-style overrides: one epoch, a tiny model, the bundled ethanol and
silicon structures where the example points to data of its own. The examples that
start from other runs are chained: ``finetune.yaml`` from the checkpoint of the
``silicon-energy-nll.yaml`` run, ``extend-metatomic.yaml`` from the exported model of
the ``quickstart.yaml`` run. (tests/unit/test_extended.py also runs
``extend-metatomic.yaml`` through the command line, from an untrained model.)
"""

import json
import math
from pathlib import Path

import ase.io
import pytest

from conftest import ETHANOL, SILICON
from shallow_ensemble.config import load_config
from shallow_ensemble.export import export_model
from shallow_ensemble.training import load_model, train


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

TINY = [
    "model.num_members=4",
    "model.cutoff=3.5",
    "model.max_radial=3",
    "model.max_angular=2",
    "model.hidden_sizes=[16, 8]",
    "training.epochs=1",
    "training.warmup_epochs=0",
]

# example -> (its data, a run it starts from or None, overrides besides TINY);
# "{ckpt}", "{model}", "{data}" are filled in with the run it starts from and the
# folder with small ethanol train/valid/test files
EXAMPLE_RUNS = {
    "quickstart": (ETHANOL, None, []),
    "silicon-energy-nll": (SILICON, None, []),
    "protocol": (SILICON, None, ["protocol.finetune_epochs=1"]),
    "finetune": (SILICON, "silicon-energy-nll", ["training.init_from={ckpt}"]),
    "water": (
        None,
        None,
        ["data.train={data}/train.xyz", "data.valid={data}/valid.xyz"],
    ),
    "extend-metatomic": (
        None,
        "quickstart",
        [
            "data.train={data}/train.xyz",
            "data.valid={data}/valid.xyz",
            "data.test={data}/test.xyz",
            "model.from_metatomic={model}",
            "protocol.finetune_epochs=1",
        ],
    ),
}


def test_every_example_is_run():
    names = {path.stem for path in EXAMPLES.glob("*.yaml")}
    assert names == set(EXAMPLE_RUNS)


@pytest.mark.parametrize("name", sorted(EXAMPLE_RUNS))
def test_example_loads_unchanged(name):
    config = load_config(EXAMPLES / f"{name}.yaml")
    data, _, _ = EXAMPLE_RUNS[name]
    if data is not None:  # the example's own path to the bundled structures
        assert Path(config.data.train).resolve() == Path(data).resolve()
        assert Path(config.data.train).is_file()


@pytest.fixture(scope="module")
def small_ethanol(tmp_path_factory):
    """Small ethanol train/valid/test files (H, C, O: also for water.yaml)."""
    folder = tmp_path_factory.mktemp("ethanol")
    frames = ase.io.read(ETHANOL, ":40")
    ase.io.write(folder / "train.xyz", frames[:24])
    ase.io.write(folder / "valid.xyz", frames[24:32])
    ase.io.write(folder / "test.xyz", frames[32:])
    return folder


@pytest.fixture(scope="module")
def run_example(tmp_path_factory, small_ethanol):
    """Run an example (once per module), and the runs it starts from; its folder."""
    done = {}

    def run(name):
        if name in done:
            return done[name]
        data, parent, overrides = EXAMPLE_RUNS[name]
        fill = {"data": small_ethanol}
        if parent is not None:
            fill["ckpt"] = run(parent) / "model.ckpt"
            fill["model"] = fill["ckpt"].parent / "exported.pt"
            if not fill["model"].exists():
                export_model(load_model(fill["ckpt"]), fill["model"])
        overrides = TINY + [item.format(**fill) for item in overrides]
        config = load_config(EXAMPLES / f"{name}.yaml", overrides)
        assert config.training.epochs == 1
        outdir = tmp_path_factory.mktemp(name) / "run"
        result = train(config, outdir, progress=False)
        assert result.checkpoint == outdir / "model.ckpt"
        done[name] = outdir
        return outdir

    return run


def _numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _numbers(value)
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield tree


@pytest.mark.parametrize("name", sorted(EXAMPLE_RUNS))
def test_example_runs_one_short_epoch(name, run_example):
    outdir = run_example(name)
    assert (outdir / "model.ckpt").is_file()
    metrics = json.loads((outdir / "metrics.json").read_text())
    example = load_config(EXAMPLES / f"{name}.yaml")
    assert metrics["strategy"] == example.training.strategy
    assert all(math.isfinite(x) for x in _numbers(metrics)), metrics
    for key in ("alpha_energy", "alpha_forces"):
        assert metrics["calibration"][key] > 0
    for quantity in ("energy", "forces"):
        assert metrics["valid_calibrated"][quantity]["rmse"] > 0
        assert math.isfinite(metrics["valid_calibrated"][quantity]["nll"])
    model = load_model(outdir / "model.ckpt")
    assert model.num_members == 4
