"""Noise-floor calibration, sigma^2 = alpha^2 sigma_ens^2 + (w sigma_0)^2: closed
forms of the fit, its NLL optimality, predictions calibrated by construction, and the
floors carried by checkpoints and exported models."""

import math

import pytest
import torch

from conftest import make_model
from shallow_ensemble.calibration.noise_floor import (
    NoiseFloors,
    fit_noise_floor,
    floored_std,
    select_noise_floor,
)
from shallow_ensemble.calibration.predictions import (
    EnsemblePredictions,
    _members_factor,
    evaluate_predictions,
    fit_calibration,
    noise_floors,
    predict_dataset,
)
from shallow_ensemble.calibration.recalibrate import fit_alpha
from shallow_ensemble.data import GraphDataset, read_structures
from shallow_ensemble.errors import CalibrationError
from shallow_ensemble.export import export_model
from shallow_ensemble.export.predict import load_exported, predict_frames, run_model
from shallow_ensemble.training import load_model
from shallow_ensemble.training.checkpoints import (
    read_checkpoint,
    save_checkpoint,
    upgrade_checkpoint,
)


DTYPE = torch.float64


def _random(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dtype=DTYPE, generator=generator)


def _nll(y, mean, std):
    return float(torch.mean(0.5 * torch.log(std**2) + (y - mean) ** 2 / (2 * std**2)))


def test_errors_proportional_to_the_spread_need_no_floor():
    # e_i^2 = c sigma_i^2 for every i: v_i = e_i^2 is each term's own optimum
    std = torch.linspace(0.1, 2.0, 50, dtype=DTYPE)
    errors = 1.7 * std * torch.sign(_random(50))
    alpha, floors = fit_noise_floor(errors, torch.zeros(50, dtype=DTYPE), std)
    assert floors == [0.0]
    assert alpha == pytest.approx(1.7, rel=1e-12)
    assert alpha == pytest.approx(fit_alpha(errors, torch.zeros(50, dtype=DTYPE), std))


def test_a_group_without_spread_gets_the_rms_of_its_errors():
    std = torch.cat([torch.linspace(0.1, 2.0, 40, dtype=DTYPE), torch.zeros(30)])
    errors = torch.cat([0.8 * std[:40] * torch.sign(_random(40)), 0.05 * _random(30)])
    weight = torch.cat([torch.ones(40), torch.linspace(1.0, 4.0, 30)])
    groups = torch.cat([torch.zeros(40), torch.ones(30)]).long()
    alpha, floors = fit_noise_floor(
        errors, torch.zeros(70, dtype=DTYPE), std, weight, groups, n_groups=3
    )
    assert alpha == pytest.approx(0.8, rel=1e-10)
    # closed form sigma_0^2 = <e^2 / w^2> over the group; no floor elsewhere
    expected = math.sqrt(float(torch.mean((errors[40:] / weight[40:]) ** 2)))
    assert floors[1] == pytest.approx(expected, rel=1e-8)
    assert floors[0] == 0.0
    assert floors[2] == 0.0  # a group without components


def test_the_fit_is_the_nll_minimum():
    std = torch.exp(_random(400, seed=1))
    y = torch.sqrt((1.3 * std) ** 2 + 0.7**2) * _random(400, seed=2)
    mean = torch.zeros(400, dtype=DTYPE)
    alpha, (floor,) = fit_noise_floor(y, mean, std)
    best = _nll(y, mean, floored_std(std, alpha, floor))
    # no point of a fine grid around the fit, and not the factor alone, does better
    assert best <= _nll(y, mean, fit_alpha(y, mean, std) * std)
    for a in torch.linspace(0.8 * alpha, 1.2 * alpha, 41):
        for s in torch.linspace(0.8 * floor, 1.2 * floor, 41):
            assert best <= _nll(y, mean, floored_std(std, float(a), float(s))) + 1e-12
    # and its stationarity: <z^2> = 1 at an interior optimum
    z = y / floored_std(std, alpha, floor)
    assert float(torch.mean(z**2)) == pytest.approx(1.0, rel=1e-6)


