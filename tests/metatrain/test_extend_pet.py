"""Extending a PET model trained and exported by metatrain (runs when it is installed).

A tiny PET is trained with ``mtt train`` on bundled ethanol structures (once per
session), wrapped, given Laplace heads, fine-tuned briefly, calibrated and exported;
the export runs ASE molecular dynamics.
"""

import subprocess
import sys

import ase.io
import numpy as np
import pytest
import torch
import yaml
from metatomic.torch import AtomisticModel, ModelCapabilities, load_atomistic_model

from conftest import ETHANOL, SILICON, assert_selected_atoms_sum_to_whole
from shallow_ensemble.backbones.metatomic_model import MetatomicModelError
from shallow_ensemble.config import config_from_dict
from shallow_ensemble.data import GraphDataset, read_structures
from shallow_ensemble.export import export_model
from shallow_ensemble.export.predict import load_exported, run_model
from shallow_ensemble.extended import ExtendedModel, extend_metatomic_model
from shallow_ensemble.training import load_model, run_protocol


pytest.importorskip("metatrain")

PET = {
    "cutoff": 4.0,
    "d_pet": 8,
    "d_head": 8,
    "d_node": 16,
    "d_feedforward": 16,
    "num_heads": 1,
    "num_attention_layers": 1,
    "num_gnn_layers": 1,
}


BOTH = {"energy": "system", "energy_ensemble": "system"}


def _targets(path):
    return {
        "systems": {"read_from": str(path), "length_unit": "angstrom"},
        "targets": {
            "energy": {"key": "energy", "unit": "eV", "forces": {"key": "forces"}}
        },
    }


