"""Loading and validating configurations: unknown keys, types, overrides, paths."""

import dataclasses
import re
from pathlib import Path
from typing import get_args

import pytest

from shallow_ensemble.config import (
    Config,
    ConfigError,
    ModelConfig,
    apply_overrides,
    choices,
    config_from_dict,
    load_config,
)


def minimal(**sections):
    """The smallest valid raw configuration, with extra sections merged in."""
    raw = {"data": {"train": "train.xyz", "valid": "valid.xyz"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_minimal_config_has_the_documented_defaults():
    config = config_from_dict(minimal())
    assert isinstance(config, Config)
    assert config.data.train == "train.xyz"
    assert config.data.test is None
    assert config.model == ModelConfig()
    assert config.training.strategy == "energy_force_nll"
    assert config.calibration.enabled is True
    assert config.to_dict()["model"]["hidden_sizes"] == [128, 64]


# ------------------------------------------------------------- unknown keys --
def test_unknown_section_lists_the_allowed_sections():
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(optimizer={"lr": 1}))
    message = str(info.value)
    assert message.startswith("unknown section `optimizer`; allowed sections: ")
    allowed = message.split("allowed sections: ")[1].split(", ")
    assert {"data", "model", "training", "calibration"} <= set(allowed)
    assert "optimizer" not in allowed


def test_unknown_key_names_the_dotted_key_and_the_allowed_keys():
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(model={"num_heads": 4}))
    message = str(info.value)
    assert message.startswith(
        "unknown key `model.num_heads`; allowed keys in `model`: "
    )
    allowed = message.split("allowed keys in `model`: ")[1].split(", ")
    assert allowed == [f.name for f in dataclasses.fields(ModelConfig)]
    assert {"num_members", "cutoff", "hidden_sizes"} <= set(allowed)


def test_unknown_key_in_data_lists_the_data_keys():
    with pytest.raises(ConfigError, match=r"unknown key `data\.validation`") as info:
        config_from_dict(minimal(data={"validation": "v.xyz"}))
    allowed = str(info.value).split("allowed keys in `data`: ")[1].split(", ")
    assert {"train", "valid", "test", "energy_key", "forces_key"} <= set(allowed)


# ---------------------------------------------------------------- types --
@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        (
            "training",
            "epochs",
            "ten",
            "`training.epochs` is 'ten' but must be an integer",
        ),
        (
            "training",
            "epochs",
            True,
            "`training.epochs` is True but must be an integer",
        ),
        ("training", "epochs", 2.5, "`training.epochs` is 2.5 but must be an integer"),
        ("model", "cutoff", False, "`model.cutoff` is False but must be a number"),
        (
            "training",
            "learning_rate",
            "fast",
            "`training.learning_rate` is 'fast' but must be a number",
        ),
        (
            "model",
            "hidden_sizes",
            ["16", "8"],
            "`model.hidden_sizes` is ['16', '8'] but must be a list of integers",
        ),
        (
            "model",
            "hidden_sizes",
            [16, True],
            "`model.hidden_sizes` is [16, True] but must be a list of integers",
        ),
        (
            "model",
            "hidden_sizes",
            16,
            "`model.hidden_sizes` is 16 but must be a list of integers",
        ),
        (
            "calibration",
            "enabled",
            "yes please",
            "`calibration.enabled` is 'yes please' but must be true or false",
        ),
        (
            "training",
            "warmup_epochs",
            "none",
            "`training.warmup_epochs` is 'none' but must be an integer or null",
        ),
        ("training", "strategy", None, "`training.strategy` is null but must be set"),
    ],
)
def test_wrong_types_name_the_key_the_value_and_the_expected_type(
    section, key, value, expected
):
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(**{section: {key: value}}))
    assert str(info.value) == expected


def test_integers_are_accepted_for_floats_and_converted():
    config = config_from_dict(minimal(model={"cutoff": 4}, training={"grad_clip": 0}))
    assert config.model.cutoff == 4.0 and isinstance(config.model.cutoff, float)
    assert isinstance(config.training.grad_clip, float)


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="`model` must be a mapping"):
        config_from_dict(minimal() | {"model": [1, 2]})
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        config_from_dict(["data"])


# ------------------------------------------------------- required / values --
def test_missing_data_section():
    with pytest.raises(ConfigError, match=r"missing section `data`"):
        config_from_dict({"model": {"num_members": 4}})