def test_known_scale_and_floor_are_recovered():
    n = 200_000
    std = 0.1 * torch.exp(1.5 * _random(n, seed=3))
    weight = torch.randint(1, 50, (n,), generator=torch.Generator().manual_seed(4))
    y = torch.sqrt((2.0 * std) ** 2 + (weight * 0.01) ** 2) * _random(n, seed=5)
    alpha, (floor,) = fit_noise_floor(
        y, torch.zeros(n, dtype=DTYPE), std, weight=weight.double()
    )
    # statistical error of a 200k-sample fit: well under 1 %
    assert alpha == pytest.approx(2.0, rel=0.01)
    assert floor == pytest.approx(0.01, rel=0.02)


def test_fit_noise_floor_rejects_inputs_without_any_spread():
    with pytest.raises(CalibrationError, match="no component has an ensemble spread"):
        fit_noise_floor(_random(5), torch.zeros(5, dtype=DTYPE), torch.zeros(5))
    with pytest.raises(CalibrationError, match="same number of elements"):
        fit_noise_floor(_random(5), torch.zeros(4, dtype=DTYPE), torch.ones(5))


def test_held_out_data_decide_whether_a_floor_is_kept():
    n = 2000
    folds = torch.arange(n) % 5
    mean = torch.zeros(n, dtype=DTYPE)
    std = torch.exp(_random(n, seed=6))
    # errors with a floor: kept, and fitted on all the data
    y = torch.sqrt((1.2 * std) ** 2 + 0.8**2) * _random(n, seed=7)
    assert select_noise_floor(y, mean, std, folds) == fit_noise_floor(y, mean, std)
    # errors proportional to the spread: the factor alone
    y = 1.2 * std * _random(n, seed=8)
    alpha, floors = select_noise_floor(y, mean, std, folds)
    assert floors == [0.0]
    assert alpha == pytest.approx(fit_alpha(y, mean, std), rel=1e-12)
    # without folds, no floor unless one is needed (whatever the sign of the NLL:
    # errors in large units make it positive)
    single = torch.zeros(n, dtype=torch.long)
    assert select_noise_floor(1e3 * y, mean, 1e3 * std, single)[1] == [0.0]
    # components with an error but no spread need the floor, even without folds
    std[:10] = 0.0
    alpha, floors = select_noise_floor(y, mean, std, torch.zeros(n, dtype=torch.long))
    assert floors[0] > 0
    with pytest.raises(CalibrationError, match="one entry per component"):
        select_noise_floor(y, mean, std, folds[:5])


def test_a_floor_never_replaces_the_ensemble_spread():
    # errors unrelated to the spread: the NLL puts everything into the floor and
    # alpha -> 0; the ensemble's spread is kept, at its own factor
    n = 500
    folds = torch.arange(n) % 5
    mean = torch.zeros(n, dtype=DTYPE)
    std = torch.exp(2.0 * _random(n, seed=9))
    y = _random(n, seed=10)
    alpha_in_sample, _ = fit_noise_floor(y, mean, std)
    assert alpha_in_sample < 1e-2 * fit_alpha(y, mean, std)
    assert select_noise_floor(y, mean, std, folds) == (fit_alpha(y, mean, std), [0.0])
    # with components that need a floor (no spread, an error): the floor is fitted
    # at the factor alone, for their group only
    std[:50] = 0.0
    groups = (torch.arange(n) < 50).long()
    alpha, floors = select_noise_floor(y, mean, std, folds, groups=groups, n_groups=2)
    assert alpha == pytest.approx(fit_alpha(y[50:], mean[50:], std[50:]), rel=1e-12)
    assert floors[0] == 0.0
    assert floors[1] == pytest.approx(float(y[:50].pow(2).mean().sqrt()), rel=1e-8)


def test_the_fit_escapes_the_minimum_where_the_floor_explains_everything():
    # a few components with almost no spread and an error make the mean of
    # e^2/sigma^2 huge; started there, the descent ended at alpha ~ 1e-10 with the
    # floor explaining all errors. The true scale 1 and floor 0.01 must be found.
    n = 3000
    mean = torch.zeros(n, dtype=DTYPE)
    std = torch.exp(_random(n, seed=11)) * torch.where(torch.arange(n) < 2000, 0.01, 1)
    std[2000:2030:5] = 1e-9
    y = torch.sqrt(std**2 + 0.01**2) * _random(n, seed=12)
    alpha, (floor,) = fit_noise_floor(y, mean, std)
    assert alpha == pytest.approx(1.0, rel=0.03)
    assert floor == pytest.approx(0.01, rel=0.03)
    assert _nll(y, mean, floored_std(std, alpha, floor)) <= _nll(
        y, mean, floored_std(std, 1.0, 0.01)
    )


