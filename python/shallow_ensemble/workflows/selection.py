"""Selecting the structures a model is least sure about, for active learning.

:py:func:`select_structures` runs a checkpoint or an exported model on candidate
structures (the same predictions as :py:func:`~shallow_ensemble.workflows.
evaluate_model`: calibrated members, member forces), ranks them by a calibrated
uncertainty and, optionally, spreads the choice over the model's last-layer feature
space so that near-identical frames are not all picked.
"""

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..errors import ShallowEnsembleError
from ._models import PathLike, is_torchscript, load_model


if TYPE_CHECKING:
    import ase

    from ..calibration.predictions import EnsemblePredictions
    from ..data import Structure


logger = logging.getLogger(__name__)

#: the uncertainties a selection can rank by, with their units
UNCERTAINTIES = {
    "max_force": "eV/A",
    "mean_force": "eV/A",
    "energy_per_atom": "eV/atom",
}

#: ``atoms.info`` keys written on the selected frames
INFO_KEYS = {
    "energy_per_atom": "sigma_energy_per_atom",
    "max_force": "sigma_force_max",
    "mean_force": "sigma_force_mean",
}

Array = npt.NDArray[np.float64]


class SelectionError(ShallowEnsembleError, ValueError):
    """Structures cannot be selected as asked (e.g. more than the candidates)."""


@dataclass
class SelectionResult:
    """What :py:func:`select_structures` chose.

    :param selected: indices of the chosen candidates (0-based, in file order), in
        the order they were picked (the most uncertain first)
    :param uncertainty: the uncertainty ranked by (a key of :py:data:`UNCERTAINTIES`)
    :param sigmas: per candidate, each computed uncertainty ``(n_candidates,)``:
        ``energy_per_atom`` (calibrated std of the energy / atoms, eV/atom) and, when
        forces were computed, ``max_force`` and ``mean_force`` (largest and mean
        per-atom force std, eV/A; see :py:func:`structure_uncertainties`)
    :param diversity: whether the choice was spread in feature space
    :param frames: the chosen frames (as read, in the order of ``selected``), with
        their uncertainties, rank and index in ``atoms.info``
    """

    selected: list[int]
    uncertainty: str
    sigmas: dict[str, Array]
    diversity: bool
    frames: list["ase.Atoms"] = field(repr=False)

    def write(self, path: PathLike) -> Path:
        """Write the chosen frames to an extended XYZ file; return its path."""
        import ase.io

        target = Path(path)
        if target.is_dir():
            raise IsADirectoryError(21, "the output is a directory", str(target))
        target.parent.mkdir(parents=True, exist_ok=True)
        ase.io.write(target, self.frames, format="extxyz")
        return target

    def table(self) -> str:
        """A short fixed-width table of the chosen frames and their uncertainties."""
        names = [name for name in UNCERTAINTIES if name in self.sigmas]
        header = f"{'rank':>5}{'frame':>7}" + "".join(
            f"{INFO_KEYS[name] + ' [' + UNCERTAINTIES[name] + ']':>33}"
            for name in names
        )
        lines = [header]
        for rank, index in enumerate(self.selected):
            cells = "".join(f"{self.sigmas[name][index]:>33.4g}" for name in names)
            lines.append(f"{rank:>5}{index:>7}{cells}")
        return "\n".join(lines)


