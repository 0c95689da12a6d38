"""Extending an exported metatomic model into a shallow ensemble (no metatrain needed).

The wrapped model is one of our own exports, which declares its per-atom last-layer
features as ``mtt::aux::energy_last_layer_features`` (as metatrain models do).
"""

import ase
import numpy as np
import pytest
import torch
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelOutput,
    load_atomistic_model,
)

from conftest import ETHANOL, assert_selected_atoms_sum_to_whole, make_model
from shallow_ensemble.backbones.metatomic_model import (
    MetatomicModelError,
    check_capabilities,
)
from shallow_ensemble.config import ConfigError, config_from_dict
from shallow_ensemble.data import GraphDataset, collate, read_structures
from shallow_ensemble.export import export_model
from shallow_ensemble.export.predict import load_exported, run_model
from shallow_ensemble.extended import ExtendedModel, extend_metatomic_model
from shallow_ensemble.training import load_model, run_protocol
from shallow_ensemble.training.initialization import (
    init_data_dependent,
    laplace_heads,
)


MEMBERS = 6


@pytest.fixture(scope="module")
def base_model(structures):
    """An (untrained) ensemble whose composition baseline fits ethanol energies."""
    model = make_model([1, 6, 8], num_members=3)
    init_data_dependent(model, GraphDataset(structures[:16], model.backbone.cutoff))
    return model


@pytest.fixture(scope="module")
def base_file(base_model, tmp_path_factory):
    return export_model(base_model, tmp_path_factory.mktemp("base") / "base.pt")


@pytest.fixture(scope="module")
def structures():
    return read_structures(ETHANOL)


@pytest.fixture(scope="module")
def datasets(base_model, structures):
    cutoff = base_model.backbone.cutoff
    return {
        "train": GraphDataset(structures[:16], cutoff),
        "valid": GraphDataset(structures[16:24], cutoff),
        "test": GraphDataset(structures[24:28], cutoff),
    }


@pytest.fixture(scope="module")
def laplace_model(base_file, datasets):
    model = extend_metatomic_model(base_file, datasets["train"])
    laplace_heads(
        model,
        datasets["train"],
        datasets["valid"],
        num_members=MEMBERS,
        regularizer="auto",
        per_atom=False,
        seed=0,
    )
    return model


def test_wrapped_energy_is_the_original_before_and_after_laplace(
    base_model, base_file, datasets, laplace_model
):
    batch = collate([datasets["test"][i] for i in range(4)])
    reference = base_model.predict(batch)
    wrapped = extend_metatomic_model(base_file, datasets["train"])
    assert isinstance(wrapped, ExtendedModel) and wrapped.num_members == 1
    before = wrapped.predict(batch, forces="mean")
    after = laplace_model.predict(batch, forces="members")
    expected = reference.energies.mean(dim=1).detach()
    # float64 sums of ~ -4200 eV in another order: relative 1e-12 (~4e-9 eV)
    torch.testing.assert_close(
        before.energies[:, 0].detach(), expected, rtol=1e-12, atol=0
    )
    assert laplace_model.num_members == MEMBERS
    torch.testing.assert_close(
        after.energies.mean(dim=1).detach(),
        before.energies[:, 0].detach(),
        rtol=1e-13,
        atol=0,
    )
    assert bool((after.energies.std(dim=1) > 1e-6).all())
    # forces: the original exported model run as an engine runs it (autograd of its
    # energy), then the members, whose deviations have zero mean
    frames = [datasets["test"][i] for i in range(4)]
    atoms = [
        ase.Atoms(numbers=g.numbers.numpy(), positions=g.positions.numpy())
        for g in frames
    ]
    results, systems = run_model(
        load_exported(base_file),
        atoms,
        {"energy": "system"},
        positions_requires_grad=True,
    )
    energy = results["energy"].block().values.sum()
    gradients = torch.autograd.grad(energy, [s.positions for s in systems])
    original = -torch.cat(gradients)
    torch.testing.assert_close(before.forces[0], original, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        after.forces.mean(dim=0), before.forces[0], rtol=0, atol=1e-12
    )
    assert float(after.forces.std(dim=0).mean()) > 1e-6


