"""Shared fixtures: bundled structures, small models and graphs; and the
``SHALLOW_ENSEMBLE_REQUIRE_ENGINES=1`` switch (set by ``.ci/run``), under which an
engine test that skips (no cmake, compiler, Catch2, LAMMPS, i-PI, metatrain, ...)
fails instead.

CUDA tests are marked with :py:data:`requires_cuda` (marker ``cuda``): they skip
with :py:data:`NO_CUDA` where torch sees no GPU, and that skip is never an engine
skip (CI has no GPU, so it must not fail there). ``SHALLOW_ENSEMBLE_REQUIRE_CUDA=1``
(set by ``benchmarks/device_check.sh`` on a GPU machine) turns it into a failure."""

import os
import re
from importlib import resources
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
import torch

from shallow_ensemble.backbones import SoapBpnn
from shallow_ensemble.config import config_from_dict
from shallow_ensemble.model import EnsembleModel


RESOURCES = resources.files("shallow_ensemble") / "resources"
ETHANOL = str(RESOURCES / "ethanol.xyz")
SILICON = str(RESOURCES / "silicon.xyz")

SMALL_HYPERS = {
    "cutoff": 3.5,
    "max_radial": 4,
    "max_angular": 3,
    "hidden_sizes": [24, 16],
}


TINY_MODEL = {
    "num_members": 4,
    "cutoff": 3.5,
    "max_radial": 3,
    "max_angular": 2,
    "hidden_sizes": [16, 8],
}


def tiny_config(folder, model=None, **training):
    """A quick float64 configuration on ``folder/{train,valid}.xyz``."""
    return config_from_dict(
        {
            "data": {
                "train": str(folder / "train.xyz"),
                "valid": str(folder / "valid.xyz"),
            },
            "model": {**TINY_MODEL, **(model or {})},
            "training": {
                "epochs": 2,
                "warmup_epochs": 1,
                "batch_size": 6,
                "dtype": "float64",
                **training,
            },
        }
    )


def make_model(atomic_types, num_members=4, seed=0, **hypers) -> EnsembleModel:
    """A small float64 model with non-trivial (random) weights and normalisation."""
    torch.manual_seed(seed)
    backbone = SoapBpnn(atomic_types, **{**SMALL_HYPERS, **hypers})
    model = EnsembleModel(backbone, num_members).to(torch.float64)
    with torch.no_grad():
        model.head.bias.normal_()
        model.head.composition.normal_()
        backbone.feature_scale.uniform_(0.5, 2.0)
        backbone.feature_shift.normal_(std=0.1)
    return model


def export_calibrated_model(folder, atomic_types, seed):
    """Export a small untrained float64 model with non-trivial weights and
    calibration factors (alpha_energy 1.3, alpha_forces 0.7, alpha_atom 2.1) to
    ``folder/model.pt``; return the path."""
    from shallow_ensemble.export import export_model

    torch.manual_seed(seed)
    backbone = SoapBpnn(
        atomic_types, cutoff=4.0, max_radial=4, max_angular=3, hidden_sizes=[16, 8]
    )
    model = EnsembleModel(backbone, 4).to(torch.float64)
    with torch.no_grad():
        model.alpha_energy.fill_(1.3)
        model.alpha_forces.fill_(0.7)
        model.alpha_atom.fill_(2.1)
        model.head.bias.normal_()
    return export_model(model, folder / "model.pt")


def assert_selected_atoms_sum_to_whole(model, atoms):
    """Ensemble energies of two halves of ``atoms`` (``selected_atoms``) add up to
    those of the whole structure (an exported model, loaded)."""
    from metatensor.torch import Labels

    from shallow_ensemble.export.predict import run_model

    whole, _ = run_model(model, [atoms], {"energy_ensemble": "system"})
    total = 0
    n = len(atoms)
    for selection in (range(0, n, 2), range(1, n, 2)):
        labels = Labels(["system", "atom"], torch.tensor([[0, a] for a in selection]))
        part, _ = run_model(
            model, [atoms], {"energy_ensemble": "system"}, selected_atoms=labels
        )
        total = total + part["energy_ensemble"].block().values
    torch.testing.assert_close(total, whole["energy_ensemble"].block().values)


def graph_of(atoms: ase.Atoms, cutoff: float, requires_grad: bool = False):
    """Positions, pair indices, cell shifts of a structure (full neighbour list)."""
    from vesin import NeighborList

    periodic = bool(np.all(atoms.pbc))
    box = atoms.cell.array if periodic else np.zeros((3, 3))
    i, j, shifts = NeighborList(cutoff=cutoff, full_list=True).compute(
        atoms.positions, box, periodic, "ijS"
    )
    positions = torch.tensor(atoms.positions, requires_grad=requires_grad)
    cell_shifts = torch.tensor(shifts, dtype=torch.float64) @ torch.tensor(box)
    return (
        positions,
        torch.tensor(i, dtype=torch.long),
        torch.tensor(j, dtype=torch.long),
        cell_shifts,
        torch.tensor(atoms.numbers, dtype=torch.long),
    )


