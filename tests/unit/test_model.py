"""Ensemble heads, composition baseline, calibration and batched member predictions."""

import ase.io
import pytest
import torch

from conftest import ETHANOL, make_model
from shallow_ensemble.data import GraphDataset, collate, read_structures
from shallow_ensemble.heads import ShallowEnsembleHead


# ------------------------------------------------------------------ heads --
def test_head_shapes():
    torch.manual_seed(0)
    head = ShallowEnsembleHead(feature_size=5, num_members=3, n_types=2).double()
    features = torch.randn(7, 5, dtype=torch.float64)
    species = torch.tensor([0, 1, 1, 0, 0, 1, 0])
    assert head(features, species).shape == (7, 3)
    assert head.member_cotangents().shape == (3, 5)
    assert head.composition.shape == (2,)
    assert head.num_members == 3


def test_head_is_linear_in_features_plus_composition_baseline():
    torch.manual_seed(1)
    head = ShallowEnsembleHead(feature_size=4, num_members=3, n_types=3).double()
    with torch.no_grad():
        head.bias.normal_()
        head.composition.copy_(torch.tensor([-13.6, -1030.0, -2040.0]))
        head.energy_scale.fill_(0.25)
    features = torch.randn(6, 4, dtype=torch.float64)
    species = torch.tensor([2, 0, 1, 1, 0, 2])
    expected = 0.25 * (features @ head.weight.T + head.bias) + head.composition[
        species
    ].unsqueeze(-1)
    torch.testing.assert_close(head(features, species), expected, rtol=0, atol=1e-12)
    # zero features: every member gives bias + the baseline of the atom's type
    with torch.no_grad():
        head.bias.zero_()
    zero = head(torch.zeros(6, 4, dtype=torch.float64), species)
    torch.testing.assert_close(
        zero, head.composition[species].unsqueeze(-1).expand(6, 3), rtol=0, atol=0
    )
    torch.testing.assert_close(
        head.member_cotangents(), 0.25 * head.weight, rtol=0, atol=0
    )


def test_head_rejects_zero_members():
    with pytest.raises(ValueError, match="`num_members` is 0 but must be"):
        ShallowEnsembleHead(feature_size=4, num_members=0, n_types=1)


# --------------------------------------------------------------- baseline --
def synthetic_counts(n_structures=40, n_types=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 12, (n_structures, n_types), generator=generator)
    return counts.to(torch.float64), generator


def test_fit_baseline_recovers_exact_per_type_energies():
    model = make_model([1, 6, 8])
    counts, _ = synthetic_counts()
    reference = torch.tensor([-13.6, -1029.8, -2041.3], dtype=torch.float64)
    energies = counts @ reference
    model.fit_baseline(counts, energies, counts.sum(dim=1))
    torch.testing.assert_close(model.head.composition, reference, rtol=0, atol=1e-8)
    # no residual at all: the energy scale falls back to its floor
    assert float(model.head.energy_scale) == pytest.approx(1e-3)


def test_energy_scale_is_the_rms_per_atom_residual():
    model = make_model([1, 6, 8])
    counts, generator = synthetic_counts(n_structures=200, seed=1)
    reference = torch.tensor([-13.6, -1029.8, -2041.3], dtype=torch.float64)
    n_atoms = counts.sum(dim=1)
    # independent per-atom noise of 0.05 eV: total noise grows as sqrt(n_atoms)
    noise = (
        0.05
        * n_atoms.sqrt()
        * torch.randn(len(counts), generator=generator, dtype=torch.float64)
    )
    energies = counts @ reference + noise
    model.fit_baseline(counts, energies, n_atoms)

    solution = torch.linalg.lstsq(counts, energies.unsqueeze(-1)).solution[:, 0]
    torch.testing.assert_close(model.head.composition, solution, rtol=0, atol=1e-8)
    residual = energies - counts @ solution
    expected = torch.sqrt((residual**2 / n_atoms).mean())
    torch.testing.assert_close(model.head.energy_scale, expected, rtol=1e-10, atol=0)
    # and it estimates the per-atom noise that was put in
    assert 0.04 < float(model.head.energy_scale) < 0.06
    torch.testing.assert_close(model.head.composition, reference, rtol=0, atol=0.05)