def test_member_forces_match_finite_differences(laplace_model, datasets):
    batch = collate([datasets["test"][0]])
    forces = laplace_model.predict(batch, forces="members").forces
    h = 1e-5
    for atom, axis in ((0, 0), (4, 2)):
        energies = []
        for sign in (1, -1):
            shifted = collate([datasets["test"][0]])
            shifted.positions = shifted.positions.clone()
            shifted.positions[atom, axis] += sign * h
            energies.append(laplace_model.predict(shifted).energies[0].detach())
        numeric = -(energies[0] - energies[1]) / (2 * h)
        torch.testing.assert_close(forces[:, atom, axis], numeric, rtol=1e-6, atol=1e-7)


def test_batched_and_looped_member_forces_agree(laplace_model, datasets):
    batch = collate([datasets["test"][i] for i in range(2)])
    batched = laplace_model.predict(batch, forces="members").forces
    assert laplace_model._batched_forces  # our exports support the vmapped route
    laplace_model._batched_forces = False
    try:
        looped = laplace_model.predict(batch, forces="members").forces
    finally:
        laplace_model._batched_forces = None
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def extended_file(laplace_model, tmp_path_factory):
    model = laplace_model
    model.alpha_energy.fill_(1.5)
    model.alpha_forces.fill_(0.7)
    return export_model(model, tmp_path_factory.mktemp("ext") / "extended.pt")


def test_export_contract(extended_file, base_file, ethanol_frames):
    model = load_exported(extended_file)
    base = load_exported(base_file)
    outputs = model.capabilities().outputs
    assert {"energy", "energy_uncertainty", "energy_ensemble"} <= set(outputs)
    # the wrapped TorchScript module travels inside the new model
    assert model.module.model.backbone.module.original_name == "ExportedEnsemble"
    frames = ethanol_frames[30:32]
    for kind in ("system", "atom"):
        names = {"energy": kind, "energy_ensemble": kind, "energy_uncertainty": kind}
        results, _ = run_model(model, frames, names)
        original, _ = run_model(base, frames, {"energy": kind})
        torch.testing.assert_close(
            results["energy"].block().values,
            original["energy"].block().values,
            rtol=0,
            atol=1e-10,
        )
        ensemble = results["energy_ensemble"].block().values
        assert ensemble.shape[1] == MEMBERS
        torch.testing.assert_close(
            ensemble.mean(dim=1, keepdim=True), results["energy"].block().values
        )
    # per-atom uncertainty together with a per-system ensemble
    together, _ = run_model(
        model, frames, {"energy_uncertainty": "atom", "energy_ensemble": "system"}
    )
    alone, _ = run_model(model, frames, {"energy_ensemble": "system"})
    torch.testing.assert_close(
        together["energy_ensemble"].block().values,
        alone["energy_ensemble"].block().values,
    )
    assert together["energy_uncertainty"].block().values.shape == (18, 1)


def test_export_selected_atoms_sum_to_whole(extended_file, ethanol_frames):
    model = load_exported(extended_file)
    atoms = ethanol_frames[40]
    assert_selected_atoms_sum_to_whole(model, atoms)


def test_ase_md_with_the_extended_model(extended_file, ethanol_frames):
    from ase import units
    from ase.md.verlet import VelocityVerlet
    from metatomic_ase import MetatomicCalculator

    atoms = ethanol_frames[0].copy()
    # the untrained base model is far off: no threshold warning
    atoms.calc = MetatomicCalculator(extended_file, uncertainty_threshold=1e6)
    VelocityVerlet(atoms, 0.5 * units.fs).run(5)
    energy = atoms.get_potential_energy()
    assert np.isfinite(energy) and np.isfinite(atoms.get_forces()).all()
    results, _ = run_model(
        load_exported(extended_file), [atoms], {"energy_uncertainty": "system"}
    )
    assert float(results["energy_uncertainty"].block().values[0, 0]) > 0