@pytest.fixture(scope="session")
def pet_run(tmp_path_factory):
    """``mtt train`` of a tiny PET (2 epochs on 16 structures): its folder."""
    folder = tmp_path_factory.mktemp("pet")
    frames = ase.io.read(ETHANOL, ":32")
    ase.io.write(folder / "train.xyz", frames[:16])
    ase.io.write(folder / "valid.xyz", frames[16:24])
    ase.io.write(folder / "test.xyz", frames[24:32])
    options = {
        "seed": 0,
        "architecture": {
            "name": "pet",
            "model": PET,
            "training": {"batch_size": 8, "num_epochs": 2, "learning_rate": 3e-3},
        },
        "training_set": _targets(folder / "train.xyz"),
        "validation_set": _targets(folder / "valid.xyz"),
        "test_set": 0.0,
    }
    with open(folder / "options.yaml", "w") as fd:
        yaml.safe_dump(options, fd)
    process = subprocess.run(
        [sys.executable, "-m", "metatrain", "train", "options.yaml", "-o", "pet.pt"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return folder


def _float64_original(path, tmp_path):
    """The exported model with its module in float64 (an engine-side reference)."""
    atomistic = load_atomistic_model(str(path))
    old = atomistic.capabilities()
    outputs = {k: v for k, v in old.outputs.items() if k != "features"}  # deprecated
    capabilities = ModelCapabilities(
        outputs=outputs,
        atomic_types=old.atomic_types,
        interaction_range=old.interaction_range,
        length_unit=old.length_unit,
        supported_devices=old.supported_devices,
        dtype="float64",
    )
    module = atomistic.module.to(torch.float64)
    return AtomisticModel(module, atomistic.metadata(), capabilities)


def _protocol(pet_run, name, **protocol):
    config = config_from_dict(
        {
            "data": {
                "train": str(pet_run / "train.xyz"),
                "valid": str(pet_run / "valid.xyz"),
                "test": str(pet_run / "test.xyz"),
            },
            "model": {"from_metatomic": str(pet_run / "pet.pt"), "num_members": 4},
            "training": {
                "strategy": "protocol",
                "batch_size": 8,
                "dtype": "float64",
                "pin_mean": protocol.pop("pin_mean", False),
            },
            "protocol": {"finetune_epochs": 1, **protocol},
        }
    )
    return run_protocol(config, pet_run / name, overwrite=True, progress=False)


@pytest.fixture(scope="session")
def full_run(pet_run):
    return _protocol(pet_run, "full", finetune_target="full")


def test_mean_energy_is_the_original_before_finetune(pet_run, full_run, tmp_path):
    frames = ase.io.read(pet_run / "test.xyz", ":")
    original, _ = run_model(
        _float64_original(pet_run / "pet.pt", tmp_path), frames, {"energy": "system"}
    )
    reference = original["energy"].block().values[:, 0]
    float32, _ = run_model(
        load_exported(pet_run / "pet.pt"), frames, {"energy": "system"}
    )
    # the float32 original agrees to its own precision
    assert (float32["energy"].block().values[:, 0] - reference).abs().max() < 2e-3

    for stage in ("1-from_metatomic", "2-laplace"):
        model = load_model(pet_run / "full" / stage / "model.ckpt")
        assert isinstance(model, ExtendedModel)
        path = export_model(model, tmp_path / f"{stage}.pt")
        results, _ = run_model(load_exported(path), frames, BOTH)
        energy = results["energy"].block().values[:, 0]
        torch.testing.assert_close(energy, reference, rtol=1e-12, atol=0)
        if stage == "2-laplace":
            spread = results["energy_ensemble"].block().values.std(dim=1)
            assert model.num_members == 4 and bool((spread > 0).all())

    # the full fine-tune trained the wrapped PET's parameters too
    laplace = load_model(pet_run / "full" / "2-laplace" / "model.ckpt")
    final = load_model(full_run.checkpoint)
    before = dict(laplace.backbone.module.named_parameters())
    changed = [
        name
        for name, value in final.backbone.module.named_parameters()
        if not torch.equal(value, before[name])
    ]
    assert len(changed) > 0


def test_heads_only_finetune_with_pinned_mean(pet_run, tmp_path):
    result = _protocol(pet_run, "heads", finetune_target="heads", pin_mean=True)
    laplace = load_model(pet_run / "heads" / "2-laplace" / "model.ckpt")
    final = load_model(result.checkpoint)
    frames = ase.io.read(pet_run / "test.xyz", ":")
    energies = {}
    for name, model in (("laplace", laplace), ("final", final)):
        path = export_model(model, tmp_path / f"{name}.pt")
        results, _ = run_model(load_exported(path), frames, BOTH)
        energies[name] = results
    torch.testing.assert_close(
        energies["final"]["energy"].block().values,
        energies["laplace"]["energy"].block().values,
        rtol=1e-12,
        atol=0,
    )
    members = [energies[n]["energy_ensemble"].block().values for n in energies]
    assert (members[0] - members[1]).abs().max() > 1e-8  # the heads were trained


def test_export_contract_and_ase_md(pet_run, full_run, tmp_path):
    from ase import units
    from ase.md.verlet import VelocityVerlet
    from metatomic_ase import MetatomicCalculator

    path = export_model(load_model(full_run.checkpoint), tmp_path / "extended.pt")
    model = load_exported(path)
    assert model.module.model.backbone.module.original_name == "PET"
    atoms = ase.io.read(pet_run / "test.xyz", "0")
    for kind in ("system", "atom"):
        run_model(
            model,
            [atoms],
            {"energy": kind, "energy_uncertainty": kind, "energy_ensemble": kind},
        )
    assert_selected_atoms_sum_to_whole(model, atoms)

    atoms.calc = MetatomicCalculator(
        path, uncertainty_threshold=1e6, do_gradients_with_energy=False
    )  # a molecule has no stress (the virial over a zero volume)
    VelocityVerlet(atoms, 0.5 * units.fs).run(5)
    assert np.isfinite(atoms.get_potential_energy())
    assert np.isfinite(atoms.get_forces()).all()
    results, _ = run_model(model, [atoms], {"energy_uncertainty": "system"})
    assert float(results["energy_uncertainty"].block().values[0, 0]) > 0


def test_other_atomic_types_are_an_error(pet_run):
    silicon = GraphDataset(read_structures(SILICON)[:2], 4.0)
    with pytest.raises(MetatomicModelError, match=r"atomic types \[14\]"):
        extend_metatomic_model(pet_run / "pet.pt", silicon)


def test_training_mode_does_not_change_the_wrapped_model(pet_run, full_run):
    """metatrain models leave out their composition baseline in training mode; the
    adapter keeps the wrapped module in evaluation mode while the heads train."""
    from shallow_ensemble.data import collate

    model = load_model(pet_run / "full" / "2-laplace" / "model.ckpt")
    graphs = GraphDataset(read_structures(str(pet_run / "train.xyz"))[:4], 4.0).graphs
    batch = collate(graphs)
    model.eval()
    reference = model.predict(batch, forces="members")
    model.train()
    assert model.training and not model.backbone.module.training
    training = model.predict(batch, forces="members")
    torch.testing.assert_close(
        training.energies, reference.energies, rtol=1e-12, atol=1e-9
    )
    torch.testing.assert_close(training.forces, reference.forces, rtol=0, atol=1e-9)