def test_fit_baseline_keeps_the_model_dtype():
    model = make_model([1, 8]).to(torch.float32)
    counts, _ = synthetic_counts(n_types=2)
    model.fit_baseline(
        counts, counts @ torch.tensor([-1.0, -2.0]).double(), counts.sum(1)
    )
    assert model.head.composition.dtype == torch.float32
    assert model.head.energy_scale.dtype == torch.float32


# ---------------------------------------------------------- species index --
def test_species_index():
    model = make_model([1, 6, 8])
    index = model.species_index(torch.tensor([8, 1, 1, 6, 8]))
    assert index.tolist() == [2, 0, 0, 1, 2]


@pytest.mark.parametrize("bad", [7, 14, 0, -1])
def test_species_index_rejects_unknown_atomic_numbers(bad):
    model = make_model([1, 6, 8])
    with pytest.raises(ValueError) as info:
        model.species_index(torch.tensor([1, 6, bad, 8]))
    assert str(info.value) == (
        f"atomic type {bad} is not one of the model's atomic types [1, 6, 8]"
    )


# ------------------------------------------------------------ calibration --
ALPHAS = {"alpha_energy": 1.7, "alpha_forces": 0.6, "alpha_atom": 2.5}


@pytest.fixture
def calibrated():
    model = make_model([1, 6, 8], num_members=5)
    for key, value in ALPHAS.items():
        getattr(model, key).fill_(value)
    return model


def test_calibrated_atomic_energies(calibrated):
    generator = torch.Generator().manual_seed(2)
    atomic = torch.randn(9, 5, generator=generator, dtype=torch.float64) + 3.0
    ensemble, uncertainty = calibrated.calibrated_atomic_energies(atomic)
    assert ensemble.shape == (9, 5) and uncertainty.shape == (9,)
    # the mean of every atom is untouched
    torch.testing.assert_close(
        ensemble.mean(dim=1), atomic.mean(dim=1), rtol=0, atol=1e-13
    )
    # summed members are stretched by alpha_energy around their mean
    summed, raw_summed = ensemble.sum(dim=0), atomic.sum(dim=0)
    torch.testing.assert_close(
        summed.std(), ALPHAS["alpha_energy"] * raw_summed.std(), rtol=1e-13, atol=0
    )
    torch.testing.assert_close(
        summed,
        raw_summed.mean() + ALPHAS["alpha_energy"] * (raw_summed - raw_summed.mean()),
    )
    # per-atom uncertainty: alpha_atom times the per-atom member std
    torch.testing.assert_close(
        uncertainty, ALPHAS["alpha_atom"] * atomic.std(dim=1), rtol=1e-13, atol=0
    )


def test_calibrated_gradients_are_stretched_by_alpha_forces(calibrated):
    """d ensemble_k / d atomic_j = 1/M + alpha_forces (delta_kj - 1/M)."""
    atomic = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    ensemble, _ = calibrated.calibrated_atomic_energies(atomic)
    member = 3
    (grad,) = torch.autograd.grad(ensemble[:, member].sum(), atomic)
    expected = torch.full((4, 5), (1 - ALPHAS["alpha_forces"]) / 5, dtype=torch.float64)
    expected[:, member] += ALPHAS["alpha_forces"]
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-14)


def test_single_member_has_zero_uncertainty(calibrated):
    atomic = torch.randn(4, 1, dtype=torch.float64)
    ensemble, uncertainty = calibrated.calibrated_atomic_energies(atomic)
    torch.testing.assert_close(ensemble, atomic, rtol=0, atol=0)
    assert torch.equal(uncertainty, torch.zeros(4, dtype=torch.float64))


# ------------------------------------------------------------- set_members --
def test_set_members_changes_the_number_of_members():
    model = make_model([1, 6, 8], num_members=4)
    size = model.backbone.feature_size
    weight = torch.randn(7, size, dtype=torch.float32)
    bias = torch.arange(7, dtype=torch.float32)
    model.head.set_members(weight, bias)
    assert model.num_members == 7
    assert model.head.weight.dtype == torch.float64  # the model's dtype is kept
    assert isinstance(model.head.weight, torch.nn.Parameter)
    torch.testing.assert_close(model.head.weight, weight.double(), rtol=0, atol=0)
    features = torch.randn(3, size, dtype=torch.float64)
    assert model.head(features, torch.tensor([0, 1, 2])).shape == (3, 7)
    # the new heads are copies: changing the inputs does not change the model
    weight += 1.0
    assert not torch.equal(model.head.weight, weight.double())