def _modified_copy(path, tmp_path, outputs):
    """The model at ``path`` re-saved with other declared outputs."""
    atomistic = load_atomistic_model(str(path))
    old = atomistic.capabilities()
    capabilities = ModelCapabilities(
        outputs=outputs,
        atomic_types=old.atomic_types,
        interaction_range=old.interaction_range,
        length_unit=old.length_unit,
        supported_devices=old.supported_devices,
        dtype=old.dtype,
    )
    copy = AtomisticModel(atomistic.module, atomistic.metadata(), capabilities)
    copy.save(str(tmp_path / "modified.pt"))
    return tmp_path / "modified.pt"


def test_errors_for_models_that_cannot_be_extended(base_file, datasets, tmp_path):
    outputs = dict(load_atomistic_model(str(base_file)).capabilities().outputs)
    no_features = {
        k: v for k, v in outputs.items() if k != "mtt::aux::energy_last_layer_features"
    }
    path = _modified_copy(base_file, tmp_path, outputs=no_features)
    with pytest.raises(MetatomicModelError, match="no last-layer features output"):
        extend_metatomic_model(path, datasets["train"])

    kcal = dict(outputs)
    kcal["energy"] = ModelOutput(unit="kcal/mol", sample_kind="atom")
    path = _modified_copy(base_file, tmp_path, outputs=kcal)
    with pytest.raises(MetatomicModelError, match="energy unit is 'kcal/mol'"):
        extend_metatomic_model(path, datasets["train"])

    # (a model declaring nm cannot be re-saved from an angstrom one: check directly)
    nm = ModelCapabilities(outputs=outputs, length_unit="nm", dtype="float64")
    with pytest.raises(MetatomicModelError, match="length unit is 'nm'"):
        check_capabilities(nm)

    silicon = read_structures(str(ETHANOL).replace("ethanol", "silicon"))[:2]
    with pytest.raises(MetatomicModelError, match=r"atomic types \[14\]"):
        extend_metatomic_model(base_file, GraphDataset(silicon, 3.5))

    with pytest.raises(MetatomicModelError, match="does not exist"):
        extend_metatomic_model(tmp_path / "missing.pt", datasets["train"])


def test_configuration_checks(tmp_path):
    data = {"train": "a.xyz", "valid": 0.1}
    with pytest.raises(ConfigError, match="set `model.from_metatomic`"):
        config_from_dict({"data": data, "training": {"strategy": "from_metatomic"}})
    with pytest.raises(ConfigError, match="does not use it"):
        config_from_dict(
            {
                "data": data,
                "model": {"from_metatomic": "model.pt"},
                "training": {"strategy": "mse"},
            }
        )