def test_a_shared_floor_serves_a_group_whose_few_flat_components_are_held_out():
    # both groups have errors with a floor of 0.01; group 1 has a larger spread except
    # on 6 components, all in fold 0: fitted on the other folds, a floor of its own
    # is zero and those components cost more than everything else gains, while one
    # floor for both groups (fitted mostly on group 0) covers them
    n = 3000
    folds = torch.arange(n) % 5
    mean = torch.zeros(n, dtype=DTYPE)
    groups = (torch.arange(n) >= 2000).long()
    std = torch.exp(_random(n, seed=11)) * torch.where(groups == 0, 0.01, 1.0)
    flat = torch.arange(2000, 2030, 5)  # fold 0
    std[flat] = 1e-9
    y = torch.sqrt(std**2 + 0.01**2) * _random(n, seed=12)
    per_group = fit_noise_floor(y, mean, std, groups=groups, n_groups=2)
    assert per_group[1][0] != per_group[1][1]
    alpha, floors = select_noise_floor(y, mean, std, folds, groups=groups, n_groups=2)
    assert (alpha, floors) == fit_noise_floor(y, mean, std)[:1] + (
        [fit_noise_floor(y, mean, std)[1][0]] * 2,
    )
    assert floors[0] == floors[1] == pytest.approx(0.01, rel=0.1)
    # where the groups' floors differ and every fold shows it: one floor per group
    y = torch.sqrt(std**2 + torch.where(groups == 0, 0.01, 0.5) ** 2) * _random(n, 13)
    assert select_noise_floor(
        y, mean, std, folds, groups=groups, n_groups=2
    ) == fit_noise_floor(y, mean, std, groups=groups, n_groups=2)


def _t(values):
    return torch.tensor(values, dtype=DTYPE)


def _by_construction(n_atoms=4000, seed=0, flat=0.0):
    """One-atom structures of H and O; H forces have a spread and errors drawn with
    exactly that std, O forces (a high-symmetry site) have a spread ``flat`` (none by
    default) and errors of std 0.2 eV/Å. Energies: errors drawn with 1.5x the
    (varied) spread."""
    generator = torch.Generator().manual_seed(seed)
    numbers = torch.where(torch.arange(n_atoms) % 3 == 0, 8, 1)
    members = 8
    noise = torch.randn(members, n_atoms, 3, dtype=DTYPE, generator=generator)
    noise = (noise - noise.mean(0)) / noise.std(0)  # exactly unit spread
    scale = 0.05 + 0.5 * torch.rand(n_atoms, 1, dtype=DTYPE, generator=generator)
    forces = noise * scale
    oxygen = numbers == 8
    forces[:, oxygen] = 0.3 + flat * noise[:, oxygen]  # (nearly) all members alike
    errors = torch.randn(n_atoms, 3, dtype=DTYPE, generator=generator)
    errors = torch.where((numbers == 8).unsqueeze(-1), 0.2 * errors, scale * errors)
    e_noise = torch.randn(n_atoms, members, dtype=DTYPE, generator=generator)
    e_noise = (e_noise - e_noise.mean(1, keepdim=True)) / e_noise.std(1, keepdim=True)
    e_scale = 0.02 + 0.2 * torch.rand(n_atoms, dtype=DTYPE, generator=generator)
    atomic = e_scale.unsqueeze(-1) * e_noise
    energy_ref = 1.5 * e_scale * torch.randn(n_atoms, dtype=DTYPE, generator=generator)
    return EnsemblePredictions(
        energies=atomic.clone(),
        energy_ref=energy_ref,
        n_atoms=torch.ones(n_atoms, dtype=torch.long),
        atomic=atomic,
        forces=forces,
        forces_ref=forces.mean(0) + errors,
        system_index=torch.arange(n_atoms),
        numbers=numbers,
    )