def test_set_members_rejects_wrong_shapes():
    model = make_model([1, 6, 8], num_members=4)
    size = model.backbone.feature_size
    with pytest.raises(ValueError, match=rf"`weight` has shape \(3, {size + 1}\)"):
        model.head.set_members(torch.zeros(3, size + 1), torch.zeros(3))
    with pytest.raises(ValueError, match=r"`weight` has shape"):
        model.head.set_members(torch.zeros(size), torch.zeros(1))
    with pytest.raises(ValueError, match=r"`bias` has shape \(2,\) but must be \(3,\)"):
        model.head.set_members(torch.zeros(3, size), torch.zeros(2))
    assert model.num_members == 4


# ---------------------------------------------------------------- predict --
@pytest.fixture(scope="module")
def ethanol_batch(tmp_path_factory):
    path = tmp_path_factory.mktemp("ethanol") / "two.xyz"
    ase.io.write(path, ase.io.read(ETHANOL, ":2"))
    dataset = GraphDataset(read_structures(path), cutoff=3.5)
    return collate([dataset[0], dataset[1]])


def test_predict_member_forces(ethanol_batch):
    model = make_model([1, 6, 8], num_members=4)
    batch = ethanol_batch
    members = model.predict(batch, forces="members")
    mean = model.predict(batch, forces="mean")
    none = model.predict(batch)

    assert members.atomic.shape == (18, 4)
    assert members.energies.shape == (2, 4)
    assert members.forces.shape == (4, 18, 3)
    assert mean.forces.shape == (1, 18, 3)
    assert none.forces is None
    torch.testing.assert_close(
        members.forces.mean(dim=0), mean.forces[0], rtol=0, atol=1e-10
    )
    # energies per structure are sums of the atomic energies
    torch.testing.assert_close(
        members.energies[0], members.atomic[:9].sum(dim=0), rtol=1e-14, atol=0
    )
    torch.testing.assert_close(
        members.energies[1], members.atomic[9:].sum(dim=0), rtol=1e-14, atol=0
    )
    torch.testing.assert_close(none.energies, members.energies, rtol=0, atol=0)
    # the two structures are independent: forces are not all the same
    assert not torch.allclose(members.forces[0], members.forces[1])


def test_predict_rejects_an_unknown_forces_mode(ethanol_batch):
    model = make_model([1, 6, 8])
    with pytest.raises(ValueError, match="`forces` is 'bad' but must be"):
        model.predict(ethanol_batch, forces="bad")


def test_predict_rejects_unknown_elements(ethanol_batch):
    model = make_model([1, 6])
    with pytest.raises(ValueError, match="atomic type 8 is not one of"):
        model.predict(ethanol_batch)


# ------------------------------------------------------------------ kinds --
def test_a_kind_checks_its_backbone():
    from shallow_ensemble.backbones import StackedBackbone
    from shallow_ensemble.model import EnsembleModel

    backbone = StackedBackbone([make_model([1, 8]).backbone])
    with pytest.raises(TypeError, match="needs a SoapBpnn backbone"):
        EnsembleModel(backbone, 2)


def test_stacking_needs_models_of_one_pair_vector_kind_and_baseline():
    from shallow_ensemble.kinds import KindError
    from shallow_ensemble.training.initialization import stack_models

    first, second = make_model([1, 8], num_members=1), make_model([1, 8], seed=1)
    with pytest.raises(ValueError, match="different energy baselines"):
        stack_models([first, second])
    second.head.composition.copy_(first.head.composition)
    stacked = stack_models([first, second])
    assert stacked.kind == "stacked" and stacked.num_members == 2
    with pytest.raises(KindError, match="cannot be stacked again"):
        stack_models([stacked, stacked])


def test_kinds_that_cannot_be_trained_from_scratch(tmp_path):
    from conftest import tiny_config
    from shallow_ensemble.kinds import KindError, get_kind
    from shallow_ensemble.training.initialization import build_model

    config = tiny_config(tmp_path)
    assert type(build_model(config, [1, 8], 3)) is get_kind("soap_bpnn")
    for kind in ("stacked", "metatomic"):
        with pytest.raises(KindError, match=f"'{kind}' cannot be trained from scratch"):
            get_kind(kind).from_config(config.model, [1, 8], 3)


def test_only_model_kinds_are_registered():
    from shallow_ensemble.kinds import register_kind

    class NotAModel(torch.nn.Module):
        kind = "not_a_model"

    with pytest.raises(TypeError, match="must be a subclass of"):
        register_kind(NotAModel)