def test_missing_training_file():
    with pytest.raises(ConfigError, match=r"missing required key `data\.train`"):
        config_from_dict({"data": {"valid": "v.xyz"}})
    with pytest.raises(ConfigError, match=r"missing required key `data\.valid`"):
        config_from_dict({"data": {"train": "t.xyz"}})


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(training={"strategy": "crps"}))
    message = str(info.value)
    assert message.startswith("`training.strategy` is 'crps' but must be one of: ")
    valid = message.split("must be one of: ")[1].split(", ")
    assert {"mse", "energy_nll", "energy_force_nll"} <= set(valid)
    assert "crps" not in valid


@pytest.mark.parametrize(
    ("section", "key", "value", "rule"),
    [
        ("model", "num_members", 0, "positive"),
        ("model", "cutoff", -1.0, "positive and finite"),
        ("model", "cutoff", float("inf"), "positive and finite"),
        ("model", "max_radial", -1, "at least 0"),
        ("model", "max_angular", -1, "at least 0"),
        ("model", "hidden_sizes", [], "a non-empty list of positive integers"),
        ("model", "hidden_sizes", [16, 0], "a non-empty list of positive integers"),
        ("training", "warmup_epochs", -1, "at least 0 (or null)"),
        ("training", "heads_learning_rate", -1e-3, "at least 0 (or null)"),
        ("training", "weight_decay", -1e-5, "at least 0"),
        ("training", "energy_weight", -1.0, "at least 0"),
        ("training", "forces_weight", -1.0, "at least 0"),
        ("training", "grad_clip", -1.0, "at least 0 (0 disables clipping)"),
        ("protocol", "finetune_learning_rate", 0.0, "positive"),
        ("training", "epochs", 0, "at least 1"),
        ("training", "batch_size", 0, "at least 1"),
        ("training", "learning_rate", 0.0, "positive"),
        ("training", "dtype", "float16", "float32 or float64"),
        ("training", "lr_schedule", "step", "cosine or constant"),
    ],
)
def test_out_of_range_values(section, key, value, rule):
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(**{section: {key: value}}))
    assert str(info.value) == f"`{section}.{key}` is {value!r} but must be {rule}"


@pytest.mark.parametrize("strategy", ["energy_nll", "energy_force_nll"])
def test_one_member_is_rejected_for_a_probabilistic_strategy(strategy):
    raw = minimal(model={"num_members": 1}, training={"strategy": strategy})
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert str(info.value) == (
        f"`model.num_members` is 1 but strategy '{strategy}' needs at least 2 members"
    )


def test_one_member_is_fine_for_mse():
    raw = minimal(model={"num_members": 1}, training={"strategy": "mse"})
    assert config_from_dict(raw).model.num_members == 1


def test_validation_fraction_is_accepted():
    config = config_from_dict(minimal(data={"valid": 0.1, "test": 0.2}))
    assert config.data.valid == 0.1 and isinstance(config.data.valid, float)
    assert config.data.test == 0.2
    # a fraction is not a path: it is not resolved against the config folder
    config = config_from_dict(minimal(data={"valid": 0.1}), base_dir=Path("/x"))
    assert config.data.valid == 0.1


# ------------------------------------------------------------- overrides --
def test_overrides_are_parsed_as_yaml():
    raw = apply_overrides(
        minimal(training={"warmup_epochs": 3}),
        [
            "training.epochs=7",
            "training.learning_rate=0.01",
            "model.hidden_sizes=[32, 16]",
            "training.warmup_epochs=null",
            "calibration.enabled=false",
            "data.valid=0.25",
            "training.strategy = mse",
        ],
    )
    config = config_from_dict(raw)
    assert config.training.epochs == 7 and isinstance(config.training.epochs, int)
    assert config.training.learning_rate == 0.01
    assert config.model.hidden_sizes == [32, 16]
    assert config.training.warmup_epochs is None
    assert config.calibration.enabled is False
    assert config.data.valid == 0.25
    assert config.training.strategy == "mse"


def test_override_value_may_contain_an_equal_sign():
    raw = apply_overrides(minimal(), ["data.energy_key=E=total"])
    assert config_from_dict(raw).data.energy_key == "E=total"


def test_scientific_notation_is_a_number():
    """``1e-3`` is how everybody writes a learning rate (YAML 1.1 reads a string)."""
    raw = apply_overrides(minimal(), ["training.learning_rate=1e-3"])
    assert config_from_dict(raw).training.learning_rate == pytest.approx(1e-3)
    config = config_from_dict(minimal(training={"weight_decay": "1e-5"}))
    assert config.training.weight_decay == pytest.approx(1e-5)


def test_override_creates_a_missing_section():
    raw = apply_overrides(minimal(), ["calibration.enabled=false"])
    assert raw["calibration"] == {"enabled": False}


