"""The importable API: ``import shallow_ensemble`` is cheap, its workflow verbs
resolve, the command line is a thin layer over :py:mod:`shallow_ensemble.workflows`,
and :py:func:`~shallow_ensemble.evaluate_model` gives what ``evaluate --json``
writes."""

import ast
import contextlib
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch

import shallow_ensemble
from conftest import ETHANOL, make_model
from shallow_ensemble import workflows
from shallow_ensemble.cli.__main__ import console_logging, main
from shallow_ensemble.data import DataError, check_atomic_types, read_structures
from shallow_ensemble.errors import ShallowEnsembleError


CLI = Path(shallow_ensemble.__file__).parent / "cli"
DATA = Path(__file__).parent / "data"
MAX_FUNCTION_LINES = 40


def imported_modules(code: str) -> set[str]:
    """``sys.modules`` after running ``code`` in a fresh interpreter."""
    script = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


# ------------------------------------------------------------------ import --
def test_import_is_cheap_and_has_no_side_effects():
    modules = imported_modules(
        "import logging\n"
        "import shallow_ensemble\n"
        "assert not logging.getLogger().handlers\n"
        "assert not logging.getLogger('shallow_ensemble').handlers"
    )
    for heavy in ("shallow_ensemble.training", "matplotlib", "torch"):
        assert heavy not in modules, f"`import shallow_ensemble` imports {heavy}"


def test_every_public_name_resolves():
    for name in shallow_ensemble.__all__:
        assert getattr(shallow_ensemble, name) is not None, name
    assert set(shallow_ensemble.__all__) <= set(dir(shallow_ensemble))
    with pytest.raises(AttributeError, match="no_such_name"):
        shallow_ensemble.no_such_name  # noqa: B018


def test_workflow_verbs_are_the_library_functions():
    from shallow_ensemble.config import load_config
    from shallow_ensemble.export import export_model
    from shallow_ensemble.training import train

    assert shallow_ensemble.load_config is load_config
    assert shallow_ensemble.train is train
    assert shallow_ensemble.export_model is export_model
    assert shallow_ensemble.evaluate_model is workflows.evaluate_model
    # the checkpoint loader; its docstring says how exported models are loaded
    assert "load_atomistic_model" in shallow_ensemble.load_model.__doc__


# -------------------------------------------------------------------- CLI --
def cli_modules() -> list[Path]:
    modules = sorted(CLI.glob("*.py"))
    assert len(modules) >= 6
    return modules


@pytest.mark.parametrize("path", cli_modules(), ids=lambda p: p.name)
def test_cli_modules_are_thin(path):
    """No torch at module level, and short functions: the work is in the library."""
    tree = ast.parse(path.read_text())
    module_level = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        and not any(
            isinstance(parent, ast.FunctionDef)
            and parent.lineno <= node.lineno <= parent.end_lineno
            for parent in ast.walk(tree)
        )
    ]
    for node in module_level:
        names = (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
        )
        for name in names:
            assert name.split(".")[0] != "torch", f"{path.name}:{node.lineno}"
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, (
                f"{path.name}: {node.name}() has {length} lines; move the work to "
                "shallow_ensemble.workflows"
            )


def test_command_line_starts_without_torch():
    modules = imported_modules(
        "from shallow_ensemble.cli.__main__ import build_parser; build_parser()"
    )
    assert "torch" not in modules
    assert "shallow_ensemble.training" not in modules


def test_cli_shows_library_log_messages():
    package = logging.getLogger("shallow_ensemble")
    level, handlers = package.level, list(package.handlers)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with console_logging():
            logging.getLogger("shallow_ensemble.somewhere").info("an info message")
            logging.getLogger("shallow_ensemble.somewhere").debug("hidden")
            logging.getLogger("shallow_ensemble.somewhere").warning("a warning")
        # afterwards the library is silent again (main() called from Python)
        logging.getLogger("shallow_ensemble.somewhere").info("not shown")
    assert out.getvalue() == "an info message\n"
    assert err.getvalue() == "a warning\n"
    assert package.level == level and package.handlers == handlers