def test_nearly_flat_components_do_not_stretch_the_members():
    """O forces with a spread of 1e-6 eV/Å and errors of 0.2 eV/Å: the factor alone
    is driven to ~1e5 by them, which would make every H member spread 1e5x too
    wide; with the floor kept the members are stretched by the factor of the
    components the ensemble term rules (H: 1 by construction), and the calibrated H
    forces, members alone, have alpha 1."""
    predictions = _by_construction(flat=1e-6)
    plain = fit_calibration(predictions, noise_floor=False)
    assert plain["alpha_forces"] > 1e4
    fit = fit_calibration(predictions, noise_floor=True)
    assert fit["sigma0_forces"]["O"] == pytest.approx(0.2, rel=0.05)
    assert fit["alpha_forces"] == pytest.approx(1.0, abs=0.05)
    assert fit["floor_scale_forces"] == pytest.approx(1.0, abs=0.05)
    # the members stretched by alpha_forces, no floor: what an engine that sees only
    # the members gets; honest on H, overconfident on the flat O components
    report = evaluate_predictions(
        predictions.calibrated(fit["alpha_energy"], fit["alpha_forces"])
    )
    assert report["forces_by_element"]["H"]["alpha"] == pytest.approx(1.0, abs=0.05)
    assert report["forces_by_element"]["O"]["alpha"] > 1e4
    # the floor model: alpha_forces times floor_scale_forces on the spread
    floors = noise_floors(fit)
    floored = evaluate_predictions(
        predictions.calibrated(fit["alpha_energy"], fit["alpha_forces"], floors)
    )
    assert floored["forces"]["alpha"] == pytest.approx(1.0, abs=0.05)


def test_members_factor_closed_form():
    """The members' factor is fitted on the components the ensemble term rules
    (alpha * std >= floor, with a spread) only; without any, the factor alone."""
    reference = _t([2.0, 3.0, 0.5, 0.5])
    mean = torch.zeros(4, dtype=DTYPE)
    std = _t([1.0, 1.0, 1e-6, 0.0])
    floor = torch.full((4,), 0.1, dtype=DTYPE)
    # components 0 and 1: z^2 = 4 and 9, so alpha = sqrt(6.5)
    factor = _members_factor(reference, mean, std, floor, 1.0, 99.0)
    assert factor == pytest.approx(math.sqrt(6.5), rel=1e-12)
    assert _members_factor(reference, mean, std, 10 * floor + 1, 1.0, 99.0) == 99.0


def test_calibrated_by_construction_per_element():
    predictions = _by_construction()
    fit = fit_calibration(predictions, noise_floor=True)
    # the members' factor: the components with a spread (H), drawn with it
    assert fit["alpha_forces"] == pytest.approx(1.0, abs=0.05)
    assert fit["alpha_energy"] == pytest.approx(1.5, rel=0.05)
    # the floor model: O errors were drawn with std 0.2 and no spread
    assert fit["sigma0_forces"]["O"] == pytest.approx(0.2, rel=0.05)
    assert fit["sigma0_forces"]["H"] < 0.02
    assert fit["floor_scale_forces"] == pytest.approx(1.0, abs=0.05)
    floors = noise_floors(fit)
    assert floors.forces[8] == fit["sigma0_forces"]["O"]
    report = evaluate_predictions(
        predictions.calibrated(fit["alpha_energy"], fit["alpha_forces"], floors)
    )
    forces = report["forces"]
    n_oxygen = int((predictions.numbers == 8).sum()) * 3
    assert forces["n_zero_spread"] == n_oxygen
    # every component counts in the metrics, with its floor
    assert forces["n_scored"] == forces["n"]
    for element in ("H", "O"):
        assert report["forces_by_element"][element]["alpha"] == pytest.approx(
            1.0, abs=0.05
        ), element
    assert forces["alpha"] == pytest.approx(1.0, abs=0.05)
    # without the floors the O components have no uncertainty: left out
    plain = fit_calibration(predictions, noise_floor=False)
    assert plain["sigma0_forces"] == {}
    # the members: the factor of the components the ensemble rules, all H here
    assert plain["alpha_forces"] == pytest.approx(fit["alpha_forces"], rel=1e-12)
    report = evaluate_predictions(
        predictions.calibrated(plain["alpha_energy"], plain["alpha_forces"])
    )
    assert report["forces"]["n_scored"] == report["forces"]["n"] - n_oxygen


def test_floors_need_atomic_numbers():
    predictions = _by_construction(300)
    predictions.numbers = None
    with pytest.raises(CalibrationError, match="atomic numbers"):
        fit_calibration(predictions, noise_floor=True)