def select_structures(
    model_path: PathLike,
    candidates: PathLike,
    n: int,
    *,
    uncertainty: str = "max_force",
    diversity: bool = False,
    batch_size: int = 8,
    chunk_size: int = 64,
    extensions: PathLike | None = None,
) -> SelectionResult:
    """Choose the ``n`` candidate structures with the largest calibrated uncertainty.

    Without ``diversity``, the candidates are sorted by ``uncertainty``. With it,
    the most uncertain candidate is picked first, then, one at a time, the candidate
    with the largest ``sigma * d``, where ``d`` is its distance to the nearest picked
    candidate in the model's last-layer feature space (the mean of the per-atom
    features of a structure): an uncertainty-weighted farthest-point sampling, under
    which copies of a picked frame (``d`` close to 0) come last.

    :param model_path: a checkpoint (``model.ckpt``) or an exported model
        (``model.pt``)
    :param candidates: extended XYZ file of candidate structures (energies and
        forces are not needed, and are kept in the chosen frames if present)
    :param n: how many structures to choose, ``1 <= n <= len(candidates)``
    :param uncertainty: ``"max_force"`` (largest per-atom force std, eV/A),
        ``"mean_force"`` (mean per-atom force std, eV/A) or ``"energy_per_atom"``
        (energy std / atoms, eV/atom; no member forces needed)
    :param diversity: spread the choice in feature space (see above)
    :param batch_size: structures per batch (checkpoints only)
    :param chunk_size: structures predicted at once (bounds the memory of member
        forces)
    :param extensions: extensions folder of an exported model
    :raises FileNotFoundError: if the model file does not exist
    :raises DataError: for an empty or invalid candidates file, or atomic types the
        model does not know
    :raises SelectionError: for ``n`` out of range, an unknown ``uncertainty``, or a
        model without ensemble spread
    :raises EvaluateError: if a prediction is NaN or infinite
    """
    import ase.io

    from ..data import read_structures

    if uncertainty not in UNCERTAINTIES:
        raise SelectionError(
            f"`uncertainty` is '{uncertainty}' but must be one of "
            f"{', '.join(UNCERTAINTIES)}"
        )
    if n < 1:
        raise SelectionError(f"`n` is {n} but must be at least 1")
    is_torchscript(model_path)  # a missing model fails before the data is read
    structures = read_structures(candidates, require_energy=False, require_forces=False)
    if n > len(structures):
        raise SelectionError(
            f"`n` is {n} but {candidates} holds only {len(structures)} candidate "
            "structures; ask for at most that many"
        )
    forces = uncertainty != "energy_per_atom"
    sigmas = _uncertainties_in_chunks(
        model_path, structures, forces, batch_size, chunk_size, extensions
    )
    sigma = sigmas[uncertainty]
    if not np.any(sigma > 0):
        raise SelectionError(
            f"the model's `{uncertainty}` uncertainty is 0 for every candidate (a "
            "one-member model, or members that all agree): there is nothing to rank "
            "by; use an ensemble"
        )
    if diversity:
        features = structure_features(
            model_path, structures, batch_size=batch_size, extensions=extensions
        )
        selected = weighted_farthest_points(sigma, features, n)
    else:
        selected = [int(i) for i in np.argsort(-sigma, kind="stable")[:n]]
    logger.debug(
        "selected %d of %d candidates by `%s`%s",
        n,
        len(structures),
        uncertainty,
        " with diversity" if diversity else "",
    )
    frames = list(ase.io.iread(os.fspath(candidates), ":", format="extxyz"))
    chosen = []
    for rank, index in enumerate(selected):
        frame = frames[index]
        for name, values in sigmas.items():
            frame.info[INFO_KEYS[name]] = float(values[index])
        frame.info["selection_rank"] = rank
        frame.info["candidate_index"] = index
        chosen.append(frame)
    return SelectionResult(selected, uncertainty, sigmas, diversity, chosen)


def structure_uncertainties(
    predictions: "EnsemblePredictions",
) -> dict[str, Array]:
    """Per-structure calibrated uncertainties of member predictions.

    - ``energy_per_atom``: std of the member energies divided by the atom count,
      eV/atom;
    - with member forces, ``max_force`` and ``mean_force``: the largest and the mean
      over atoms of the per-atom force std
      :math:`\\sigma_{F_i} = \\sqrt{\\sigma_x^2 + \\sigma_y^2 + \\sigma_z^2}` (the
      spread of the force vector, eV/A; a component's std is about
      :math:`\\sigma_{F_i} / \\sqrt{3}`).

    :param predictions: calibrated member predictions (e.g. of
        :py:func:`~shallow_ensemble.workflows.predict_structures`)
    :return: name -> ``(n_structures,)`` float64 array
    """
    import torch

    from ..calibration.predictions import mean_std

    _, energy_std = mean_std(predictions.energies, 1)
    n_atoms = predictions.n_atoms.to(torch.float64)
    result = {"energy_per_atom": (energy_std / n_atoms).numpy()}
    if predictions.forces is not None:
        _, force_std = mean_std(predictions.forces, 0)
        per_atom = force_std.pow(2).sum(dim=-1).sqrt()
        n_structures = predictions.energies.shape[0]
        index = predictions.system_index
        largest = torch.zeros(n_structures, dtype=torch.float64).scatter_reduce(
            0, index, per_atom, reduce="amax", include_self=False
        )
        total = torch.zeros(n_structures, dtype=torch.float64).index_add(
            0, index, per_atom
        )
        result["max_force"] = largest.numpy()
        result["mean_force"] = (total / n_atoms).numpy()
    return result


