"""The ``shallow-ensemble`` command, driven in-process: train, evaluate, export."""

import csv
import json
import warnings
from pathlib import Path

import ase.io
import pytest

from cli_runner import assert_clean_error, run_main
from conftest import ETHANOL


DATA = Path(__file__).parent / "data"

CONFIG = """\
data:
  train: {train}
  valid: {valid}
model:
  num_members: 4
  cutoff: 3.5
  max_radial: 3
  max_angular: 2
  hidden_sizes: [16, 8]
training:
  strategy: energy_force_nll
  epochs: 5
  warmup_epochs: 1
  batch_size: 6
  dtype: float64
"""


def write_config(folder: Path, train: str = "train.xyz", valid: str = "valid.xyz"):
    path = folder / "config.yaml"
    path.write_text(CONFIG.format(train=train, valid=valid))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Config and data (16 train, 8 valid, 3 test ethanol frames); paths in the
    config are relative to it."""
    folder = tmp_path_factory.mktemp("cli")
    frames = ase.io.read(ETHANOL, ":")
    ase.io.write(folder / "train.xyz", frames[:16])
    ase.io.write(folder / "valid.xyz", frames[100:108])
    # few frames: the exported model's first calls are slow (TorchScript profiling)
    ase.io.write(folder / "test.xyz", frames[150:153])
    write_config(folder)
    return folder


@pytest.fixture(scope="module")
def trained(workdir):
    out = workdir / "out"
    run = run_main(
        ["train", workdir / "config.yaml", "-o", out, "--set", "training.epochs=2"]
    )
    return out, run


def test_train_writes_checkpoint_log_and_metrics(trained):
    out, run = trained
    assert run.code == 0, run.err
    for name in ("model.ckpt", "log.csv", "metrics.json"):
        assert (out / name).is_file(), name
    with open(out / "log.csv") as fd:
        epochs = [int(row["epoch"]) for row in csv.DictReader(fd)]
    assert epochs == [1, 2]  # the override beats `epochs: 5` of the file
    with open(out / "metrics.json") as fd:
        metrics = json.load(fd)
    assert set(metrics["calibration"]) == {
        "alpha_energy",
        "alpha_forces",
        "alpha_atom",
        "sigma0_energy",
        "sigma0_atom",
        "sigma0_forces",
        "floor_scale_energy",
        "floor_scale_atom",
        "floor_scale_forces",
    }
    # the metrics table: title, header and one row per quantity
    assert "valid calibrated:" in run.out
    header = next(line for line in run.out.splitlines() if "miscalibrati" in line)
    assert header.split() == ["rmse", "mae", "nll", "rll", "miscalibrati", "alpha"]
    rows = {
        line.split("]")[0] + "]": line for line in run.out.splitlines() if "]" in line
    }
    for label in ("energy [eV]", "energy_per_atom [eV/atom]", "forces [eV/A]"):
        assert label in rows
        assert len(rows[label].split("]")[1].split()) == 6
    rmse = float(rows["forces [eV/A]"].split("]")[1].split()[0])
    assert rmse == pytest.approx(
        metrics["valid_calibrated"]["forces"]["rmse"], rel=1e-3
    )
    assert f"wrote {out / 'model.ckpt'}" in run.out


def test_train_again_needs_resume(trained, workdir):
    out, _ = trained
    run = run_main(["train", workdir / "config.yaml", "-o", out])
    assert_clean_error(run, "--resume", str(out))


def evaluate(model: Path, data: Path, json_path: Path, *extra) -> dict:
    run = run_main(["evaluate", model, data, "--json", json_path, *extra])
    assert run.code == 0, run.err
    assert f"{model} on {data}:" in run.out
    with open(json_path) as fd:
        return json.load(fd)


def test_evaluate_checkpoint_writes_json_and_plots(trained, workdir, tmp_path):
    out, _ = trained
    report = evaluate(
        out / "model.ckpt",
        workdir / "valid.xyz",
        tmp_path / "j.json",
        "--plots",
        tmp_path / "plots",
    )
    assert report["n_structures"] == 8
    assert {"energy", "energy_per_atom", "forces"} <= set(report)
    keys = {"rmse", "mae", "nll", "crps", "rll", "miscalibration_area", "alpha", "n"}
    for quantity in ("energy", "forces"):
        assert keys <= set(report[quantity])
        assert report[quantity]["rmse"] > 0
    assert report["energy"]["n"] == 8
    assert report["forces"]["n"] == 8 * 9 * 3
    for name in ("energy.png", "forces.png"):
        png = tmp_path / "plots" / name
        assert png.is_file() and png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # calibrated on this very file during training: same numbers as metrics.json
    with open(out / "metrics.json") as fd:
        trained_metrics = json.load(fd)["valid_calibrated"]
    for quantity in ("energy", "forces"):
        for metric in ("rmse", "rll", "alpha"):
            assert report[quantity][metric] == pytest.approx(
                trained_metrics[quantity][metric], rel=1e-6
            )


@pytest.fixture(scope="module")
def exported(trained):
    out, _ = trained
    model = out / "model.pt"
    run = run_main(["export", out / "model.ckpt", "-o", model])
    assert run.code == 0, run.err
    assert f"wrote {model}" in run.out
    return model


def test_export_writes_a_self_contained_model(exported):
    assert exported.is_file() and exported.stat().st_size > 0
    assert not (exported.parent / "extensions").exists()


def test_exported_model_evaluates_like_the_checkpoint(
    trained, exported, workdir, tmp_path
):
    out, _ = trained
    data = workdir / "test.xyz"
    checkpoint = evaluate(out / "model.ckpt", data, tmp_path / "j.json")
    exported_report = evaluate(exported, data, tmp_path / "j2.json")
    assert exported_report["n_structures"] == 3
    for quantity in ("energy", "forces"):
        for metric in ("rmse", "mae", "rll", "nll", "alpha"):
            assert exported_report[quantity][metric] == pytest.approx(
                checkpoint[quantity][metric], rel=1e-6
            ), (quantity, metric)


def test_evaluate_exported_model_emits_no_warning(exported, workdir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(exported, workdir / "test.xyz", tmp_path / "j.json", "--no-forces")
    # e.g. torch.load's "looks like a TorchScript archive" when probing the file
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []


# ------------------------------------------------------------- error paths --
def test_missing_config_file(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    run = run_main(["train", missing, "-o", tmp_path / "out"])
    assert_clean_error(run, str(missing), "does not exist")
    assert not (tmp_path / "out").exists()


def test_invalid_config_key(workdir, tmp_path):
    run = run_main(
        ["train", workdir / "config.yaml", "-o", tmp_path, "--set", "model.heads=3"]
    )
    assert_clean_error(run, "unknown key `model.heads`", "allowed keys")


def test_malformed_override(workdir, tmp_path):
    run = run_main(
        [
            "train",
            workdir / "config.yaml",
            "-o",
            tmp_path,
            "--set",
            "model.hidden_sizes=[16, 8",
        ]
    )
    assert_clean_error(run, "model.hidden_sizes")


def test_training_file_with_nan_energy(workdir, tmp_path):
    config = write_config(
        tmp_path, train=str(DATA / "nan_energy.xyz"), valid=str(workdir / "valid.xyz")
    )
    run = run_main(["train", config, "-o", tmp_path / "out"])
    assert_clean_error(run, "nan_energy.xyz", "frame 1", "finite")
    assert not (tmp_path / "out" / "model.ckpt").exists()


def test_missing_training_file(tmp_path):
    config = write_config(tmp_path, train="missing.xyz", valid="also-missing.xyz")
    run = run_main(["train", config, "-o", tmp_path / "out"])
    assert_clean_error(
        run,
        str(tmp_path / "missing.xyz"),
        "`data.train` of the configuration",
        "not found",
    )


@pytest.mark.parametrize("model_name", ["model.ckpt", "model.pt"])
def test_evaluate_on_unknown_element(trained, exported, model_name, tmp_path):
    model = trained[0] / model_name
    run = run_main(
        ["evaluate", model, DATA / "unknown_element.xyz", "--json", tmp_path / "j.json"]
    )
    assert_clean_error(run, "`Cl` (Z=17)", "unknown_element.xyz:1", "[H, C, O]")
    assert not (tmp_path / "j.json").exists()


def test_evaluate_missing_model(workdir, tmp_path):
    run = run_main(["evaluate", tmp_path / "none.pt", workdir / "valid.xyz"])
    assert_clean_error(run, "none.pt", "does not exist")


def test_quickstart_runs_the_whole_workflow(tmp_path):
    """The README's first command, shortened: train, calibrate, export, ASE MD."""
    run = run_main(
        [
            "quickstart",
            "-o",
            tmp_path / "qs",
            "--steps",
            "20",
            "--set",
            "training.epochs=2",
            "--set",
            "training.warmup_epochs=1",
        ]
    )
    assert run.code == 0, run.err
    assert (tmp_path / "qs" / "model.ckpt").is_file()
    assert (tmp_path / "qs" / "model.pt").is_file()
    md_rows = [
        line.split()
        for line in run.out.splitlines()
        if line.strip() and line.split()[0] in ("0", "20")
    ]
    assert [row[0] for row in md_rows] == ["0", "20"]
    for row in md_rows:
        energy, sigma, sigma_max = (float(v) for v in row[1:4])
        assert -4300 < energy < -4100  # ethanol, eV
        assert sigma > 0 and sigma_max > 0


def test_train_output_is_an_existing_file(workdir, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    run = run_main(["train", workdir / "config.yaml", "-o", taken])
    assert_clean_error(run, str(taken), "existing file")
    run = run_main(["train", workdir / "config.yaml", "-o", taken / "run"])
    assert_clean_error(run, "cannot write to output folder", str(taken / "run"))


def test_export_output_problems_are_one_line(trained, tmp_path):
    out, _ = trained
    run = run_main(["export", out / "model.ckpt", "-o", tmp_path])
    assert_clean_error(run, "directory", str(tmp_path))
    (tmp_path / "file").write_text("a file")
    run = run_main(["export", out / "model.ckpt", "-o", tmp_path / "file" / "m.pt"])
    assert_clean_error(run, "existing file", str(tmp_path / "file"))


def test_quickstart_refuses_a_finished_run(trained, workdir):
    out, _ = trained
    before = (out / "model.ckpt").read_bytes()
    run = run_main(["quickstart", "-o", out])
    assert_clean_error(run, "--overwrite", str(out))
    assert (out / "model.ckpt").read_bytes() == before
