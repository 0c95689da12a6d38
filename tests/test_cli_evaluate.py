"""``shallow-ensemble evaluate`` on awkward models and data: an atom without
neighbours, non-finite predictions, a one-member model, a collapsed ensemble, bad
output paths."""

import json
import math
import sys
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator

from cli_runner import assert_clean_error, run_main
from conftest import ETHANOL, make_model
from shallow_ensemble import workflows
from shallow_ensemble.training.checkpoints import save_checkpoint


ATOMIC_TYPES = [1, 6, 8]
PNG = b"\x89PNG\r\n\x1a\n"


def strict_json(path: Path) -> dict:
    """Load ``path``, failing on NaN or Infinity (not JSON)."""

    def reject(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=reject)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three ethanol frames and a lone hydrogen atom (frame 3): its forces are zero
    in every member."""
    folder = tmp_path_factory.mktemp("evaluate")
    frames = ase.io.read(ETHANOL, ":")[100:103]
    atom = ase.Atoms("H", positions=[[0.0, 0.0, 0.0]])
    atom.calc = SinglePointCalculator(atom, energy=-13.6, forces=np.zeros((1, 3)))
    ase.io.write(folder / "data.xyz", [*frames, atom])
    ase.io.write(folder / "one.xyz", frames[:1])
    return folder


def checkpoint(path: Path, num_members: int = 4, edit=None) -> Path:
    model = make_model(ATOMIC_TYPES, num_members=num_members)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    save_checkpoint(path, model)
    return path


@pytest.fixture(scope="module")
def ensemble(data) -> Path:
    return checkpoint(data / "ensemble.ckpt")


def test_atom_without_neighbours_is_reported_not_fatal(ensemble, data, tmp_path):
    run = run_main(
        [
            "evaluate",
            ensemble,
            data / "data.xyz",
            "--json",
            tmp_path / "out.json",
            "--plots",
            tmp_path / "plots",
        ]
    )
    assert run.code == 0, run.err
    report = strict_json(tmp_path / "out.json")
    forces = report["forces"]
    assert forces["n"] == (3 * 9 + 1) * 3
    assert forces["n_zero_spread"] == 3
    assert forces["zero_spread_threshold"] > 0
    assert math.isfinite(forces["alpha"]) and forces["alpha"] > 0
    # the lone atom has an energy spread: every structure counts
    assert report["energy"]["n_zero_spread"] == 0
    assert report["energy"]["n"] == 4
    assert "forces: 3 of 84 values without ensemble spread (std <= " in run.out
    for name in ("energy", "forces"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG
    assert (
        f"wrote {tmp_path / 'plots' / 'forces.png'} (3 components without spread "
        "only in the parity plot)" in run.out
    )


def test_undefined_metrics_are_json_null(ensemble, data, tmp_path):
    # one structure: every absolute error is the same, so the RLL is undefined
    run = run_main(
        ["evaluate", ensemble, data / "one.xyz", "--json", tmp_path / "out.json"]
    )
    assert run.code == 0, run.err
    text = (tmp_path / "out.json").read_text()
    report = strict_json(tmp_path / "out.json")
    assert report["energy"]["rll"] is None
    assert '"rll": null' in text
    assert math.isfinite(report["forces"]["rll"])


@pytest.mark.parametrize("kind", ["ckpt", "pt"])
def test_non_finite_predictions_name_the_structures(data, tmp_path, kind):
    def nan_carbon(model):
        # the energy of every structure with carbon becomes NaN; the lone H is fine
        model.head.composition[ATOMIC_TYPES.index(6)] = math.nan

    path = checkpoint(tmp_path / "nan.ckpt", edit=nan_carbon)
    if kind == "pt":
        from shallow_ensemble.export import export_model
        from shallow_ensemble.training import load_model

        path = export_model(load_model(path), tmp_path / "nan.pt")
    out = tmp_path / "out.json"
    run = run_main(["evaluate", path, data / "data.xyz", "--json", out, "--no-forces"])
    source = data / "data.xyz"
    assert_clean_error(
        run,
        "not finite",
        "3 of 4 structures",
        f"{source}:0, {source}:1, {source}:2;",
    )
    assert f"{source}:3" not in run.err
    assert not out.exists()


def test_one_member_model_draws_parity_plots(data, tmp_path):
    path = checkpoint(tmp_path / "one.ckpt", num_members=1)
    plots = tmp_path / "plots"
    out = tmp_path / "out.json"
    run = run_main(
        ["evaluate", path, data / "data.xyz", "--json", out, "--plots", plots]
    )
    assert run.code == 0, run.err
    for name in ("energy", "forces"):
        png = plots / f"{name}.png"
        assert png.read_bytes()[:8] == PNG
        assert f"wrote {png} (parity only: one-member model, no uncertainty)" in run.out
    assert set(strict_json(out)["forces"]) == {"rmse", "mae", "n"}


def test_collapsed_ensemble_evaluates_without_uncertainty(data, tmp_path):
    def identical_heads(model):
        head = model.head
        head.set_members(head.weight[:1].repeat(4, 1), head.bias[:1].repeat(4))

    path = checkpoint(tmp_path / "collapsed.ckpt", edit=identical_heads)
    plots = tmp_path / "plots"
    out = tmp_path / "out.json"
    run = run_main(
        ["evaluate", path, data / "data.xyz", "--json", out, "--plots", plots]
    )
    assert run.code == 0, run.err
    report = strict_json(out)
    for name, n in (("energy", 4), ("forces", 84)):
        assert report[name]["n_zero_spread"] == report[name]["n"] == n
        assert "alpha" not in report[name] and "nll" not in report[name]
        png = plots / f"{name}.png"
        assert png.read_bytes()[:8] == PNG
        assert f"wrote {png} (parity only: no ensemble spread on any component)" in (
            run.out
        )
    assert "forces: no ensemble spread on any of the 84 values" in run.out


@pytest.fixture
def no_prediction(monkeypatch):
    """Bad output paths must be found before the model runs."""

    def fail(*args, **kwargs):
        raise AssertionError("predicted before checking the output paths")

    monkeypatch.setattr(workflows.evaluation, "predict_structures", fail)


def test_json_naming_a_folder(no_prediction, ensemble, data, tmp_path):
    run = run_main(["evaluate", ensemble, data / "data.xyz", "--json", tmp_path])
    assert_clean_error(run, f"--json {tmp_path} is an existing folder", "name a file")


def test_json_under_a_file(no_prediction, ensemble, data, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker / "sub" / "out.json"
    run = run_main(["evaluate", ensemble, data / "data.xyz", "--json", out])
    assert_clean_error(run, f"--json {out} cannot be written", "is a file")


def test_plots_naming_a_file(no_prediction, ensemble, data, tmp_path):
    blocker = tmp_path / "plots.png"
    blocker.write_text("not a folder")
    out = tmp_path / "out.json"
    run = run_main(
        ["evaluate", ensemble, data / "data.xyz", "--json", out, "--plots", blocker]
    )
    assert_clean_error(run, f"--plots {blocker} is an existing file")
    assert not out.exists()


def test_plots_under_a_file(no_prediction, ensemble, data, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    run = run_main(
        ["evaluate", ensemble, data / "data.xyz", "--plots", blocker / "plots"]
    )
    assert_clean_error(run, "cannot be written", f"'{blocker}' is a file")


def test_plots_without_matplotlib(no_prediction, ensemble, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "out.json"
    run = run_main(
        ["evaluate", ensemble, data / "data.xyz", "--json", out, "--plots", tmp_path]
    )
    assert_clean_error(run, "--plots needs matplotlib", "shallow-ensemble[plots]")
    assert not out.exists()
