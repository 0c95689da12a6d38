"""Strategies as presets of stages: what each preset is made of, that the flags the
configuration validates with agree with the stages, and that training prints
nothing without progress bars."""

import dataclasses
import json
import logging
from typing import get_args

import pytest

from conftest import tiny_config, write_ethanol_split
from shallow_ensemble import config as config_module
from shallow_ensemble.config import Config, DataConfig, StrategyName, TrainingConfig
from shallow_ensemble.training import PRESETS, Stage, preset_stages, train
from shallow_ensemble.training.stages import BUILDS_ON_A_MODEL


def configuration(strategy="energy_force_nll", model=None, protocol=None, **training):
    config = Config(
        data=DataConfig(train="train.xyz", valid="valid.xyz"),
        training=TrainingConfig(strategy=strategy, **training),
    )
    if model:
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, **model)
        )
    if protocol:
        config = dataclasses.replace(
            config, protocol=dataclasses.replace(config.protocol, **protocol)
        )
    return config


def test_every_strategy_is_a_preset():
    assert list(PRESETS) == list(get_args(StrategyName))


@pytest.mark.parametrize("strategy", get_args(StrategyName))
def test_the_configuration_flags_follow_the_stages(strategy):
    """``config.py`` validates with flags (it must not import the training code);
    they say what the stages do."""
    stages = preset_stages(configuration(strategy, model={"from_metatomic": None}))
    first = stages[0]
    single = len(stages) == 1
    assert (single and first.probabilistic) == (
        strategy in config_module.PROBABILISTIC_STRATEGIES
    )
    assert (single and first.start in BUILDS_ON_A_MODEL) == (
        strategy in config_module.CHECKPOINT_STRATEGIES
    )
    one_member = all(
        s.num_members == 1 for s in stages if s.start in ("fresh", "from_metatomic")
    ) and not any(s.start in ("laplace", "random_heads", "stack") for s in stages)
    assert (one_member and not any(s.probabilistic for s in stages)) == (
        strategy in config_module.ONE_MEMBER_STRATEGIES
    )


def test_single_stage_presets_write_into_the_run_folder():
    for strategy in get_args(StrategyName):
        stages = preset_stages(configuration(strategy))
        if len(stages) == 1:
            assert stages[0].folder == "."
            assert stages[0].name == strategy


def test_one_stage_presets():
    stage = preset_stages(configuration("energy_nll", epochs=10))[0]
    assert (stage.start, stage.objective, stage.trainable) == (
        "fresh",
        "energy_nll",
        "full",
    )
    assert stage.warmup_epochs == 2  # a fifth of the epochs
    assert stage.num_members == 16
    assert stage.learning_rate == stage.heads_learning_rate == 3e-3

    stage = preset_stages(configuration("mse", warmup_epochs=4))[0]
    assert (stage.num_members, stage.warmup_epochs) == (1, 0)

    config = configuration(
        "finetune", finetune_target="heads", pin_mean=True, heads_learning_rate=1e-4
    )
    stage = preset_stages(config)[0]
    assert (stage.start, stage.objective, stage.trainable) == (
        "checkpoint",
        "energy_force_nll",
        "heads",
    )
    assert stage.pin_mean and stage.warmup_epochs == 0
    assert stage.heads_learning_rate == 1e-4

    for strategy in ("laplace", "random_heads"):
        stage = preset_stages(configuration(strategy))[0]
        assert (stage.start, stage.trainable, stage.epochs) == (strategy, "none", 0)


@pytest.mark.parametrize(
    ("first", "from_metatomic", "expected"),
    [
        ("mse", None, ["mse", "laplace", "finetune"]),
        ("energy_nll", None, ["energy_nll", "finetune"]),
        ("mse", "model.pt", ["from_metatomic", "laplace", "finetune"]),
    ],
)
def test_protocol_stages(first, from_metatomic, expected):
    config = configuration(
        "protocol",
        model={"from_metatomic": from_metatomic, "num_members": 8},
        protocol={
            "first": first,
            "finetune_epochs": 3,
            "finetune_learning_rate": 1e-4,
            "finetune_target": "heads",
        },
        epochs=20,
        seed=5,
        pin_mean=True,
    )
    stages = preset_stages(config)
    assert [s.name for s in stages] == expected
    assert [s.folder for s in stages] == [
        f"{n}-{name}" for n, name in enumerate(expected, 1)
    ]
    assert stages[0].epochs == (0 if from_metatomic else 20)
    finetune = stages[-1]
    assert finetune == Stage(
        name="finetune",
        start="checkpoint",
        objective="energy_force_nll",
        trainable="heads",
        num_members=8,
        epochs=3,
        warmup_epochs=0,
        learning_rate=1e-4,
        heads_learning_rate=1e-4,
        pin_mean=True,
        seed=5,
        folder=finetune.folder,
    )
    assert all(s.calibrate for s in stages)


def test_deep_ensemble_is_independent_members_then_their_stack():
    config = configuration("deep_ensemble", model={"num_members": 3}, seed=7)
    *members, stack = preset_stages(config)
    assert [m.folder for m in members] == ["members/00", "members/01", "members/02"]
    assert [m.seed for m in members] == [7, 8, 9]
    for member in members:
        assert (member.start, member.objective, member.num_members) == (
            "fresh",
            "mse",
            1,
        )
        assert not member.calibrate
    assert (stack.start, stack.trainable, stack.folder) == ("stack", "none", ".")
    assert stack.name == "deep_ensemble"


def test_a_stage_that_trains_needs_epochs():
    with pytest.raises(ValueError, match="no epochs"):
        Stage(name="x", start="fresh", epochs=0)
    with pytest.raises(ValueError, match="trains nothing"):
        Stage(name="x", start="laplace", trainable="none", epochs=3)


# ------------------------------------------------------------- quiet library --
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_ethanol_split(tmp_path_factory.mktemp("data"), 12, (100, 104))


def test_a_protocol_without_progress_prints_nothing(data, tmp_path, capsys, caplog):
    config = tiny_config(data, strategy="protocol", epochs=1)
    config = dataclasses.replace(
        config, protocol=dataclasses.replace(config.protocol, finetune_epochs=1)
    )
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="shallow_ensemble"):
        train(config, tmp_path, progress=False)
        # resuming a finished run says so in the log, not on the terminal
        train(config, tmp_path, resume=True, progress=False)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""
    # the stages are reported through logging
    messages = [r.getMessage() for r in caplog.records]
    assert any("stage 1/3: mse" in m for m in messages)
    assert any("stage 3/3: finetune" in m for m in messages)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["strategy"] == "protocol"
    assert [s["best_epoch"] for s in summary["stages"].values()] == [1, None, 1]


def test_resuming_an_interrupted_stage_is_logged(data, tmp_path, capsys, caplog):
    config = tiny_config(data, strategy="energy_nll", epochs=2)

    class Interrupt(Exception):
        pass

    def stop(epoch):
        raise Interrupt

    with pytest.raises(Interrupt):
        train(config, tmp_path, progress=False, on_epoch_end=stop)
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="shallow_ensemble"):
        train(config, tmp_path, resume=True, progress=False)
    assert capsys.readouterr() == ("", "")
    assert any("resuming" in r.getMessage() for r in caplog.records)
