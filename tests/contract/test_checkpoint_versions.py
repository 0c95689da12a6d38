"""Checkpoints of every format version keep loading and predicting the same numbers.

``tests/data/*_v1.ckpt`` were written by the code of checkpoint format 1 (see
``tests/data/readme.txt``), with their predictions on ethanol frame 0 in
``tests/data/checkpoints_v1.json``.
"""

import json
from pathlib import Path

import ase.io
import pytest
import torch

from conftest import ETHANOL
from shallow_ensemble.data import GraphDataset, collate, read_structures
from shallow_ensemble.export import to_atomistic_model
from shallow_ensemble.export.predict import run_model
from shallow_ensemble.kinds import get_kind
from shallow_ensemble.training.checkpoints import (
    VERSION,
    CheckpointError,
    checkpoint_cutoff,
    load_model,
    read_checkpoint,
    save_checkpoint,
)


DATA = Path(__file__).parents[1] / "data"
EXPECTED = json.loads((DATA / "checkpoints_v1.json").read_text())
KINDS = {
    "soap_bpnn_v1": "soap_bpnn",
    "stacked_v1": "stacked",
    "metatomic_v1": "metatomic",
}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_version_1_checkpoints_load_and_predict_the_same(name, tmp_path):
    path = DATA / f"{name}.ckpt"
    assert torch.load(path, weights_only=False)["version"] == 1
    payload = read_checkpoint(path)
    assert payload["version"] == VERSION
    assert payload["hypers"]["kind"] == KINDS[name]
    assert checkpoint_cutoff(path) == 3.5

    model = load_model(path)
    assert type(model) is get_kind(KINDS[name])
    expected = EXPECTED[name]
    assert model.num_members == expected["num_members"]
    graph = GraphDataset(read_structures(ETHANOL)[:1], 3.5)[0]
    prediction = model.predict(collate([graph]), forces="members")
    torch.testing.assert_close(
        prediction.energies[0].detach(),
        torch.tensor(expected["energies"], dtype=torch.float64),
        rtol=1e-12,
        atol=1e-9,
    )
    torch.testing.assert_close(
        prediction.forces.detach(),
        torch.tensor(expected["forces"], dtype=torch.float64),
        rtol=1e-9,
        atol=1e-11,
    )
    results, _ = run_model(
        to_atomistic_model(model),
        [ase.io.read(ETHANOL, "0")],
        {"energy_ensemble": "system"},
    )
    torch.testing.assert_close(
        results["energy_ensemble"].block().values[0],
        torch.tensor(expected["exported_energy_ensemble"], dtype=torch.float64),
        rtol=1e-12,
        atol=1e-9,
    )

    # saved again, it is a current checkpoint of the same model
    save_checkpoint(tmp_path / "again.ckpt", model)
    assert torch.load(tmp_path / "again.ckpt", weights_only=False)["version"] == VERSION
    again = load_model(tmp_path / "again.ckpt")
    for key, value in again.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_newer_and_broken_versions_are_refused(tmp_path):
    payload = torch.load(DATA / "soap_bpnn_v1.ckpt", weights_only=False)
    for version, message in [
        (VERSION + 1, "written by a newer shallow-ensemble"),
        (None, "no valid checkpoint version"),
    ]:
        torch.save({**payload, "version": version}, tmp_path / "model.ckpt")
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / "model.ckpt")
    hypers = {**payload["hypers"], "backbone": "unknown"}
    torch.save({**payload, "hypers": hypers}, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match="unknown backbone 'unknown'"):
        load_model(tmp_path / "model.ckpt")