def test_override_of_an_empty_section(tmp_path):
    """``training:`` with every key commented out is a valid (empty) section."""
    path = write_config(
        tmp_path / "config.yaml",
        "data:\n  train: t.xyz\n  valid: v.xyz\ntraining:\n  # epochs: 10\n",
    )
    assert load_config(path).training.epochs == 100
    assert load_config(path, ["training.epochs=3"]).training.epochs == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "training.epochs",
            "override `training.epochs` must look like `section.key=value`",
        ),
        ("epochs=3", "override key `epochs` must look like `section.key`"),
        (
            "training.epochs.max=3",
            "override key `training.epochs.max` must look like `section.key`",
        ),
        ("data=3", "override key `data` must look like `section.key`"),
    ],
)
def test_malformed_overrides_are_rejected(override, message):
    with pytest.raises(ConfigError) as info:
        apply_overrides(minimal(), [override])
    assert str(info.value) == message


def test_override_into_a_scalar_is_rejected():
    raw = minimal() | {"training": 3}
    with pytest.raises(ConfigError, match="`training` is not a section"):
        apply_overrides(raw, ["training.epochs=3"])


def test_override_with_unknown_key_or_bad_type_is_caught_by_validation():
    with pytest.raises(ConfigError, match=r"unknown key `training\.epoch`"):
        config_from_dict(apply_overrides(minimal(), ["training.epoch=3"]))
    with pytest.raises(ConfigError, match=r"`training\.epochs` is 'many'"):
        config_from_dict(apply_overrides(minimal(), ["training.epochs=many"]))


def test_malformed_yaml_in_an_override_is_a_config_error(tmp_path):
    path = write_config(tmp_path / "c.yaml", "data:\n  train: t.xyz\n  valid: v.xyz\n")
    with pytest.raises(ConfigError, match=r"model\.hidden_sizes"):
        load_config(path, ["model.hidden_sizes=[16, 8"])


# ---------------------------------------------------------------- files --
def test_data_paths_are_relative_to_the_config_file(tmp_path):
    path = write_config(
        tmp_path / "runs" / "config.yaml",
        "data:\n"
        "  train: data/train.xyz\n"
        "  valid: ../valid.xyz\n"
        f"  test: {tmp_path / 'abs' / 'test.xyz'}\n"
        "model:\n  num_members: 4\n",
    )
    config = load_config(path)
    assert config.data.train == str(
        (tmp_path / "runs" / "data" / "train.xyz").resolve()
    )
    assert config.data.valid == str((tmp_path / "valid.xyz").resolve())
    assert config.data.test == str((tmp_path / "abs" / "test.xyz").resolve())
    assert config.model.num_members == 4


def test_missing_data_file_of_a_config_is_not_said_to_be_relative_to_the_cwd(
    tmp_path, monkeypatch
):
    """The reader gets the path resolved from the configuration file's folder: its
    message names that absolute path and no other folder."""
    from shallow_ensemble.data import DataError, read_structures

    write_config(
        tmp_path / "runs" / "config.yaml",
        "data:\n  train: data/train.xyz\n  valid: 0.1\n",
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("runs") / "config.yaml")
    resolved = (tmp_path / "runs" / "data" / "train.xyz").resolve()
    assert config.data.train == str(resolved)
    with pytest.raises(DataError) as info:
        read_structures(config.data.train)
    assert str(info.value) == f"{resolved}: file not found; check the path"


def test_load_config_applies_overrides(tmp_path):
    path = write_config(
        tmp_path / "config.yaml",
        "data:\n  train: t.xyz\n  valid: 0.2\ntraining:\n  epochs: 10\n",
    )
    config = load_config(path, ["training.epochs=2", "model.cutoff=3.0"])
    assert config.training.epochs == 2
    assert config.model.cutoff == 3.0
    assert config.data.valid == 0.2


def test_unknown_key_in_a_file(tmp_path):
    path = write_config(
        tmp_path / "config.yaml",
        "data:\n  train: t.xyz\n  valid: v.xyz\ntraining:\n  epoch: 10\n",
    )
    with pytest.raises(ConfigError, match=r"unknown key `training\.epoch`; allowed"):
        load_config(path)


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = write_config(
        tmp_path / "broken.yaml", "data:\n  train: [t.xyz\n  valid: x\n"
    )
    with pytest.raises(ConfigError, match=re.escape(f"'{path}' is not valid YAML")):
        load_config(path)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = write_config(tmp_path / "list.yaml", "- data\n- model\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_empty_file_reports_the_missing_data_section(tmp_path):
    path = write_config(tmp_path / "empty.yaml", "")
    with pytest.raises(ConfigError, match="missing section `data`"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"'{path}' does not exist")):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path)  # a folder is not a configuration file