FLOORS = {
    "alpha_energy": 1.7,
    "alpha_forces": 0.6,
    "alpha_atom": 2.5,
    "sigma0_energy": 0.003,
    "sigma0_atom": 0.02,
    "sigma0_forces": {"H": 0.05, "O": 0.1},
    "floor_scale_energy": 0.9,
    "floor_scale_atom": 0.8,
    "floor_scale_forces": 0.7,
}


@pytest.fixture(scope="module")
def floored(tmp_path_factory):
    """A model with the calibration of FLOORS, as checkpoint and exported model."""
    model = make_model([1, 6, 8], num_members=5)
    model.set_calibration(FLOORS)
    folder = tmp_path_factory.mktemp("floors")
    save_checkpoint(folder / "model.ckpt", model, {"calibration": FLOORS})
    export_model(model, folder / "model.pt")
    return folder


def test_checkpoint_and_export_keep_the_floors(floored, ethanol_frames):
    model = load_model(floored / "model.ckpt")
    assert model.noise_floors() == NoiseFloors(
        energy=0.003,
        atom=0.02,
        forces={1: 0.05, 8: 0.1},
        energy_scale=0.9,
        atom_scale=0.8,
        forces_scale=0.7,
    )
    exported = load_exported(floored / "model.pt")
    frames = ethanol_frames[:3]
    raw = predict_dataset(
        model, GraphDataset(read_structures_of(frames), model.cutoff), 3
    )
    outputs, _ = run_model(
        exported, frames, {"energy_uncertainty": "atom", "energy_ensemble": "system"}
    )
    per_atom = outputs["energy_uncertainty"].block().values[:, 0]
    spread = raw.atomic.std(dim=1)
    torch.testing.assert_close(
        per_atom,
        torch.sqrt((0.8 * 2.5 * spread) ** 2 + 0.02**2),
        rtol=1e-10,
        atol=1e-12,
    )
    totals, _ = run_model(exported, frames, {"energy_uncertainty": "system"})
    members = outputs["energy_ensemble"].block().values  # stretched by alpha alone
    expected = torch.sqrt((0.9 * members.std(dim=1)) ** 2 + (9 * 0.003) ** 2)
    torch.testing.assert_close(
        totals["energy_uncertainty"].block().values[:, 0], expected
    )
    # the exported route and the checkpoint route report the same floors
    from_export = predict_frames(exported, frames)
    calibrated = raw.calibrated(1.7, 0.6, model.noise_floors())
    assert from_export.floors == calibrated.floors
    for route in (from_export, calibrated):
        _, std, spread = route.forces_mean_std()
        floor = torch.where(route.numbers == 1, 0.05, 0.0)
        floor = torch.where(route.numbers == 8, 0.1, floor).unsqueeze(-1)
        torch.testing.assert_close(std, torch.sqrt((0.7 * spread) ** 2 + floor**2))
    torch.testing.assert_close(
        from_export.forces_mean_std()[1], calibrated.forces_mean_std()[1]
    )
    torch.testing.assert_close(
        from_export.energy_mean_std()[1], calibrated.energy_mean_std()[1]
    )


def test_version_2_checkpoints_load_without_floors(floored):
    payload = read_checkpoint(floored / "model.ckpt")
    old = dict(payload, version=2, calibration=dict(FLOORS))
    old["state_dict"] = {
        k: v
        for k, v in payload["state_dict"].items()
        if not k.startswith(("sigma0", "floor_scale"))
    }
    for key in FLOORS:
        if not key.startswith("alpha"):
            del old["calibration"][key]
    upgraded = upgrade_checkpoint(old)
    assert upgraded["version"] == 3
    assert upgraded["calibration"]["sigma0_forces"] == {}
    assert float(upgraded["state_dict"]["sigma0_atom"]) == 0.0
    assert not bool(upgraded["state_dict"]["sigma0_forces"].any())
    assert upgraded["state_dict"]["sigma0_forces"].shape == (119,)
    assert float(upgraded["state_dict"]["floor_scale_forces"]) == 1.0
    assert upgraded["calibration"]["floor_scale_atom"] == 1.0


def read_structures_of(frames):
    import tempfile
    from pathlib import Path

    import ase.io

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "frames.xyz"
        ase.io.write(path, frames)
        return read_structures(path)