# -------------------------------------------------------------- evaluate --
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A calibrated checkpoint and its export, and two ethanol frames."""
    from shallow_ensemble.export import export_model
    from shallow_ensemble.training.checkpoints import save_checkpoint

    folder = tmp_path_factory.mktemp("api")
    model = make_model([1, 6, 8], num_members=4)
    model.alpha_energy.fill_(1.3)
    model.alpha_forces.fill_(0.7)
    save_checkpoint(folder / "model.ckpt", model)
    export_model(workflows.load_model(folder / "model.ckpt"), folder / "model.pt")
    ase.io.write(folder / "data.xyz", ase.io.read(ETHANOL, "100:102"))
    return folder


def cli_json(model: Path, data: Path, path: Path) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["evaluate", str(model), str(data), "--json", str(path)])
    assert code == 0, err.getvalue()
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt"])
def test_evaluate_model_gives_the_cli_report(models, name, tmp_path):
    model, data = models / name, models / "data.xyz"
    result = shallow_ensemble.evaluate_model(model, data)
    assert isinstance(result, shallow_ensemble.EvaluationResult)
    assert result.n_structures == 2
    assert result.predictions.num_members == 4
    assert {"energy", "energy_per_atom", "forces", "forces_by_element"} == set(
        result.report
    )
    written = json.loads(result.write_json(tmp_path / "api.json").read_text())
    assert written == cli_json(model, data, tmp_path / "cli.json")
    assert written["model"] == str(model) and written["n_structures"] == 2
    assert written["forces"]["rmse"] == pytest.approx(result.report["forces"]["rmse"])


def test_checkpoint_and_exported_model_agree(models):
    data = models / "data.xyz"
    checkpoint = workflows.evaluate_model(models / "model.ckpt", data, forces=False)
    exported = workflows.evaluate_model(models / "model.pt", data, forces=False)
    assert "forces" not in checkpoint.report
    torch.testing.assert_close(
        checkpoint.predictions.energies, exported.predictions.energies
    )
    for metric in ("rmse", "mae", "nll", "alpha"):
        assert exported.report["energy"][metric] == pytest.approx(
            checkpoint.report["energy"][metric], rel=1e-6
        )


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt"])
def test_evaluate_model_checks_atomic_types(models, name):
    with pytest.raises(DataError, match=r"`Cl` \(Z=17\) in .*unknown_element.xyz:1"):
        workflows.evaluate_model(models / name, DATA / "unknown_element.xyz")


def test_evaluate_model_writes_plots(models, tmp_path):
    pytest.importorskip("matplotlib")
    result = workflows.evaluate_model(models / "model.ckpt", models / "data.xyz")
    written = result.write_plots(tmp_path / "plots")
    assert [path.name for path, _ in written] == ["energy.png", "forces.png"]
    assert all(path.read_bytes()[:4] == b"\x89PNG" for path, _ in written)


def test_evaluate_model_missing_model(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="none.pt"):
        workflows.evaluate_model(tmp_path / "none.pt", models / "data.xyz")


# ------------------------------------------------------ atomic-type check --
def test_check_atomic_types_of_types_and_graphs():
    """The one Python-side check also takes bare atomic numbers and objects with
    ``numbers`` (e.g. graphs), named by ``where``, and names the model."""
    check_atomic_types([1, 6, np.int64(8)], [1, 6, 8])
    message = (
        "`Si` (Z=14) in the training set is not one of the atomic types [H, C, O] "
        "of the model in 'a.ckpt'; remove these structures"
    )
    with pytest.raises(DataError) as info:
        check_atomic_types(
            [1, 14], [1, 6, 8], model="the model in 'a.ckpt'", where="the training set"
        )
    assert str(info.value).startswith(message)

    class Graph:
        numbers = torch.tensor([1, 1, 9])

    with pytest.raises(DataError, match=r"`F` \(Z=9\) in the data is not one"):
        check_atomic_types([Graph()], [1, 6, 8])


def test_check_atomic_types_names_structures():
    structures = read_structures(DATA / "unknown_element.xyz")
    with pytest.raises(ShallowEnsembleError, match=r"unknown_element.xyz:1 is not"):
        check_atomic_types(structures, [1, 6, 8])


def test_package_errors_derive_from_the_base():
    """Every exception class of the package is a ShallowEnsembleError."""
    root = Path(shallow_ensemble.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                found.append((path, node.name))
    assert len(found) >= 10
    for path, name in found:
        relative = path.relative_to(root.parent).with_suffix("")
        module = ".".join(relative.parts)
        error = getattr(__import__(module, fromlist=[name]), name)
        assert issubclass(error, ShallowEnsembleError), f"{module}.{name}"
