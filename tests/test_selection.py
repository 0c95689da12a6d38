"""``shallow-ensemble select`` and :py:mod:`shallow_ensemble.workflows.selection`
on real data: a small ensemble trained on bulk water ranks a pool of held-out bulk
and slab frames by their true force error, and diversity keeps near-copies of one
frame from filling the selection."""

from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

from cli_runner import assert_clean_error, run_main
from conftest import tiny_config
from shallow_ensemble import workflows
from shallow_ensemble.calibration.predictions import EnsemblePredictions
from shallow_ensemble.data import read_structures
from shallow_ensemble.export import export_model
from shallow_ensemble.training import train
from shallow_ensemble.workflows.selection import (
    SelectionError,
    select_structures,
    structure_features,
    structure_uncertainties,
    weighted_farthest_points,
)


DATA = Path(__file__).resolve().parent / "data"
POOL = DATA / "water_pool.xyz"


@pytest.fixture(scope="module")
def water_models(tmp_path_factory) -> dict[str, Path]:
    """A small force-NLL ensemble trained on 6 bulk water frames (a few seconds),
    as a checkpoint and as an exported model."""
    folder = tmp_path_factory.mktemp("water")
    ase.io.write(folder / "train.xyz", ase.io.read(DATA / "water_train.xyz", ":"))
    ase.io.write(folder / "valid.xyz", ase.io.read(DATA / "water_valid.xyz", ":"))
    config = tiny_config(
        folder,
        model={"num_members": 8},
        strategy="energy_force_nll",
        epochs=10,
        warmup_epochs=3,
        batch_size=2,
        learning_rate=1e-2,
    )
    result = train(config, folder / "run")
    exported = export_model(result.model, folder / "model.pt")
    return {"ckpt": folder / "run" / "model.ckpt", "pt": exported}


def spearman(x: np.ndarray, y: np.ndarray, n_permutations: int = 20000):
    """Spearman's rho (no ties expected) and its one-sided permutation p-value."""

    def ranks(values):
        return np.argsort(np.argsort(values)).astype(float)

    rx, ry = ranks(x), ranks(y)
    rho = np.corrcoef(rx, ry)[0, 1]
    rng = np.random.default_rng(0)
    shuffled = np.array(
        [np.corrcoef(rx, rng.permutation(ry))[0, 1] for _ in range(n_permutations)]
    )
    return rho, (1 + np.sum(shuffled >= rho)) / (1 + n_permutations)


def force_errors(model: Path, path: Path) -> np.ndarray:
    """Per-structure RMSE of the mean force against the reference, eV/A."""
    structures = read_structures(path)
    predictions = workflows.predict_structures(model, structures)
    error = (predictions.forces.mean(dim=0) - predictions.forces_ref).pow(2)
    per_atom = error.sum(dim=1)
    total = torch.zeros(len(structures), dtype=torch.float64).index_add(
        0, predictions.system_index, per_atom
    )
    return torch.sqrt(total / (3 * predictions.n_atoms)).numpy()


@pytest.mark.parametrize("uncertainty", ["max_force", "mean_force"])
def test_uncertainty_ranks_the_true_force_error(water_models, uncertainty):
    n_pool = len(ase.io.read(POOL, ":"))
    result = select_structures(
        water_models["ckpt"], POOL, n_pool, uncertainty=uncertainty
    )
    sigma = result.sigmas[uncertainty]
    errors = force_errors(water_models["ckpt"], POOL)
    rho, p_value = spearman(sigma, errors)
    print(f"{uncertainty}: Spearman rho {rho:.3f}, permutation p {p_value:.2g}")
    assert rho > 0 and p_value < 0.05, (rho, p_value, sigma, errors)
    # the selection is the ranking, most uncertain first
    assert result.selected == list(np.argsort(-sigma, kind="stable"))
    assert np.all(np.diff(sigma[result.selected]) <= 0)


def test_checkpoint_and_exported_model_agree(water_models):
    structures = read_structures(POOL)[::3]
    ckpt = select_structures(water_models["ckpt"], POOL, 4).sigmas
    exported = select_structures(water_models["pt"], POOL, 4).sigmas
    assert set(ckpt) == set(exported) == {"energy_per_atom", "max_force", "mean_force"}
    for name in ckpt:
        np.testing.assert_allclose(ckpt[name], exported[name], rtol=1e-6)
    np.testing.assert_allclose(
        structure_features(water_models["ckpt"], structures),
        structure_features(water_models["pt"], structures),
        rtol=1e-8,
        atol=1e-10,
    )


@pytest.fixture(scope="module")
def pool_with_copies(water_models, tmp_path_factory) -> tuple[Path, set[int]]:
    """The pool, then 10 copies of its most uncertain frame with atoms displaced by
    0.001 A; returns the file and the indices of that frame and its copies."""
    frames = ase.io.read(POOL, ":")
    sigma = select_structures(water_models["ckpt"], POOL, 1).sigmas["max_force"]
    top = int(np.argmax(sigma))
    rng = np.random.default_rng(1)
    copies = []
    for _ in range(10):
        copy = frames[top].copy()
        copy.positions += rng.normal(scale=1e-3, size=copy.positions.shape)
        copies.append(copy)
    path = tmp_path_factory.mktemp("copies") / "pool.xyz"
    ase.io.write(path, frames + copies)
    return path, {top, *range(len(frames), len(frames) + 10)}


