"""``examples/active_learning.py`` runs for real (EMT labels, training, ML-driven
MD watched by the uncertainty monitor, selection, retraining) with tiny settings,
and the retrained model is better on held-out EMT MD frames."""

import importlib.util
import json
from pathlib import Path

import ase.io


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "active_learning.py"


def load_example():
    spec = importlib.util.spec_from_file_location("active_learning", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_active_learning_loop_improves_the_model(tmp_path):
    example = load_example()
    summary = example.main(
        ["--outdir", str(tmp_path), "--rounds", "1", "--epochs", "15"]
        + ["--initial", "8", "--test", "6", "--md-steps", "100", "--select", "8"]
    )
    before, after = summary["rounds"]
    print(json.dumps(summary))
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    # the selected frames were labelled and added to the training set
    selected = ase.io.read(tmp_path / "round-0" / "selected.xyz", ":")
    assert after["n_train"] == before["n_train"] + len(selected) > before["n_train"]
    assert all(frame.info["sigma_force_max"] > 0 for frame in selected)
    # retrained on them, the model is better on EMT MD at the same temperature,
    # and knows it
    assert after["force_rmse"] < 0.8 * before["force_rmse"]
    assert after["mean_max_force_sigma"] < before["mean_max_force_sigma"]