def test_negative_max_angular_fails_at_load_time_not_in_the_backbone():
    """It used to pass and crash later with `max() arg is an empty sequence`."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(model={"max_angular": -1}))
    assert str(info.value) == "`model.max_angular` is -1 but must be at least 0"


@pytest.mark.parametrize("width", [0.0, -0.5, 3.0, 4.0])
def test_cutoff_width_must_be_inside_the_cutoff(width):
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(model={"cutoff": 3.0, "cutoff_width": width}))
    assert str(info.value) == (
        f"`model.cutoff_width` is {width!r} but must be between 0 and "
        "`model.cutoff` (3.0), both excluded"
    )


def test_smallest_valid_model_hypers_are_accepted():
    model = {
        "max_radial": 0,
        "max_angular": 0,
        "hidden_sizes": [1],
        "cutoff_width": 2.99,
        "cutoff": 3.0,
    }
    config = config_from_dict(minimal(model=model))
    assert config.model.max_angular == 0 and config.model.max_radial == 0
    assert config.model.hidden_sizes == [1]


# ----------------------------------------------------------------- device --
@pytest.mark.parametrize("device", ["gpu", "GPU", "cuda:-1", "cuda:x", "mps", ""])
def test_device_is_checked_at_load_time(device):
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(training={"device": device}))
    assert str(info.value) == (
        f"`training.device` is {device!r} but must be 'cpu', 'cuda' or 'cuda:N' "
        "(N: the index of a GPU, from 0)"
    )


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:3"])
def test_valid_devices_are_accepted_without_checking_for_a_gpu(device):
    assert config_from_dict(minimal(training={"device": device})).training.device == (
        device
    )


# ------------------------------------------------------------ warm-up --
@pytest.mark.parametrize("strategy", ["energy_nll", "energy_force_nll", "finetune"])
@pytest.mark.parametrize("warmup", [10, 12])
def test_warmup_covering_all_epochs_is_rejected_for_probabilistic_strategies(
    strategy, warmup
):
    raw = minimal(
        training={
            "strategy": strategy,
            "epochs": 10,
            "warmup_epochs": warmup,
            "init_from": "start.ckpt",
        }
    )
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert str(info.value) == (
        f"`training.warmup_epochs` is {warmup} but `training.epochs` is 10: strategy "
        f"'{strategy}' would train only the MSE warm-up and never its probabilistic "
        "loss; set `training.warmup_epochs` below `training.epochs` (or null for "
        "the default)"
    )
    raw["training"]["warmup_epochs"] = 9
    assert config_from_dict(raw).training.warmup_epochs == 9
    raw["training"]["warmup_epochs"] = None
    raw["training"]["epochs"] = 1  # null: 1 // 5 = 0 epochs of warm-up
    assert config_from_dict(raw).training.warmup_epochs is None


@pytest.mark.parametrize("strategy", ["mse", "deep_ensemble"])
def test_warmup_is_irrelevant_for_mse_strategies(strategy):
    raw = minimal(training={"strategy": strategy, "epochs": 3, "warmup_epochs": 3})
    assert config_from_dict(raw).training.warmup_epochs == 3


def test_warmup_check_follows_the_first_stage_of_the_protocol():
    training = {"strategy": "protocol", "epochs": 4, "warmup_epochs": 4}
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(training=training, protocol={"first": "energy_nll"}))
    assert str(info.value).startswith(
        "`training.warmup_epochs` is 4 but `training.epochs` is 4: the first stage "
        "'energy_nll' of strategy 'protocol' (`protocol.first`) would train only "
        "the MSE warm-up"
    )
    # an mse first stage has no warm-up; the fine-tune stage sets its own (0)
    config = config_from_dict(minimal(training=training, protocol={"first": "mse"}))
    assert config.protocol.first == "mse"


# ----------------------------------------------------- choices (Literal types) --
def literal_fields():
    """(section, key, choices) of every key whose allowed values are choices."""
    found = []
    for section in dataclasses.fields(Config):
        for item in dataclasses.fields(section.type):
            values = choices(item.type)
            if values:
                found.append((section.name, item.name, values))
    return found


def test_choices_are_declared_as_literal_types():
    keys = {f"{section}.{key}" for section, key, _ in literal_fields()}
    assert keys == {
        "training.strategy",
        "training.lr_schedule",
        "training.energy_loss",
        "training.forces_loss",
        "training.finetune_target",
        "training.dtype",
        "training.select_epoch",
        "laplace.regularizer",
        "laplace.features",
        "protocol.first",
        "protocol.finetune_target",
    }


@pytest.mark.parametrize(("section", "key", "values"), literal_fields())
def test_every_choice_is_accepted_and_others_are_named_in_the_message(
    section, key, values
):
    for value in values:
        raw = minimal(**{section: {key: value}})
        if value in ("laplace", "random_heads", "finetune"):
            raw["training"]["init_from"] = "start.ckpt"
        if value == "from_metatomic":
            raw["model"] = {"from_metatomic": "model.pt"}
        if key == "strategy" and value == "mse":
            raw["model"] = {"num_members": 1}
        config = config_from_dict(raw)
        assert getattr(getattr(config, section), key) == value
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(**{section: {key: "typo"}}))
    message = str(info.value)
    assert message.startswith(f"`{section}.{key}` is 'typo' but must be ")
    listed = message.split(" but must be ")[1].removeprefix("one of: ")
    names = [n for n in re.split(r", | or ", listed) if n != "a number"]
    assert names == list(values)


def test_loss_choices_are_the_registered_losses():
    from shallow_ensemble import losses
    from shallow_ensemble.config import EnergyLossName, ForcesLossName

    assert get_args(EnergyLossName) == losses.ENERGY_LOSS_NAMES
    assert get_args(ForcesLossName) == losses.FORCE_LOSS_NAMES
    assert losses.ENERGY_LOSS_NAMES == tuple(losses.ENERGY_LOSSES)
    assert losses.FORCE_LOSS_NAMES == tuple(losses.FORCE_LOSSES)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (
            "energy_loss",
            "gaussian_nll",
            "`training.energy_loss` is 'gaussian_nll' but must be "
            "gaussian_nll_ensemble or gaussian_crps_ensemble",
        ),
        (
            "forces_loss",
            "gaussian_crps",
            "`training.forces_loss` is 'gaussian_crps' but must be one of: "
            "gaussian_nll_ensemble, gaussian_nll_full_ensemble, "
            "gaussian_crps_ensemble",
        ),
    ],
)
def test_a_misspelt_loss_fails_at_load_time(key, value, expected):
    """It used to pass, and fail after the warm-up epochs."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(training={key: value}))
    assert str(info.value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("fit", "fit"), (0.5, 0.5), ("1e-3", 1e-3)],
)
def test_laplace_regularizer_is_a_choice_or_a_number(value, expected):
    config = config_from_dict(minimal(laplace={"regularizer": value}))
    assert config.laplace.regularizer == expected


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("best", "auto, fit or a number"),
        (True, "auto, fit or a number"),
        (0.0, "auto, fit or a positive number"),
        (-1, "auto, fit or a positive number"),
    ],
)
def test_laplace_regularizer_errors(value, rule):
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(laplace={"regularizer": value}))
    shown = float(value) if isinstance(value, int) and value is not True else value
    assert str(info.value) == f"`laplace.regularizer` is {shown!r} but must be {rule}"