def _uncertainties_in_chunks(
    model_path: PathLike,
    structures: Sequence["Structure"],
    forces: bool,
    batch_size: int,
    chunk_size: int,
    extensions: PathLike | None,
) -> dict[str, Array]:
    from .evaluation import check_finite, predict_structures

    if chunk_size < 1:
        raise SelectionError(f"`chunk_size` is {chunk_size} but must be at least 1")
    parts: list[dict[str, Array]] = []
    for start in range(0, len(structures), chunk_size):
        chunk = structures[start : start + chunk_size]
        predictions = predict_structures(
            model_path,
            chunk,
            forces=forces,
            batch_size=batch_size,
            extensions=extensions,
        )
        check_finite(predictions, chunk)
        parts.append(structure_uncertainties(predictions))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def structure_features(
    model_path: PathLike,
    structures: Sequence["Structure"],
    *,
    batch_size: int = 8,
    extensions: PathLike | None = None,
) -> Array:
    """Per-structure mean of the model's per-atom last-layer features.

    A checkpoint gives them through
    :py:meth:`~shallow_ensemble.kinds.ModelKind.head_design`, an exported model
    through its ``mtt::aux::energy_last_layer_features`` output; the two agree.

    :return: ``(n_structures, n_features)`` float64 array
    """
    if is_torchscript(model_path):
        return _exported_features(model_path, structures, extensions)
    import torch

    from ..data import GraphDataset, check_atomic_types, iterate_batches

    model = load_model(model_path)
    check_atomic_types(structures, model.atomic_types)
    parameter = next(model.parameters())
    scale = float(model.head.energy_scale)
    means = []
    for batch in iterate_batches(
        GraphDataset(list(structures), model.cutoff), batch_size, shuffle=False
    ):
        batch = batch.to(device=parameter.device, dtype=parameter.dtype)
        phi, _ = model.head_design(batch)  # s (f_i, 1)
        features = phi[:, :-1].cpu() / scale
        summed = torch.zeros(
            (batch.n_systems, features.shape[1]), dtype=torch.float64
        ).index_add(0, batch.system_index.cpu(), features)
        means.append(summed / batch.n_atoms.cpu().to(torch.float64).unsqueeze(1))
    return torch.cat(means).numpy()


def _exported_features(
    model_path: PathLike,
    structures: Sequence["Structure"],
    extensions: PathLike | None,
) -> Array:
    import ase

    from ..data import check_atomic_types
    from ..export.metatomic import LAST_LAYER_FEATURES
    from ..export.predict import load_exported, run_model

    model = load_exported(
        Path(model_path), None if extensions is None else Path(extensions)
    )
    check_atomic_types(structures, list(model.capabilities().atomic_types))
    if LAST_LAYER_FEATURES not in model.capabilities().outputs:
        raise SelectionError(
            f"the model in {model_path} has no `{LAST_LAYER_FEATURES}` output, which "
            "diversity needs; select without diversity, or export the model again"
        )
    means = []
    for s in structures:
        frame = ase.Atoms(
            numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc
        )
        results, _ = run_model(model, [frame], {LAST_LAYER_FEATURES: "system"})
        values = results[LAST_LAYER_FEATURES].block().values.detach()
        means.append(values.double().numpy()[0] / len(frame))
    return np.stack(means)


def weighted_farthest_points(sigma: Array, features: Array, n: int) -> list[int]:
    """Uncertainty-weighted farthest-point sampling.

    The first point is the one with the largest ``sigma``; each next one maximises
    ``sigma_i * d_i``, ``d_i`` being the Euclidean distance of ``features[i]`` to the
    nearest point already picked (ties, e.g. among exact copies, go to the larger
    ``sigma``, then to the first index).

    :param sigma: ``(n_points,)`` non-negative weights (uncertainties)
    :param features: ``(n_points, n_features)``
    :param n: how many to pick, at most ``n_points``
    :return: the picked indices, in the order picked
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    features = np.asarray(features, dtype=np.float64)
    order = np.lexsort((np.arange(len(sigma)), -sigma))  # by sigma, then index
    picked = [int(order[0])]
    distance = np.linalg.norm(features - features[picked[0]], axis=1)
    available = np.ones(len(sigma), dtype=bool)
    available[picked[0]] = False
    while len(picked) < n:
        score = np.where(available, sigma * distance, -np.inf)
        best = np.flatnonzero(score == score.max())
        nxt = int(best[np.argmax(sigma[best])])
        picked.append(nxt)
        available[nxt] = False
        distance = np.minimum(
            distance, np.linalg.norm(features - features[nxt], axis=1)
        )
    return picked
