"""Training with components that have no ensemble spread: an atom without neighbours
in the validation set, and a collapsed ensemble."""

import dataclasses
import json
import math

import ase
import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator

from conftest import ETHANOL, make_model, tiny_config
from shallow_ensemble.calibration.predictions import (
    evaluate_predictions,
    fit_calibration,
    predict_dataset,
)
from shallow_ensemble.config import CalibrationConfig
from shallow_ensemble.data import GraphDataset, read_structures
from shallow_ensemble.errors import CalibrationError
from shallow_ensemble.training import load_model, train


def lone_hydrogen() -> ase.Atoms:
    atom = ase.Atoms("H", positions=[[0.0, 0.0, 0.0]])
    atom.calc = SinglePointCalculator(atom, energy=-13.6, forces=np.zeros((1, 3)))
    return atom


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero_spread")
    frames = ase.io.read(ETHANOL, ":")
    ase.io.write(folder / "train.xyz", frames[:24])
    ase.io.write(folder / "valid.xyz", [*frames[100:108], lone_hydrogen()])
    return folder


@pytest.mark.parametrize("noise_floor", [False, True])
def test_training_with_a_lone_atom_in_validation(data, tmp_path, noise_floor):
    config = tiny_config(data, strategy="energy_force_nll")
    config = dataclasses.replace(
        config, calibration=CalibrationConfig(noise_floor=noise_floor)
    )
    result = train(config, tmp_path, progress=False)
    assert (tmp_path / "model.ckpt").is_file()
    with open(tmp_path / "metrics.json") as fd:
        metrics = json.load(fd)
    n_forces = (8 * 9 + 1) * 3
    for name in ("valid_uncalibrated", "valid_calibrated"):
        forces = metrics[name]["forces"]
        assert forces["n"] == n_forces
        # the three force components of the lone atom are zero in every member
        assert forces["n_zero_spread"] == 3, name
        assert forces["zero_spread_threshold"] > 0
        assert metrics[name]["energy"]["n_zero_spread"] == 0
    calibration = metrics["calibration"]
    alphas = {k: v for k, v in calibration.items() if k.startswith("alpha")}
    assert all(math.isfinite(v) and v > 0 for v in alphas.values())
    uncalibrated = metrics["valid_uncalibrated"]
    calibrated = metrics["valid_calibrated"]
    model = load_model(result.checkpoint)
    assert float(model.alpha_forces) == pytest.approx(alphas["alpha_forces"])
    # without a floor, the factors that stretch the members are those of the
    # components with a spread
    if calibration["sigma0_energy"] == 0:
        assert alphas["alpha_energy"] == pytest.approx(
            uncalibrated["energy"]["alpha"], rel=1e-12
        )
    floors = calibration["sigma0_forces"]
    if not floors:  # no floor (not asked for, or not kept)
        assert calibration["floor_scale_forces"] == 1.0
        assert alphas["alpha_forces"] == pytest.approx(
            uncalibrated["forces"]["alpha"], rel=1e-12
        )
        assert calibrated["forces"]["alpha"] == pytest.approx(1.0, rel=1e-9)
        return
    assert noise_floor
    assert set(floors) == {"H", "C", "O"}
    assert all(math.isfinite(v) and v >= 0 for v in floors.values())
    # the NLL optimum of the floor model has <z^2> = 1 over the components it was
    # fitted on; the lone atom's components (no spread, no error) are left out of
    # the fit, and count in the metrics with z = 0 if the H floor gives them an
    # uncertainty
    n_zero_z = 3 if floors["H"] > 0 else 0
    n_counted = n_forces - (0 if n_zero_z else 3)
    assert calibrated["forces"]["alpha"] == pytest.approx(
        math.sqrt((n_counted - n_zero_z) / n_counted), rel=1e-6
    )
    assert float(model.sigma0_forces[1]) == pytest.approx(floors["H"])
    assert float(model.floor_scale_forces) == pytest.approx(
        calibration["floor_scale_forces"]
    )


def test_identical_heads_cannot_be_calibrated(data):
    structures = read_structures(data / "valid.xyz")
    model = make_model([1, 6, 8], num_members=4)
    weight, bias = model.head.weight.detach(), model.head.bias.detach()
    model.head.set_members(weight[:1].repeat(4, 1), bias[:1].repeat(4))
    dataset = GraphDataset(structures, model.backbone.cutoff)
    predictions = predict_dataset(model, dataset, batch_size=4)
    report = evaluate_predictions(predictions)
    assert report["energy"]["n_zero_spread"] == report["energy"]["n"] == 9
    assert "alpha" not in report["energy"]
    with pytest.raises(CalibrationError, match="the 4 ensemble members predict the"):
        fit_calibration(predictions)


def test_one_member_model_is_not_a_collapsed_ensemble(data):
    structures = read_structures(data / "valid.xyz")
    model = make_model([1, 6, 8], num_members=1)
    dataset = GraphDataset(structures, model.backbone.cutoff)
    predictions = predict_dataset(model, dataset, batch_size=4)
    assert torch.all(predictions.forces[:, -1] == 0)  # the lone atom
    assert fit_calibration(predictions, noise_floor=True) == {
        "alpha_energy": 1.0,
        "alpha_forces": 1.0,
        "alpha_atom": 1.0,
        "sigma0_energy": 0.0,
        "sigma0_atom": 0.0,
        "sigma0_forces": {},
        "floor_scale_energy": 1.0,
        "floor_scale_atom": 1.0,
        "floor_scale_forces": 1.0,
    }
    assert set(evaluate_predictions(predictions)["forces"]) == {"rmse", "mae", "n"}