@pytest.fixture(scope="session")
def ethanol_frames():
    return ase.io.read(ETHANOL, ":")


@pytest.fixture(scope="session")
def silicon_frames():
    return ase.io.read(SILICON, ":")


# --- CUDA tests ------------------------------------------------------------------

REQUIRE_CUDA = "SHALLOW_ENSEMBLE_REQUIRE_CUDA"
NO_CUDA = "no CUDA device: torch.cuda.is_available() is False"
#: a test (or a parameter) that needs a GPU; skips without one, even in CI
requires_cuda = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA),
]
#: the devices a device-parametrised test runs on: the CPU always, CUDA if present
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA GPU (skips without one, see tests/conftest.py)"
    )


def _cuda_required() -> bool:
    return os.environ.get(REQUIRE_CUDA, "").strip() not in ("", "0")


# --- SHALLOW_ENSEMBLE_REQUIRE_ENGINES=1: engine tests must run, not skip ----------

REQUIRE_ENGINES = "SHALLOW_ENSEMBLE_REQUIRE_ENGINES"
TESTS = Path(__file__).resolve().parent
# every skip in these folders of tests/ is an engine skip ...
ENGINE_FOLDERS = {"engines", "cxx", "metatrain"}
# ... and anywhere else, a skip whose reason names a tool or a `test` extra
ENGINE_WORDS = re.compile(
    r"\b(cmake|ctest|compiler|catch2|lammps|mpich|mpi|mpirun|i-pi|ipi|metatrain|mtt"
    r"|matplotlib)\b",
    re.IGNORECASE,
)


def engines_required() -> bool:
    """Whether ``SHALLOW_ENSEMBLE_REQUIRE_ENGINES`` is set (to anything but 0)."""
    return os.environ.get(REQUIRE_ENGINES, "").strip() not in ("", "0")


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        longrepr = longrepr[2]
    reason = str(longrepr)
    return reason[len("Skipped: ") :] if reason.startswith("Skipped: ") else reason


def _is_engine_skip(path, reason: str) -> bool:
    if reason == NO_CUDA:  # CI has no GPU: never a required engine
        return False
    try:
        folder = Path(path).resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        folder = None
    return folder in ENGINE_FOLDERS or ENGINE_WORDS.search(reason) is not None


def _required_message(reason: str) -> str:
    return (
        f"{REQUIRE_ENGINES}=1: this engine test would have been skipped ({reason}); "
        "install what it needs (as .ci/run does) instead"
    )


class RequiredEngineMissing(pytest.Item):
    """Stands for the tests of a module skipped while it was collected."""

    def __init__(self, *, reason: str, **kwargs):
        super().__init__(**kwargs)
        self.reason = reason

    def runtest(self):
        pytest.fail(_required_message(self.reason), pytrace=False)

    def reportinfo(self):
        return self.path, None, f"{self.name}: {self.reason}"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A test module skipped on import (``pytest.importorskip``, module-level
    ``pytest.skip``) becomes one failing test under the switch."""
    report = yield
    if (
        report.skipped
        and isinstance(collector, pytest.Module)
        and engines_required()
        and _is_engine_skip(collector.path, _skip_reason(report.longrepr))
    ):
        item = RequiredEngineMissing.from_parent(
            collector, name="required_engine", reason=_skip_reason(report.longrepr)
        )
        report.outcome = "passed"
        report.longrepr = None
        report.result = [item]
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """An engine test's skip (in setup, e.g. a session fixture that builds with
    cmake, or in the test) becomes a failure under the switch; xfails stay."""
    report = yield
    if report.skipped and _cuda_required() and _skip_reason(report.longrepr) == NO_CUDA:
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_CUDA}=1 but this CUDA test skipped ({NO_CUDA})"
        return report
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and engines_required()
        and _is_engine_skip(item.path, _skip_reason(report.longrepr))
    ):
        report.outcome = "failed"
        report.longrepr = _required_message(_skip_reason(report.longrepr))
    return report


def write_ethanol_split(folder, n_train=12, valid=(100, 106)):
    """``folder/train.xyz`` (the first ``n_train`` bundled ethanol frames) and
    ``folder/valid.xyz`` (frames ``valid[0]:valid[1]``); return ``folder``."""
    frames = ase.io.read(ETHANOL, ":")
    ase.io.write(folder / "train.xyz", frames[:n_train])
    ase.io.write(folder / "valid.xyz", frames[valid[0] : valid[1]])
    return folder