@pytest.mark.parametrize("target", ["heads", "full"])
def test_protocol_with_pinned_mean_keeps_the_mean(base_file, tmp_path, target):
    """from_metatomic -> laplace -> fine-tune with the mean pinned: the mean energies
    and forces stay the original model's, the members move; with ``full`` the wrapped
    model itself is trained too (a frozen copy gives the mean), also in the export."""
    import ase.io

    frames = ase.io.read(ETHANOL, ":24")
    ase.io.write(tmp_path / "train.xyz", frames[:16])
    ase.io.write(tmp_path / "valid.xyz", frames[16:])
    config = config_from_dict(
        {
            "data": {
                "train": str(tmp_path / "train.xyz"),
                "valid": str(tmp_path / "valid.xyz"),
            },
            "model": {"from_metatomic": str(base_file), "num_members": 4},
            "training": {
                "strategy": "protocol",
                "batch_size": 8,
                "dtype": "float64",
                "pin_mean": True,
            },
            "protocol": {"finetune_epochs": 2, "finetune_target": target},
        }
    )
    result = run_protocol(config, tmp_path / "run", progress=False)
    assert set(result.info["stages"]) == {"from_metatomic", "laplace", "finetune"}
    laplace = load_model(tmp_path / "run" / "2-laplace" / "model.ckpt")
    final = load_model(result.checkpoint)
    assert isinstance(final, ExtendedModel) and final.num_members == 4
    assert len(final.originals) == (1 if target == "full" else 0)
    moved = [
        float((a - b).detach().abs().max())
        for a, b in zip(
            laplace.backbone.parameters(), final.backbone.parameters(), strict=True
        )
    ]
    assert (max(moved) > 1e-8) == (target == "full")
    cutoff = laplace.backbone.cutoff
    batch = collate(GraphDataset(read_structures(ETHANOL)[30:34], cutoff).graphs)
    before = laplace.predict(batch, forces="members")
    after = final.predict(batch, forces="members")
    assert (after.energies - before.energies).abs().max() > 1e-6  # members trained
    assert (after.forces - before.forces).abs().max() > 1e-6
    torch.testing.assert_close(
        after.energies.mean(dim=1), before.energies.mean(dim=1), rtol=0, atol=1e-9
    )
    torch.testing.assert_close(
        after.forces.mean(dim=0), before.forces.mean(dim=0), rtol=0, atol=1e-9
    )
    assert 0 < result.calibration["alpha_forces"] < 1e3
    # the exported model gives the same mean energy
    path = export_model(final, tmp_path / "final.pt")
    outputs, _ = run_model(load_exported(path), frames[:2], {"energy": "system"})
    with torch.no_grad():
        expected = final.predict(
            collate(
                GraphDataset(read_structures(tmp_path / "train.xyz")[:2], cutoff).graphs
            )
        ).energies.mean(dim=1)
    torch.testing.assert_close(
        outputs["energy"].block().values[:, 0], expected, rtol=1e-10, atol=1e-8
    )


def test_example_configuration_through_the_command_line(base_file, tmp_path, capsys):
    """examples/extend-metatomic.yaml, shortened, with `train`, `export`, `evaluate`;
    a clear error for a model without last-layer features."""
    import json
    import shutil
    from pathlib import Path

    import ase.io

    from shallow_ensemble.cli.__main__ import main

    example = Path(__file__).parents[2] / "examples" / "extend-metatomic.yaml"
    shutil.copy(example, tmp_path / "config.yaml")
    shutil.copy(base_file, tmp_path / "model.pt")
    frames = ase.io.read(ETHANOL, ":28")
    ase.io.write(tmp_path / "train.xyz", frames[:16])
    ase.io.write(tmp_path / "valid.xyz", frames[16:24])
    ase.io.write(tmp_path / "test.xyz", frames[24:])
    overrides = ["--set", "model.num_members=4", "--set", "protocol.finetune_epochs=1"]
    run = tmp_path / "run"
    assert (
        main(["train", str(tmp_path / "config.yaml"), "-o", str(run), *overrides]) == 0
    )
    assert main(["export", str(run / "model.ckpt"), "-o", str(tmp_path / "x.pt")]) == 0
    report = tmp_path / "test.json"
    command = ["evaluate", str(tmp_path / "x.pt"), str(tmp_path / "test.xyz")]
    assert main([*command, "--json", str(report)]) == 0
    metrics = json.loads(report.read_text())
    assert metrics["forces"]["rmse"] > 0 and np.isfinite(metrics["forces"]["rll"])

    outputs = dict(load_atomistic_model(str(base_file)).capabilities().outputs)
    del outputs["mtt::aux::energy_last_layer_features"]
    _modified_copy(base_file, tmp_path, outputs).replace(tmp_path / "model.pt")
    capsys.readouterr()
    assert (
        main(["train", str(tmp_path / "config.yaml"), "-o", str(tmp_path / "r2")]) == 1
    )
    assert "no last-layer features output" in capsys.readouterr().err
