"""docs/configuration.md is generated from the docstrings of the configuration's
fields, and the committed file is the current one."""

import dataclasses
from pathlib import Path

import pytest

from shallow_ensemble import losses
from shallow_ensemble.config import Config, configuration_reference
from shallow_ensemble.config.reference import main


REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_committed_reference_is_current():
    assert REFERENCE.read_text() == configuration_reference(), (
        "docs/configuration.md is stale: rewrite it with "
        "`python -m shallow_ensemble.config docs/configuration.md`"
    )


def sections():
    return [(f.name, f.type) for f in dataclasses.fields(Config)]


@pytest.mark.parametrize(("section", "cls"), sections())
def test_every_key_has_a_heading_and_a_description(section, cls):
    text = configuration_reference()
    assert f"\n## `{section}`\n" in text
    for item in dataclasses.fields(cls):
        heading = f"\n### `{section}.{item.name}`\n\n"
        assert heading in text
        entry = text.split(heading)[1].split("\n### ")[0].split("\n## ")[0]
        allowed, description = entry.strip().split("\n\n", 1)
        assert allowed.startswith("Allowed: ")
        assert "Default: " in allowed or "Required." in allowed
        assert len(description) > 10
        assert "``" not in description and ":py:" not in description


def entry(key):
    text = configuration_reference()
    return text.split(f"### `{key}`\n\n")[1].split("\n")[0]


def test_choices_come_from_the_annotations():
    strategies = entry("training.strategy")
    for name in ("mse", "protocol", "deep_ensemble", "from_metatomic"):
        assert f"`{name}`" in strategies
    assert "Default: `energy_force_nll`." in strategies
    for name in losses.FORCE_LOSS_NAMES:
        assert f"`{name}`" in entry("training.forces_loss")
    for name in losses.ENERGY_LOSS_NAMES:
        assert f"`{name}`" in entry("training.energy_loss")
    assert entry("laplace.regularizer").startswith("Allowed: `auto`, `fit` or number.")
    assert entry("data.train") == "Allowed: string. Required."
    assert entry("training.warmup_epochs") == (
        "Allowed: integer or `null`. Default: `null`."
    )
    assert entry("model.hidden_sizes") == (
        "Allowed: list of integers. Default: `[128, 64]`."
    )
    assert entry("calibration.enabled") == (
        "Allowed: `true` or `false`. Default: `true`."
    )


def test_main_writes_the_reference(tmp_path, capsys):
    path = tmp_path / "configuration.md"
    assert main([str(path)]) == 0
    assert path.read_text() == configuration_reference()
    assert capsys.readouterr().out == ""
    assert main([]) == 0
    assert capsys.readouterr().out == configuration_reference()