@pytest.mark.parametrize("kind", ["ckpt", "pt"])
def test_diversity_skips_near_copies(water_models, pool_with_copies, kind):
    path, cluster = pool_with_copies
    plain = select_structures(water_models[kind], path, 5)
    diverse = select_structures(water_models[kind], path, 5, diversity=True)
    n_plain = len(cluster & set(plain.selected))
    n_diverse = len(cluster & set(diverse.selected))
    print(f"{kind}: copies of one frame picked: {n_plain} plain, {n_diverse} diverse")
    assert n_plain >= 4
    assert n_diverse == 1
    # both start from the most uncertain frame
    assert plain.selected[0] == diverse.selected[0]


def test_weighted_farthest_points_known_answer():
    features = np.array([[0.0], [0.001], [1.0], [2.0]])
    sigma = np.array([1.0, 0.99, 0.5, 0.4])
    # 0 first (largest sigma); then 3 (0.4 * 2 > 0.5 * 1 > 0.99 * 0.001); then 2
    assert weighted_farthest_points(sigma, features, 4) == [0, 3, 2, 1]
    assert weighted_farthest_points(sigma, features, 1) == [0]


def test_structure_uncertainties_known_answer():
    forces = torch.zeros((2, 2, 3), dtype=torch.float64)
    forces[1, 0] = 1.0  # member 1 differs on atom 0 only
    predictions = EnsemblePredictions(
        energies=torch.tensor([[1.0, 3.0]], dtype=torch.float64),
        energy_ref=None,
        n_atoms=torch.tensor([2]),
        atomic=torch.zeros((2, 2), dtype=torch.float64),
        forces=forces,
        forces_ref=None,
        system_index=torch.tensor([0, 0]),
    )
    sigmas = structure_uncertainties(predictions)
    np.testing.assert_allclose(sigmas["energy_per_atom"], [np.sqrt(2) / 2])
    # per component std sqrt(1/2) on atom 0: per-atom sigma sqrt(3/2)
    np.testing.assert_allclose(sigmas["max_force"], [np.sqrt(1.5)])
    np.testing.assert_allclose(sigmas["mean_force"], [np.sqrt(1.5) / 2])


def test_select_command(water_models, tmp_path):
    out = tmp_path / "picked.xyz"
    run = run_main(["select", water_models["pt"], POOL, "-n", 3, "-o", out])
    assert run.code == 0, run.err
    assert "sigma_force_max" in run.out and f"wrote {out}" in run.out
    picked = ase.io.read(out, ":")
    assert len(picked) == 3
    sigma = [frame.info["sigma_force_max"] for frame in picked]
    assert sigma == sorted(sigma, reverse=True)
    assert [frame.info["selection_rank"] for frame in picked] == [0, 1, 2]
    # the chosen frames are the candidates as read, references included
    candidates = ase.io.read(POOL, ":")
    for frame in picked:
        source = candidates[frame.info["candidate_index"]]
        np.testing.assert_array_equal(frame.positions, source.positions)
        assert frame.get_potential_energy() == source.get_potential_energy()

    run = run_main(
        ["select", water_models["ckpt"], POOL, "-n", 2, "-o", out]
        + ["--by", "energy_per_atom", "--diversity"]
    )
    assert run.code == 0, run.err
    picked = ase.io.read(out, ":")
    assert len(picked) == 2 and "sigma_force_max" not in picked[0].info
    assert picked[0].info["sigma_energy_per_atom"] > 0


def test_select_errors(water_models, tmp_path):
    model = water_models["ckpt"]
    out = tmp_path / "picked.xyz"
    assert_clean_error(
        run_main(["select", model, POOL, "-n", 13, "-o", out]),
        "`n` is 13",
        "only 12 candidate",
    )
    assert_clean_error(
        run_main(["select", model, POOL, "-n", 0, "-o", out]), "`n` is 0"
    )
    assert_clean_error(
        run_main(["select", model, DATA / "empty.xyz", "-n", 1, "-o", out]),
        "contains no frames",
    )
    assert_clean_error(
        run_main(["select", model, DATA / "unknown_element.xyz", "-n", 1, "-o", out]),
        "`Cl` (Z=17)",
        "[H, O]",
    )
    assert_clean_error(
        run_main(["select", tmp_path / "nope.pt", POOL, "-n", 1, "-o", out]),
        "does not exist",
    )
    assert_clean_error(
        run_main(["select", model, POOL, "-n", 1, "-o", tmp_path]),
        "is a directory",
    )
    assert not out.exists()
    with pytest.raises(SelectionError, match="`uncertainty` is 'energy'"):
        select_structures(model, POOL, 1, uncertainty="energy")