def test_type_checks_read_the_annotations_not_their_text():
    """``_check_type`` takes the annotation objects apart (unions, ``Literal``,
    ``list[int]``), so annotations written in other ways check the same."""
    from typing import Literal, Optional, Union

    from shallow_ensemble.config.checks import _check_type

    assert _check_type("a.b", None, Optional[int]) is None  # noqa: UP045
    assert _check_type("a.b", 3, Union[int, None]) == 3  # noqa: UP007
    assert _check_type("a.b", 3, Literal["x"] | float) == 3.0
    assert _check_type("a.b", [1, 2], list[int]) == [1, 2]
    with pytest.raises(ConfigError, match="must be x, y or null"):
        _check_type("a.b", "z", Literal["x", "y"] | None)
    with pytest.raises(ConfigError, match="must be a list of integers or null"):
        _check_type("a.b", ["1"], list[int] | None)


@pytest.mark.parametrize("kind", ["pet", "metatomic", "stacked"])
def test_model_kind_must_be_trainable_from_scratch(kind):
    """Unknown kinds, and kinds that are only built from trained models (a wrapped
    metatomic model, a stacked deep ensemble), are refused at load time."""
    with pytest.raises(ConfigError, match=f"`model.kind` is '{kind}'.*soap_bpnn"):
        config_from_dict(minimal(model={"kind": kind}))
    assert config_from_dict(minimal(model={"kind": "soap_bpnn"})).model.kind == (
        "soap_bpnn"
    )
