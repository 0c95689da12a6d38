"""The model contract (:py:class:`shallow_ensemble.kinds.ModelKind`), checked for every
registered model kind on a tiny instance of each: scripting, invariances,
smoothness at the cutoff, batched member forces, float32/float64, checkpoint and
export round trips (the exported outputs are the calibrated predictions).

A new kind must add a builder to ``BUILDERS``; a registered kind without one fails
:py:func:`test_every_registered_kind_is_checked`.
"""

import copy

import ase
import numpy as np
import pytest
import torch
from metatomic.torch import systems_to_torch
from scipy.spatial.transform import Rotation
from tiny_backbone import PairGaussians, PairGaussiansModel
from vesin.metatomic import NeighborList

from conftest import ETHANOL, make_model
from shallow_ensemble.data import (
    GraphDataset,
    Structure,
    build_graph,
    collate,
    read_structures,
)
from shallow_ensemble.export import export_model, to_atomistic_model
from shallow_ensemble.export.predict import load_exported, run_model
from shallow_ensemble.kinds import ModelKind, calibrate_members, get_kind, kind_names
from shallow_ensemble.training.checkpoints import (
    VERSION,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from shallow_ensemble.training.initialization import stack_models


TYPES = [1, 6, 8]
ALPHAS = {"alpha_energy": 1.3, "alpha_forces": 0.7, "alpha_atom": 2.1}
#: noise floors: energy per atom (eV/atom), per-atom uncertainty (eV), forces
FLOORS = {
    "sigma0_energy": 0.002,
    "sigma0_atom": 0.03,
    "sigma0_forces": {"H": 0.04},
    "floor_scale_energy": 0.8,
    "floor_scale_atom": 0.9,
    "floor_scale_forces": 0.7,
}
FEATURES = "mtt::aux::energy_last_layer_features"


# ----------------------------------------------------------- tiny models per kind --
def soap_bpnn(tmp_path):
    return make_model(TYPES, num_members=4)


def stacked(tmp_path):
    members = [make_model(TYPES, num_members=1, seed=k) for k in range(3)]
    for member in members[1:]:
        member.head.composition.copy_(members[0].head.composition)
    return stack_models(members)


def metatomic(tmp_path):
    from shallow_ensemble.extended import extend_metatomic_model

    base = export_model(make_model(TYPES, num_members=1, seed=5), tmp_path / "base.pt")
    train_set = GraphDataset(read_structures(ETHANOL)[:4], 3.5)
    model = extend_metatomic_model(base, train_set)
    generator = torch.Generator().manual_seed(0)
    size = model.head.feature_size
    model.head.set_members(
        torch.randn(4, size, generator=generator, dtype=torch.float64),
        torch.randn(4, generator=generator, dtype=torch.float64),
    )
    return model


def pair_gaussians(tmp_path):
    torch.manual_seed(0)
    backbone = PairGaussians(TYPES, 3.5, [0.7, 1.2, 1.8, 2.5])
    model = PairGaussiansModel(backbone, 4).to(torch.float64)
    with torch.no_grad():
        model.head.bias.normal_()
        model.head.composition.normal_()
    return model


BUILDERS = {
    "soap_bpnn": soap_bpnn,
    "stacked": stacked,
    "metatomic": metatomic,
    "pair_gaussians": pair_gaussians,
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model(request, tmp_path_factory) -> ModelKind:
    model = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    assert model.kind == request.param
    with torch.no_grad():
        model.set_calibration({**ALPHAS, **FLOORS})
    return model.eval()


def test_every_registered_kind_is_checked():
    assert set(kind_names()) == set(BUILDERS)
    assert "stacked" not in kind_names(from_scratch=True)
    assert "metatomic" not in kind_names(from_scratch=True)
    assert {"soap_bpnn", "pair_gaussians"} <= set(kind_names(from_scratch=True))
    for name in BUILDERS:
        assert issubclass(get_kind(name), ModelKind)


# -------------------------------------------------------------------- helpers --
def batch_of(frames, cutoff, dtype=torch.float64, requires_grad=False):
    """A training batch of ASE structures (positions that may require grad)."""
    structures = [
        Structure(
            numbers=atoms.numbers.astype(np.int64),
            positions=atoms.positions,
            cell=atoms.cell.array,
            pbc=atoms.pbc,
            energy=None,
            forces=None,
            source=f"frame {i}",
        )
        for i, atoms in enumerate(frames)
    ]
    batch = collate([build_graph(s, cutoff) for s in structures]).to(dtype=dtype)
    if requires_grad:
        batch.positions = batch.positions.clone().requires_grad_(True)
    return batch


def systems_of(frames, module, dtype=torch.float64):
    """metatomic systems of ASE structures, with the neighbour lists of ``module``."""
    systems = systems_to_torch(frames, dtype=dtype)
    for options in module.requested_neighbor_lists():
        NeighborList(options, "angstrom").add_neighbor_list(systems)
    return systems


def members_and_forces(model, frames, cutoff=None):
    """Member energies ``(n_systems, M)`` and member forces ``(M, n_atoms, 3)``."""
    batch = batch_of(frames, cutoff or model.cutoff)
    prediction = model.predict(batch, forces="members")
    return prediction.energies.detach(), prediction.forces.detach()


@pytest.fixture(scope="module")
def periodic_box():
    """18 H and O atoms at random in a periodic 6 A cube."""
    rng = np.random.default_rng(1)
    return ase.Atoms(
        numbers=[8, 1, 1] * 6,
        positions=rng.uniform(0, 6.0, size=(18, 3)),
        cell=np.eye(3) * 6.0,
        pbc=True,
    )


# ------------------------------------------------------------------- the checks --
def test_scripted_module_equals_eager(model, ethanol_frames, periodic_box):
    module = model.exported_module()
    scripted = torch.jit.script(module)
    systems = systems_of([ethanol_frames[0], periodic_box], module)
    with torch.no_grad():
        eager = module(systems)
        script = scripted(systems)
    n_atoms = 9 + 18
    assert eager[0].shape == (n_atoms, model.num_members)
    assert eager[1].shape[0] == n_atoms
    for a, b in zip(script, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_rotation_and_translation_invariance(model, periodic_box):
    energies, forces = members_and_forces(model, [periodic_box])
    rotation = Rotation.from_rotvec([0.3, -1.1, 0.7]).as_matrix()
    moved = periodic_box.copy()
    moved.positions = periodic_box.positions @ rotation.T + np.array([0.3, -2.0, 1.5])
    moved.cell = periodic_box.cell.array @ rotation.T
    moved_energies, moved_forces = members_and_forces(model, [moved])
    torch.testing.assert_close(moved_energies, energies, rtol=1e-11, atol=1e-10)
    rotated = forces @ torch.tensor(rotation.T)
    torch.testing.assert_close(moved_forces, rotated, rtol=1e-8, atol=1e-10)


def test_permutation_invariance(model, ethanol_frames):
    atoms = ethanol_frames[3]
    energies, forces = members_and_forces(model, [atoms])
    order = np.random.default_rng(0).permutation(len(atoms))
    permuted_energies, permuted_forces = members_and_forces(model, [atoms[order]])
    torch.testing.assert_close(permuted_energies, energies, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(permuted_forces, forces[:, order], rtol=1e-9, atol=1e-12)


def test_smooth_at_the_cutoff(model):
    """Energies and forces go continuously to their isolated-atom values as a
    neighbour crosses the cutoff."""
    values = []
    for r in (model.cutoff - 1e-6, model.cutoff + 1e-6):
        dimer = ase.Atoms("OH", positions=[[0, 0, 0], [r, 0, 0]])
        # the graph's pairs reach beyond the cutoff: the model must ignore them
        values.append(members_and_forces(model, [dimer], cutoff=model.cutoff + 0.5))
    (inside, inside_forces), (outside, outside_forces) = values
    assert float((inside - outside).abs().max()) < 1e-8
    assert float(inside_forces.abs().max()) < 1e-5
    assert float(outside_forces.abs().max()) == 0.0


def test_batched_member_forces_equal_a_loop_over_members(model, ethanol_frames):
    frames = [ethanol_frames[1], ethanol_frames[7]]
    batch = batch_of(frames, model.cutoff)
    batched = model.predict(batch, forces="members").forces
    mean = model.predict(batch, forces="mean").forces
    grad_batch = batch_of(frames, model.cutoff, requires_grad=True)
    energies = model.predict(grad_batch).energies
    loop = torch.stack(
        [
            -torch.autograd.grad(e, grad_batch.positions, retain_graph=True)[0]
            for e in energies.sum(dim=0)
        ]
    )
    assert batched.shape == (model.num_members, 18, 3)
    torch.testing.assert_close(batched, loop, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(mean[0], loop.mean(dim=0), rtol=1e-9, atol=1e-11)


def test_float32_matches_float64(model, ethanol_frames, tmp_path):
    frames = ethanol_frames[:2]
    reference = model.predict(batch_of(frames, model.cutoff), forces="members")
    with torch.no_grad():  # copies of TorchScript parameters would not be leaves
        single = copy.deepcopy(model).to(torch.float32)
    prediction = single.predict(
        batch_of(frames, model.cutoff, dtype=torch.float32), forces="members"
    )
    assert prediction.energies.dtype == prediction.forces.dtype == torch.float32
    torch.testing.assert_close(
        prediction.energies.double(), reference.energies, rtol=1e-6, atol=1e-3
    )
    torch.testing.assert_close(
        prediction.forces.double(), reference.forces, rtol=1e-3, atol=1e-4
    )
    # and exported in float32 (from the float64 model)
    path = export_model(model, tmp_path / "float32.pt", dtype="float32")
    results, _ = run_model(load_exported(path), frames, {"energy": "system"})
    assert results["energy"].block().values.dtype == torch.float32
    torch.testing.assert_close(
        results["energy"].block().values[:, 0].double(),
        reference.energies.mean(dim=1),
        rtol=1e-6,
        atol=1e-3,
    )


def test_checkpoint_round_trip(model, ethanol_frames, tmp_path):
    save_checkpoint(tmp_path / "model.ckpt", model)
    payload = read_checkpoint(tmp_path / "model.ckpt")
    assert payload["version"] == VERSION
    assert payload["hypers"]["kind"] == model.kind
    assert payload["cutoff"] == model.cutoff
    reloaded = load_model(tmp_path / "model.ckpt")
    assert type(reloaded) is type(model)
    assert reloaded.hypers() == model.hypers()
    state = model.state_dict()
    assert reloaded.state_dict().keys() == state.keys()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    batch = batch_of(ethanol_frames[:2], model.cutoff)
    expected = model.predict(batch, forces="members")
    result = reloaded.eval().predict(batch, forces="members")
    torch.testing.assert_close(result.energies, expected.energies, rtol=0, atol=0)
    torch.testing.assert_close(result.forces, expected.forces, rtol=0, atol=0)


OUTPUTS = ["energy", "energy_ensemble", "energy_uncertainty"]


def test_export_round_trip(model, ethanol_frames, periodic_box, tmp_path):
    """Eager, scripted and reloaded exports agree, and their outputs are the
    calibrated predictions of the model, member forces included."""
    frames = [ethanol_frames[2], periodic_box]
    eager = to_atomistic_model(model)
    reloaded = load_exported(export_model(model, tmp_path / "model.pt"))
    results = {}
    for name, exported in [
        ("eager", eager),
        ("scripted", torch.jit.script(eager)),
        ("reloaded", reloaded),
    ]:
        per_system, systems = run_model(
            exported,
            frames,
            dict.fromkeys(OUTPUTS, "system"),
            positions_requires_grad=True,
        )
        ensemble = per_system["energy_ensemble"].block().values
        positions = [s.positions for s in systems]
        forces = torch.stack(
            [
                -torch.cat(torch.autograd.grad(e, positions, retain_graph=True))
                for e in ensemble.sum(dim=0)
            ]
        )
        per_atom, _ = run_model(
            exported, frames, dict.fromkeys([*OUTPUTS, FEATURES], "atom")
        )
        values = {f"{k}/system": v.block().values for k, v in per_system.items()}
        values.update({f"{k}/atom": v.block().values for k, v in per_atom.items()})
        values["forces"] = forces
        results[name] = {k: v.detach() for k, v in values.items()}
    for name in ("scripted", "reloaded"):
        for key, value in results["eager"].items():
            torch.testing.assert_close(
                results[name][key], value, rtol=1e-12, atol=1e-12, msg=key
            )

    # the calibrated predictions of the model
    got = results["eager"]
    batch = batch_of(frames, model.cutoff)
    prediction = model.predict(batch, forces="members")
    alpha_energy, alpha_forces = ALPHAS["alpha_energy"], ALPHAS["alpha_forces"]
    energies = prediction.energies.detach()
    assert float(energies.std(dim=1).min()) > 1e-6  # the members differ
    mean = energies.mean(dim=1, keepdim=True)
    torch.testing.assert_close(got["energy/system"], mean)
    torch.testing.assert_close(
        got["energy_ensemble/system"], mean + alpha_energy * (energies - mean)
    )
    # the energy floor is per atom: N sigma0_energy in quadrature
    floor = batch.n_atoms.to(energies.dtype) * FLOORS["sigma0_energy"]
    torch.testing.assert_close(
        got["energy_uncertainty/system"][:, 0],
        torch.sqrt((0.8 * alpha_energy * energies.std(dim=1)) ** 2 + floor**2),
    )
    ensemble, atom_std = calibrate_members(
        prediction.atomic.detach(),
        model.alpha_energy,
        model.alpha_forces,
        model.alpha_atom,
        model.sigma0_atom,
        model.floor_scale_atom,
    )
    torch.testing.assert_close(
        atom_std,
        torch.sqrt(
            (0.9 * ALPHAS["alpha_atom"] * prediction.atomic.detach().std(dim=1)) ** 2
            + FLOORS["sigma0_atom"] ** 2
        ),
    )
    torch.testing.assert_close(got["energy_ensemble/atom"], ensemble)
    torch.testing.assert_close(got["energy_uncertainty/atom"][:, 0], atom_std)
    assert got[f"{FEATURES}/atom"].shape == (27, model.head.feature_size)
    member_forces = prediction.forces.detach()
    mean_forces = member_forces.mean(dim=0)
    torch.testing.assert_close(
        got["forces"], mean_forces + alpha_forces * (member_forces - mean_forces)
    )
